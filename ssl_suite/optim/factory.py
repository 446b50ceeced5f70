"""Optimizer factory: parameter groups BYOL needs, then timm's registry by name.

Groups are built by module type and tensor rank, never by parameter name (a name filter missed
the BN layers inside an ``nn.Sequential`` in mmselfsup, issue #105): parameters owned by a
normalisation layer and every parameter with ``ndim <= 1`` (biases) are *excluded* — weight decay
0 and ``lars_adapt=False`` — as the BYOL reference's ``exclude_bias_and_norm`` does for both weight
decay and the LARS trust ratio (Grill et al. 2020, App. J). Predictor parameters may get a
learning-rate multiplier (App. I).
"""

from __future__ import annotations

import inspect
from typing import Iterable, Optional

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from . import registry  # noqa: F401  (registers our optimizers into timm on import)

NORM_TYPES: tuple[type, ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = NORM_TYPES + (nn.RMSNorm,)


class OptimizerError(ValueError):
    """An optimizer that cannot be built; one line naming the setting."""


def is_excluded(module: nn.Module, param: torch.Tensor) -> bool:
    """True for biases (ndim <= 1) and any parameter of a normalisation layer."""
    return isinstance(module, NORM_TYPES) or param.ndim <= 1


def param_groups(modules: dict[str, nn.Module], weight_decay: float, exclude: bool = True,
                 lr_mults: Optional[dict[str, float]] = None) -> list[dict]:
    """Groups for named sub-modules: (regular | excluded) x (lr multiplier).

    ``modules`` maps a label to a module (e.g. {"encoder": ..., "predictor": ...}); ``lr_mults``
    gives a label its LR multiplier. Each group carries ``weight_decay``, ``lars_adapt`` and
    ``lr_mult``; the factory turns ``lr_mult`` into the group's ``lr``.
    """
    lr_mults = lr_mults or {}
    groups: dict[tuple[float, bool], dict] = {}
    seen: set[int] = set()
    for label, root in modules.items():
        mult = float(lr_mults.get(label, 1.0))
        for module in root.modules():
            for p in module.parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                excluded = exclude and is_excluded(module, p)
                key = (mult, excluded)
                if key not in groups:
                    groups[key] = {"params": [], "weight_decay": 0.0 if excluded else weight_decay,
                                   "lars_adapt": not excluded, "lr_mult": mult}
                groups[key]["params"].append(p)
    return list(groups.values())


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """BYOL: ``lr = base_lr * B / 256`` (App. J); ``none`` keeps base_lr."""
    return base_lr * global_batch / 256 if rule == "linear" else base_lr


def create_optimizer(modules: dict[str, nn.Module], cfg, global_batch: int) -> torch.optim.Optimizer:
    """Build ``cfg.name`` from timm's registry over :func:`param_groups` of ``modules``.

    ``cfg`` is a :class:`ssl_suite.config.OptimConfig`. Keyword arguments the optimizer class
    does not take (``trust_coeff`` for non-LARS optimizers) are left out.
    """
    lr = scaled_lr(cfg.base_lr, global_batch, cfg.lr_scaling)
    groups = param_groups(modules, cfg.weight_decay, cfg.exclude_bias_and_norm,
                          {"predictor": cfg.predictor_lr_mult})
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    try:
        opt_cls = get_optimizer_class(cfg.name.lower().split("_")[-1], bind_defaults=False)
    except (ValueError, KeyError):
        from timm.optim import list_optimizers
        raise OptimizerError(f"optim.name: {cfg.name!r} is not in timm's optimizer registry "
                             f"(e.g. {', '.join(list_optimizers()[:8])}, ...)") from None
    accepted = _accepted_kwargs(opt_cls)
    extra = dict(cfg.kwargs)
    if "trust_coeff" in accepted:
        extra.setdefault("trust_coeff", cfg.trust_coeff)
    unknown = [k for k in extra if accepted is not None and k not in accepted]
    if unknown:
        raise OptimizerError(f"optim.kwargs: {cfg.name} does not take {', '.join(unknown)}")
    return create_optimizer_v2(groups, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, **extra)


def _accepted_kwargs(cls) -> Optional[set[str]]:
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return set(sig.parameters) - {"self", "params"}


def all_parameters(groups: Iterable[dict]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]
