"""Weight normalization, its data-dependent initialisation, and mean-only batch normalization.

Salimans & Kingma 2016, "Weight Normalization: A Simple Reparameterization to Accelerate Training
of Deep Neural Networks" (NeurIPS 2016, arXiv 1602.07868):

* eq. 2: every output unit i of a convolution / linear layer computes
  ``y_i = phi(w_i . x + b_i)`` with ``w_i = g_i v_i / ||v_i||``; torch's
  :func:`torch.nn.utils.parametrizations.weight_norm` (``dim=0``) is that reparametrisation, with
  ``g = parametrizations.weight.original0`` and ``v = original1``. It starts at ``g = ||w||``, so the
  network computes exactly the function it computed before (:func:`apply_weight_norm`).
* §3 (data-dependent initialisation): on one batch, in forward order, with
  ``t = v . x / ||v||`` per unit, ``g <- 1/sigma[t]`` and ``b <- -mu[t]/sigma[t]`` so that every
  pre-activation ``y = (t - mu) / sigma`` has zero mean and unit variance on that batch
  (:func:`data_dependent_init`).
* §2.2 (mean-only batch normalization): ``t = w . x``, ``y = phi(t - mu_B[t] + b)`` with the
  per-channel batch mean ``mu_B`` and no division by the standard deviation; a running mean
  replaces ``mu_B`` at test time (:class:`MeanOnlyBatchNorm`, :func:`mean_only_batchnorm`).

For export (:func:`fold_weight_norm`, :func:`to_batchnorm`) the parametrisations are folded into
plain ``weight`` tensors and every mean-only BN becomes a ``BatchNorm1d/2d`` that computes the same
function in eval mode, so the state dict loads (strictly) into a plain timm model.

Paper vs. released code (openai/weightnorm, ``lasagne/nn.py``): the code draws ``v ~ N(0, 0.05^2)``;
here ``v`` keeps the backbone's own initialisation (timm's Kaiming init is isotropic too, and only
the direction ``v/||v||`` survives the data-dependent init). The code puts a ``1e-10`` inside the
square root of sigma (TF) - here ``eps`` (default ``1e-8``) plays that role.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Callable, Dict, Iterable, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm, weight_norm

__all__ = ["MeanOnlyBatchNorm", "apply_weight_norm", "data_dependent_init", "fold_weight_norm",
           "mean_only_batchnorm", "to_batchnorm", "weight_norm_layers"]

_LAYER_TYPES = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear": (nn.Linear,)}


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    """``name`` matches a pattern (fnmatch) or lies under a module named in ``exclude``."""
    return any(fnmatch.fnmatchcase(name, pat) or name.startswith(pat + ".") for pat in exclude)


def _is_weight_normed(module: nn.Module) -> bool:
    return (parametrize.is_parametrized(module, "weight")
            and any(isinstance(p, _WeightNorm) for p in module.parametrizations.weight))


def weight_norm_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The modules of ``model`` whose ``weight`` carries a weight-norm parametrisation, by name."""
    return {name: m for name, m in model.named_modules() if _is_weight_normed(m)}


def apply_weight_norm(model: nn.Module, layers: Iterable[str] = ("conv", "linear"),
                      exclude: Iterable[str] = ()) -> List[str]:
    """Reparametrise ``w = g v/||v||`` (Salimans & Kingma 2016, eq. 2) on every conv / linear layer.

    ``layers`` picks the kinds: ``"conv"`` (``nn.Conv1d/2d/3d``) and / or ``"linear"``
    (``nn.Linear``). ``exclude`` holds module names or fnmatch patterns (``"fc"``, ``"layer4.*"``,
    ``"predictor"``); a name also excludes everything under it. The norm is per output unit
    (``dim=0``): one ``g`` per output channel / row. torch initialises ``g = ||w||`` and ``v = w``,
    so the network computes the same function as before (up to float rounding of ``g v/||v||``).
    Layers that already carry weight norm are left alone. Returns the names of the layers changed,
    in ``named_modules`` order. Call it before the optimizer is built: the ``weight`` parameter is
    replaced by ``parametrizations.weight.original0`` (g) and ``original1`` (v).
    """
    layers = tuple(layers)
    unknown = [k for k in layers if k not in _LAYER_TYPES]
    if unknown:
        raise ValueError(f"apply_weight_norm: layers must be among {sorted(_LAYER_TYPES)}, "
                         f"got {unknown}")
    types = tuple(t for k in layers for t in _LAYER_TYPES[k])
    exclude = tuple(exclude)
    names = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, types) or _excluded(name, exclude) or _is_weight_normed(module):
            continue
        weight_norm(module, name="weight", dim=0)
        names.append(name)
    return names


