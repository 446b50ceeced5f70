"""Models: timm backbones, BYOL heads, online/target networks."""

from .backbone import BackboneError, apply_cifar_stem, create_backbone
from .byol import (OnlineNetwork, TargetNetwork, build_byol, byol_loss, ema_update_,
                   regression_loss, tau_schedule)
from .heads import MLPHead

__all__ = ["BackboneError", "apply_cifar_stem", "create_backbone", "OnlineNetwork",
           "TargetNetwork", "build_byol", "byol_loss", "ema_update_", "regression_loss",
           "tau_schedule", "MLPHead"]
