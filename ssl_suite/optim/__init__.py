"""Optimizers: our additions to timm's registry, parameter groups, schedules."""

from . import registry
from .factory import OptimizerError, create_optimizer, is_excluded, param_groups, scaled_lr
from .lars import LARS
from .schedules import warmup_cosine, warmup_cosine_scheduler

__all__ = ["registry", "OptimizerError", "create_optimizer", "is_excluded", "param_groups",
           "scaled_lr", "LARS", "warmup_cosine", "warmup_cosine_scheduler"]