class MeanOnlyBatchNorm(nn.Module):
    """Mean-only batch normalization (Salimans & Kingma 2016, §2.2).

    ``y = x - mu_B + b`` in training, with ``mu_B`` the per-channel mean over every dimension but
    dim 1 (batch, and length / height / width), and ``y = x - running_mean + b`` in eval mode.
    There is no division by the batch standard deviation and no scale ``gamma``: with weight
    norm in front, ``g`` of the preceding layer is the scale. ``running_mean`` follows torch's
    convention ``running <- (1 - momentum) running + momentum mu_B`` (the paper's code uses
    ``0.9 running + 0.1 mu_B``, i.e. ``momentum=0.1``). ``bias=False`` drops ``b``.

    ``kind`` records the batch-norm class it replaced (``"BatchNorm1d"`` / ``"BatchNorm2d"``), which
    :func:`to_batchnorm` converts it back to, with ``eps`` used there.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, bias: bool = True,
                 eps: float = 1e-5, kind: str = "BatchNorm2d", device=None, dtype=None):
        super().__init__()
        if kind not in ("BatchNorm1d", "BatchNorm2d"):
            raise ValueError(f"MeanOnlyBatchNorm: kind must be BatchNorm1d or BatchNorm2d, got {kind!r}")
        self.num_features, self.momentum, self.eps, self.kind = num_features, momentum, eps, kind
        factory = dict(device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if bias else None
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long,
                                                                 device=device))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, momentum={self.momentum}, bias={self.bias is not None}, "
                f"kind={self.kind}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"MeanOnlyBatchNorm({self.num_features}): expected (N, "
                             f"{self.num_features}, ...) input, got {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            mu = x.mean(dim=dims)
            with torch.no_grad():
                self.running_mean.lerp_(mu.detach().to(self.running_mean.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mu = self.running_mean
        y = x - mu.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def mean_only_batchnorm(model: nn.Module, exclude: Iterable[str] = ()) -> List[str]:
    """Replace every ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` by a :class:`MeanOnlyBatchNorm`.

    The BN shift ``beta`` becomes ``b`` and its running mean and momentum carry over; the scale
    ``gamma`` is dropped, as in the paper (§2.2), so a ResNet's zero-initialised last-BN gamma
    (timm ``zero_init_last``) no longer silences its residual branches. A BN without affine
    parameters gives a mean-only BN without ``b``. Subclasses that do more than normalise
    (e.g. timm's ``BatchNormAct2d``, ``nn.SyncBatchNorm``) are refused rather than silently losing
    their activation: run this before ``convert_sync_batchnorm`` (which leaves mean-only BN alone;
    its mean is then per process). Returns the names replaced. Call before building the optimizer.
    """
    exclude = tuple(exclude)
    names = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or _excluded(name, exclude):
            continue
        if type(module) not in (nn.BatchNorm1d, nn.BatchNorm2d):
            raise ValueError(f"mean_only_batchnorm: {name or 'model'} is a "
                             f"{type(module).__name__}; only nn.BatchNorm1d / nn.BatchNorm2d can "
                             "be replaced (exclude it, or use a model built with plain BN)")
        ref = module.running_mean if module.running_mean is not None else module.weight
        new = MeanOnlyBatchNorm(module.num_features,
                                momentum=0.1 if module.momentum is None else module.momentum,
                                bias=module.affine, eps=module.eps, kind=type(module).__name__,
                                device=ref.device if ref is not None else None,
                                dtype=ref.dtype if ref is not None else None)
        with torch.no_grad():
            if module.affine:
                new.bias.copy_(module.bias)
            if module.running_mean is not None:
                new.running_mean.copy_(module.running_mean)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        _replace(model, name, new)
        names.append(name)
    return names


def _unit_direction(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``v_i / ||v_i||`` per output unit (norm over every dim but 0)."""
    norm = v.flatten(1).norm(dim=1).clamp_min(eps)
    return v / norm.reshape((-1,) + (1,) * (v.dim() - 1))


def data_dependent_init(model: nn.Module, batch_forward: Callable[[], Any], eps: float = 1e-8,
                        init_scale: float = 1.0) -> Dict[str, Dict[str, Any]]:
    """Data-dependent initialisation of every weight-normed layer (Salimans & Kingma 2016, §3).

    For each weight-normed layer, in the order the forward pass reaches it, on the batch that
    ``batch_forward()`` runs through ``model``: ``t = v . x / ||v||`` per output unit (a conv's
    unit is an output channel, statistics over batch and spatial positions), ``mu = mean(t)``,
    ``sigma = sqrt(mean((t - mu)^2) + eps)``, then ``g <- init_scale / sigma`` and
    ``b <- -mu init_scale / sigma``, so the layer's output ``init_scale (t - mu) / sigma`` has
    zero mean and standard deviation ``init_scale`` per unit on that batch (§3:
    ``y = phi((t - mu[t]) / sigma[t])``; ``init_scale`` is the TF code's argument, default 1).

    Cost: **one** forward pass under ``torch.no_grad()``. A forward pre-hook on each layer
    computes ``t`` from the layer's actual input and sets ``g`` and ``b`` before the layer runs,
    so the layer already emits its normalised output and every later layer sees inputs produced by
    initialised earlier layers - the sequential procedure of the paper, without re-running the
    network per layer (the extra work is one more conv / matmul per layer). A layer called twice
    in one pass is initialised at its first call.

    Layers without bias (timm ResNet convs, the BYOL heads' last linear layer): only ``g`` is set,
    so the output has unit variance but keeps its mean ``mu/sigma`` (reported); in a ResNet the
    following BN / mean-only BN removes it, which is the paper's mean-only-BN init (§2.2: b stays).

    The model's buffers (BN running statistics) are restored afterwards, so the init leaves no
    trace but ``g`` and ``b``. BN / mean-only BN layers normalise with batch statistics when the
    model is in train mode (as in training); layers that ``batch_forward`` never reaches keep
    their values and are named in a warning. Everyone must run this on the same batch (and
    hence the same result) in data-parallel training, or broadcast afterwards.

    Returns ``{layer name: {"mean": mu, "std": sigma, "bias": has bias}}`` with per-unit tensors
    (the statistics of ``t`` before the init).
    """
    layers = weight_norm_layers(model)
    if not layers:
        raise ValueError("data_dependent_init: the model has no weight-normed layer "
                         "(call apply_weight_norm first)")
    stats: Dict[str, Dict[str, Any]] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args):
            if name in stats:
                return None
            x = args[0]
            g, v = module.parametrizations.weight.original0, module.parametrizations.weight.original1
            acc = torch.promote_types(v.dtype, torch.float32)
            direction = _unit_direction(v.detach().to(acc), eps)
            if isinstance(module, nn.Linear):
                t = F.linear(x.to(acc), direction)   # (..., out): every leading dim is a sample
                t = t.reshape(-1, t.shape[-1])
                dims = [0]
            else:
                t = module._conv_forward(x.to(acc), direction, None)
                dims = [0] + list(range(2, t.dim()))
            mu = t.mean(dim=dims)
            sigma = (t - mu.reshape((1, -1) + (1,) * (t.dim() - 2))).pow(2).mean(dim=dims)
            sigma = (sigma + eps).sqrt()
            g.copy_((init_scale / sigma).reshape(g.shape).to(g.dtype))
            if module.bias is not None:
                module.bias.copy_((-mu * init_scale / sigma).to(module.bias.dtype))
            stats[name] = {"mean": mu.detach().cpu(), "std": sigma.detach().cpu(),
                           "bias": module.bias is not None}
            return None
        return hook

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            batch_forward()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    missed = [n for n in layers if n not in stats]
    if missed:
        warnings.warn(f"data_dependent_init: the forward pass never reached {missed}; "
                      "they keep g = ||v||", stacklevel=2)
    return stats


def fold_weight_norm(model: nn.Module) -> nn.Module:
    """Fold every weight-norm parametrisation into a plain ``weight = g v/||v||`` (in place).

    Uses ``parametrize.remove_parametrizations(..., leave_parametrized=True)``, so the state dict
    has plain ``weight`` keys again and the function is unchanged. A layer whose ``weight`` carries
    weight norm together with another parametrisation is refused (folding would bake the other
    one in too). Returns ``model``.
    """
    for name, module in weight_norm_layers(model).items():
        chain = module.parametrizations.weight
        if len(chain) != 1:
            raise ValueError(f"fold_weight_norm: {name}.weight carries {len(chain)} "
                             "parametrizations; remove the others first")
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def to_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every :class:`MeanOnlyBatchNorm` by the ``BatchNorm1d/2d`` it equals in eval mode.

    A BN in eval mode computes ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``;
    with ``running_mean = mu``, ``running_var = 1 - eps``, ``weight = 1`` and ``bias = b`` that is
    ``x - mu + b``, the mean-only BN's eval output (exact up to float rounding of ``1 - eps + eps``).
    The BN takes the mean-only BN's ``eps`` (torch's / timm's default ``1e-5``) so that a fresh timm
    model, whose BN has that ``eps``, computes the same thing from the loaded state dict. In *train*
    mode the two differ (BN divides by the batch std): this is an export conversion. Returns
    ``model`` (in place; a bare ``MeanOnlyBatchNorm`` is returned converted).
    """
    def convert(m: MeanOnlyBatchNorm) -> nn.Module:
        cls = nn.BatchNorm1d if m.kind == "BatchNorm1d" else nn.BatchNorm2d
        bn = cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.bias is not None,
                 device=m.running_mean.device, dtype=m.running_mean.dtype)
        with torch.no_grad():
            bn.running_mean.copy_(m.running_mean)
            bn.running_var.fill_(1.0 - m.eps)
            bn.num_batches_tracked.copy_(m.num_batches_tracked)
            if m.bias is not None:
                bn.weight.fill_(1.0)
                bn.bias.copy_(m.bias)
        bn.train(m.training)
        return bn

    if isinstance(model, MeanOnlyBatchNorm):
        return convert(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MeanOnlyBatchNorm):
            _replace(model, name, convert(module))
    return model
