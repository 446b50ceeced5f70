"""Register ssl_suite's optimizers into timm's ``default_registry`` on import.

After ``import ssl_suite.optim`` both ``timm.optim.create_optimizer_v2(model, "byollars", ...)``
and :func:`ssl_suite.optim.create_optimizer` know every name added here. timm splits names on
``_`` (``lookahead_<opt>``), so our names have no underscore.
"""

from __future__ import annotations

from timm.optim._optim_factory import OptimInfo, default_registry

from .lars import LARS

OPTIMIZERS = [
    OptimInfo(name="byollars", opt_class=LARS,
              description="LARS, BYOL reference form: trust ratio eta*||w||/||g + wd*w|| "
                          "(Grill et al. 2020, App. J; You et al. 2017)",
              has_eps=False, has_momentum=True),
]

for _info in OPTIMIZERS:
    if _info.name not in default_registry._optimizers:
        default_registry.register(_info)
