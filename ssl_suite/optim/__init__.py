"""Optimizers: our additions to timm's registry, parameter groups, schedules."""

from . import registry
from .factory import (ALIASES, OptimizerError, create_optimizer, is_excluded, list_all,
                      normalized_weight_decay, param_groups, resolve_name, scaled_lr)
from .entropy_sgd import EntropySGD
from .generic_adam import GenericAdam
from .koala import KOALA, KOALAM, KOALAV
from .lars import LARS
from .lookahead import Lookahead, wrap_lookahead
from .mbf import MBF
from .nsgd import NSGD
from .protocol import Handle, attach, backward
from .replica_sgd import ReplicaSGD, recompute_bn_stats
from .sphere import SphereSGD
from .svi import SVI
from .wrs import ELRMonitor, WeightRescaling
from .schedules import (build_scheduler, warmup_cosine, warmup_cosine_scheduler, warmup_restarts,
                        warmup_step)

__all__ = ["registry", "ALIASES", "OptimizerError", "create_optimizer", "is_excluded",
           "list_all", "normalized_weight_decay", "param_groups", "resolve_name", "scaled_lr",
           "GenericAdam", "KOALA", "KOALAM", "KOALAV", "LARS", "Lookahead", "MBF", "NSGD",
           "SVI", "EntropySGD", "ReplicaSGD", "SphereSGD", "WeightRescaling", "ELRMonitor", "recompute_bn_stats", "Handle", "attach", "backward", "wrap_lookahead", "build_scheduler",
           "warmup_cosine", "warmup_cosine_scheduler", "warmup_restarts", "warmup_step"]
