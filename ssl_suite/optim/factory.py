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
import math
from typing import Iterable, Optional

import torch
from torch.nn.utils.parametrize import ParametrizationList
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
    """True for biases (ndim <= 1), any parameter of a normalisation layer, and the gains g of
    weight normalization (``parametrizations.weight.original0``, shaped like the weight but a
    per-unit scale, as a BN gamma)."""
    if isinstance(module, NORM_TYPES) or param.ndim <= 1:
        return True
    return (isinstance(module, ParametrizationList) and param is getattr(module, "original0", None)
            and any(type(m).__name__ == "_WeightNorm" for m in module))


def param_groups(modules: dict[str, nn.Module], weight_decay: float, exclude: bool = True,
                 lr_mults: Optional[dict[str, float]] = None,
                 skip: Iterable[torch.Tensor] = ()) -> list[dict]:
    """Groups for named sub-modules: (regular | excluded) x (lr multiplier).

    ``modules`` maps a label to a module (e.g. {"encoder": ..., "predictor": ...}); ``lr_mults``
    gives a label its LR multiplier. Each group carries ``weight_decay``, ``lars_adapt`` and
    ``lr_mult``; the factory turns ``lr_mult`` into the group's ``lr``. Parameters in ``skip``
    are left out (they come in a group of their own, e.g. SCL's mask variables).
    """
    lr_mults = lr_mults or {}
    groups: dict[tuple[float, bool], dict] = {}
    seen: set[int] = {id(p) for p in skip}
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


# Names our configs accept besides timm's own. ``lars`` is the BYOL reference form (timm's
# ``lars`` uses ||g|| + wd||w|| in the trust ratio; it stays reachable as ``timmlars``).
ALIASES: dict[str, str] = {"lars": "byollars", "timmlars": "lars", "generic_adam": "genericadam"}


def resolve_name(name: str) -> tuple[str, bool]:
    """(timm registry name, wrap in our Lookahead?) for a config name such as lookahead_lars.

    ``svi_<base>`` is SVI around ``<base>`` and resolves to ``svi`` (the base goes to the
    ``base`` keyword, see :func:`split_svi`)."""
    lower = name.lower()
    lookahead = lower.startswith("lookahead_")
    if lookahead:
        lower = lower[len("lookahead_"):]
    if lower.startswith("svi_"):
        return "svi", lookahead
    return ALIASES.get(lower, lower), lookahead


