"""Register ssl_suite's optimizers into timm's ``default_registry`` on import.

After ``import ssl_suite.optim`` both ``timm.optim.create_optimizer_v2(model, "byollars", ...)``
and :func:`ssl_suite.optim.create_optimizer` know every name added here. timm splits names on
``_`` (``lookahead_<opt>``), so our names have no underscore.
"""

from __future__ import annotations

import torch
from timm.optim._optim_factory import OptimInfo, default_registry

from .generic_adam import GenericAdam
from .lars import LARS

OPTIMIZERS = [
    OptimInfo(name="genericadam", opt_class=GenericAdam,
              description="Generic Adam (Zou et al. CVPR 2019): alpha_t = lr/t^s, theta_t = "
                          "1 - beta/t^r; converges if 0 < r <= 2s < 2 and beta1^2 < theta_1",
              has_eps=True, has_momentum=False, has_betas=False),
    OptimInfo(name="plainsgd", opt_class=torch.optim.SGD,
              description="torch.optim.SGD without momentum (Robbins & Monro 1951)",
              has_eps=False, has_momentum=False),
    OptimInfo(name="amsgrad", opt_class=torch.optim.Adam,
              description="torch.optim.Adam with amsgrad=True (Reddi, Kale & Kumar, ICLR 2018)",
              has_betas=True, defaults={"amsgrad": True}),
    OptimInfo(name="byollars", opt_class=LARS,
              description="LARS, BYOL reference form: trust ratio eta*||w||/||g + wd*w|| "
                          "(Grill et al. 2020, App. J; You et al. 2017)",
              has_eps=False, has_momentum=True),
]

for _info in OPTIMIZERS:
    if _info.name not in default_registry._optimizers:
        default_registry.register(_info)
