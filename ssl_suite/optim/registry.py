"""Register ssl_suite's optimizers into timm's ``default_registry`` on import.

After ``import ssl_suite.optim`` both ``timm.optim.create_optimizer_v2(model, "byollars", ...)``
and :func:`ssl_suite.optim.create_optimizer` know every name added here. timm splits names on
``_`` (``lookahead_<opt>``), so our names have no underscore.
"""

from __future__ import annotations

import torch
from timm.optim._optim_factory import OptimInfo, default_registry

from .entropy_sgd import EntropySGD
from .generic_adam import GenericAdam
from .koala import KOALAM, KOALAV
from .lars import LARS
from .mbf import MBF
from .nsgd import NSGD
from .replica_sgd import ReplicaSGD
from .sphere import SphereSGD
from .svi import SVI

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
    OptimInfo(name="nsgd", opt_class=NSGD,
              description="NSGD/INSGD (Atici, Pan & Cetin, TMLR 2024): SGD-momentum, each "
                          "Linear/Conv2d weight's step divided by max(log input power, 0.01); "
                          "hooks via attach",
              has_eps=False, has_momentum=True, has_betas=False),
    OptimInfo(name="koalav", opt_class=KOALAV,
              description="KOALA-V (Davtyan et al. AAAI 2022): Kalman filter on the weights, "
                          "scalar covariance, layer-wise gains from the per-sample losses "
                          "(needs closure)",
              has_eps=False, has_momentum=False, has_betas=False),
    OptimInfo(name="koalam", opt_class=KOALAM,
              description="KOALA-M (Davtyan et al. AAAI 2022): Kalman filter on weights + "
                          "velocities, 2x2 covariance, predict before the closure (needs closure)",
              has_eps=False, has_momentum=False, has_betas=False),
    OptimInfo(name="mbf", opt_class=MBF,
              description="Mini-block Fisher (Bahamou et al. AISTATS 2023, RECONSTRUCTION): "
                          "batched per-kernel/per-row empirical-Fisher blocks, EMA + periodic "
                          "Cholesky inverse, momentum",
              has_eps=False, has_momentum=True, has_betas=False),
    OptimInfo(name="svi", opt_class=SVI,
              description="SVI directions (Xu, Cheng & Xie 2022): backprop with each layer's own "
                          "activation derivative replaced by the identity, fed to a base "
                          "optimizer (base=, default Nesterov SGD); svi_<name> picks the base",
              has_eps=True, has_momentum=True, has_betas=True),
    OptimInfo(name="entropysgd", opt_class=EntropySGD,
              description="Entropy-SGD (Chaudhari et al. ICLR 2017): L SGLD steps on fresh batches "
                          "per update, scoped gamma; calls the closure L times per step",
              has_eps=False, has_momentum=False, has_betas=False),
    OptimInfo(name="replicasgd", opt_class=ReplicaSGD,
              description="Replicated SGD (Pittorino et al. ICLR 2021): y replicas coupled to "
                          "their centre, the model holds the centre; calls the closure once per "
                          "replica per step",
              has_eps=False, has_momentum=True, has_betas=False),
    OptimInfo(name="spheresgd", opt_class=SphereSGD,
              description="Projected SGD on the sphere at a fixed effective LR = lr (Kodryan et "
                          "al. NeurIPS 2022): scale-invariant weights renormalised (joint sphere), "
                          "the others plain SGD with noninv_lr",
              has_eps=False, has_momentum=True, has_betas=False, defaults={"momentum": 0.0}),
]

for _info in OPTIMIZERS:
    if _info.name not in default_registry._optimizers:
        default_registry.register(_info)