def split_svi(name: str) -> Optional[str]:
    """The base optimizer of an ``svi_<base>`` config name (``lookahead_svi_adamw`` -> adamw)."""
    lower = name.lower()
    if lower.startswith("lookahead_"):
        lower = lower[len("lookahead_"):]
    if lower.startswith("svi_"):
        base = lower[len("svi_"):]
        return ALIASES.get(base, base)
    return None


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """``linear``: ``base_lr * B / 256`` (BYOL App. J; Goyal et al. for SGD); ``sqrt``:
    ``base_lr * sqrt(B / 256)`` (adaptive methods, Granziol et al. 2022); ``none``: base_lr."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 256)
    return base_lr


def normalized_weight_decay(lambda_norm: float, batch: int, num_samples: int, epochs: float) -> float:
    """Loshchilov & Hutter (ICLR 2019), §7.2 of the spec: ``lambda = lambda_norm sqrt(b / (B T))``
    with b the batch size, B the number of training points and T the number of epochs."""
    return lambda_norm * math.sqrt(batch / (num_samples * epochs))


def create_optimizer(modules: dict[str, nn.Module], cfg, global_batch: int,
                     num_samples: Optional[int] = None,
                     epochs: Optional[float] = None,
                     total_steps: Optional[int] = None,
                     extra_groups: Optional[list[dict]] = None) -> torch.optim.Optimizer:
    """Build ``cfg.name`` over :func:`param_groups` of ``modules`` through timm's registry.

    ``cfg`` is a :class:`ssl_suite.config.OptimConfig`. Names go through :data:`ALIASES`; a
    ``lookahead_`` prefix wraps the optimizer in our :class:`~ssl_suite.optim.lookahead.Lookahead`
    (slow weights in its state_dict). Keyword arguments the optimizer class does not take
    (``trust_coeff`` for non-LARS optimizers) are left out. ``num_samples`` and ``epochs`` are
    needed for ``cfg.normalized_weight_decay``; ``total_steps`` (the run's optimizer steps) goes
    to optimizers whose constructor takes it (SVI's warm start). ``extra_groups`` are added as
    they are (each with its own ``lr``; e.g. SCL's mask variables: no weight decay, no trust
    ratio); their parameters are left out of the regular groups.
    """
    name, lookahead = resolve_name(cfg.name)
    lr = scaled_lr(cfg.base_lr, global_batch, cfg.lr_scaling)
    wd = cfg.weight_decay
    if cfg.normalized_weight_decay is not None:
        if not num_samples or not epochs:
            raise OptimizerError("optim.normalized_weight_decay: needs the dataset size and epochs")
        wd = normalized_weight_decay(cfg.normalized_weight_decay, global_batch, num_samples, epochs)
    extra_groups = [dict(g) for g in extra_groups or []]
    groups = param_groups(modules, wd, cfg.exclude_bias_and_norm,
                          {"predictor": cfg.predictor_lr_mult},
                          skip=[p for g in extra_groups for p in g["params"]])
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    for g in extra_groups:
        g.setdefault("weight_decay", 0.0)
        g.setdefault("lars_adapt", False)
        g.setdefault("lr_mult", g["lr"] / lr)
    groups += extra_groups
    try:
        opt_cls = get_optimizer_class(name, bind_defaults=False)
    except (ValueError, KeyError):
        from timm.optim import list_optimizers
        raise OptimizerError(f"optim.name: {cfg.name!r} is not a known optimizer (see "
                             f"`ssl-suite optimizers`; e.g. {', '.join(list_optimizers()[:6])})") from None
    accepted = _accepted_kwargs(opt_cls)
    extra = dict(cfg.kwargs)
    if accepted is not None and "trust_coeff" in accepted:
        extra.setdefault("trust_coeff", cfg.trust_coeff)
    if total_steps is not None and _takes(opt_cls, "total_steps"):
        extra.setdefault("total_steps", int(total_steps))
    svi_base = split_svi(cfg.name)
    if svi_base is not None:
        if "base" in extra and extra["base"] != svi_base:
            raise OptimizerError(f"optim.name: {cfg.name} names base {svi_base!r} but "
                                 f"optim.kwargs.base is {extra['base']!r}")
        extra["base"] = svi_base
    unknown = [k for k in extra if accepted is not None and k not in accepted]
    if unknown:
        raise OptimizerError(f"optim.kwargs: {cfg.name} does not take {', '.join(unknown)}")
    optimizer = create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=wd,
                                    momentum=cfg.momentum, **extra)
    if lookahead:
        from .lookahead import wrap_lookahead
        optimizer = wrap_lookahead(optimizer, k=cfg.lookahead_k, alpha=cfg.lookahead_alpha,
                                   pullback_momentum=cfg.lookahead_pullback)
    return optimizer


def list_all() -> list[tuple[str, str]]:
    """(name, description) of every name a config accepts: timm's registry (ours included),
    with our aliases resolved as :func:`create_optimizer` resolves them."""
    from timm.optim import list_optimizers
    timm_rows = dict(list_optimizers(with_description=True))
    rows = dict(timm_rows)
    for alias, target in ALIASES.items():
        rows[alias] = f"-> {target}: {timm_rows.get(target, '')}"
    rows["lookahead_<name>"] = ("any of these wrapped in ssl_suite's Lookahead (Zhang et al. "
                                "2019), slow weights kept in state_dict")
    rows["svi_<name>"] = ("SVI directions (Xu, Cheng & Xie 2022) fed to any of these "
                          "(= svi with kwargs base=<name>)")
    return sorted(rows.items())


def _accepted_kwargs(cls) -> Optional[set[str]]:
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return set(sig.parameters) - {"self", "params"}


def _takes(cls, name: str) -> bool:
    """True if ``cls.__init__`` names the keyword ``name`` (not merely ``**kwargs``)."""
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def all_parameters(groups: Iterable[dict]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]
