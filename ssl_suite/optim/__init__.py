"""Optimizers: our additions to timm's registry, parameter groups, schedules."""

from . import registry
from .factory import (ALIASES, OptimizerError, create_optimizer, is_excluded, list_all,
                      normalized_weight_decay, param_groups, resolve_name, scaled_lr)
from .generic_adam import GenericAdam
from .lars import LARS
from .lookahead import Lookahead, wrap_lookahead
from .schedules import (build_scheduler, warmup_cosine, warmup_cosine_scheduler, warmup_restarts,
                        warmup_step)

__all__ = ["registry", "ALIASES", "OptimizerError", "create_optimizer", "is_excluded",
           "list_all", "normalized_weight_decay", "param_groups", "resolve_name", "scaled_lr",
           "GenericAdam", "LARS", "Lookahead", "wrap_lookahead", "build_scheduler",
           "warmup_cosine", "warmup_cosine_scheduler", "warmup_restarts", "warmup_step"]
