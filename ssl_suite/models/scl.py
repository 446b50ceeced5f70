"""SCL: Sparse Connectivity Learning with binary masks and an identity straight-through estimator.

Tang, Luo, Xie, Zhu, Zhao, Bi, Lu, "Automatic Sparse Connectivity Learning for Neural Networks"
(arXiv 2201.05020; IEEE TNNLS 34(10):7350-7364, 2023). Only the abstract [ABS] was available; the
formulas below follow the reconstruction [RECON] in ``shared/algorithms/init_prune_norm_largebatch.md``
section 3.2, which is our design, not necessarily the authors'.

* [ABS] reparametrisation: ``w_l = w_hat_l * m_l`` with a binary mask ``m_l = H(m_hat_l)``,
  ``H(x) = 1[x > 0]`` (unit step), ``w_hat`` and the mask variables ``m_hat`` both trainable
  (:class:`SCLMask`, a ``torch.nn.utils.parametrize`` parametrisation of ``weight``).
* [ABS] identity STE: ``dH/dm_hat := 1`` (:class:`_StepSTE`), so by the chain rule
  ``dL/dw_hat = m * dL/dw`` (pruned weights get no task gradient but can revive) and
  ``G = dL/dm_hat = w_hat * dL/dw``.
* [ABS]/[RECON] per-feature normalised mask gradients (feature j = output unit / output channel,
  i.e. row j of the weight): ``G~_j = G_j / (rms(G_j) + eps)`` (``'rms'``, default), or
  ``/ (||G_j||_2 + eps)`` (``'l2'``), or ``/ (max|G_j| + eps)`` (``'maxabs'``). This is a tensor hook
  on the gradient of the mask ``m`` inside the weight path, so it sees only the *task* part ``G``;
  the regulariser's gradient reaches ``m_hat`` through a separate path and is not normalised.
* [ABS]/[RECON] connection-count regulariser ``R = sum_l ||m_l||_0 = sum_l sum H(m_hat_l)``
  (:func:`scl_regularizer`), optionally ``R / N_total``. Under the identity STE ``dR/dm_hat = 1``,
  so ``J = L + lambda R`` gives ``dJ/dm_hat = G~ + lambda`` (``+ lambda / N_total`` if normalised):
  a constant pruning pressure on every mask variable.

Mask init [RECON]: ``m_hat = init`` (default ``+1``), so the network starts dense and the tie at 0 is
avoided. Put :func:`mask_parameters` into their own optimizer param group without weight decay
(SGD or Adam with their own lr); ``w_hat`` keeps the task optimizer and its weight decay.

Caveat: the normalisation hook fires once per *access* of ``module.weight``. When a forward pass
reads the same weight several times (two BYOL views passed separately), each access is normalised
on its own; run the forward inside ``torch.nn.utils.parametrize.cached()`` to compute the weight
once and normalise the summed gradient.

For export, :func:`fold_scl` writes ``w_hat * H(m_hat)`` into a plain ``weight`` parameter and removes
the masks, so the state dict has timm's plain keys.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["SCLMask", "SCLHandle", "apply_scl", "fold_scl", "global_sparsity", "mask_parameters",
           "normalize_mask_grad", "scl_layers", "scl_regularizer", "sparsity_report"]

_LAYER_TYPES = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear": (nn.Linear,)}
_NORMS = ("rms", "l2", "maxabs", None)


class _StepSTE(torch.autograd.Function):
    """``H(x) = 1[x > 0]`` forward; identity straight-through backward, ``dH/dx := 1`` [ABS]."""

    @staticmethod
    def forward(ctx, m_hat: torch.Tensor) -> torch.Tensor:
        return (m_hat > 0).to(m_hat.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def step_ste(m_hat: torch.Tensor) -> torch.Tensor:
    """Binary mask ``H(m_hat)`` with the identity STE gradient."""
    return _StepSTE.apply(m_hat)


def normalize_mask_grad(g: torch.Tensor, norm: Optional[str] = "rms", eps: float = 1e-8) -> torch.Tensor:
    """Per-feature normalisation of the task mask gradient [RECON 3.2]: row j (output unit /
    output channel, dim 0) is divided by ``rms(G_j) + eps`` (``'rms'``), ``||G_j||_2 + eps``
    (``'l2'``) or ``max|G_j| + eps`` (``'maxabs'``); ``None`` returns ``g`` unchanged."""
    if norm is None:
        return g
    flat = g.reshape(g.shape[0], -1)
    if norm == "rms":
        scale = flat.pow(2).mean(dim=1).sqrt()
    elif norm == "l2":
        scale = flat.norm(dim=1)
    elif norm == "maxabs":
        scale = flat.abs().amax(dim=1)
    else:
        raise ValueError(f"normalize_mask_grad: norm must be one of {_NORMS}, got {norm!r}")
    return g / (scale + eps).view(-1, *([1] * (g.dim() - 1)))


class SCLMask(nn.Module):
    """Parametrisation ``weight = w_hat * H(m_hat)`` with trainable mask variables ``m_hat``.

    ``m_hat`` has the weight's shape and starts at ``init`` (> 0 means dense). The task part of
    ``dL/dm_hat`` is normalised per output feature by :func:`normalize_mask_grad` (``norm``, ``eps``).
    """

    def __init__(self, weight: torch.Tensor, init: float = 1.0, norm: Optional[str] = "rms",
                 eps: float = 1e-8):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"SCLMask: norm must be one of {_NORMS}, got {norm!r}")
        self.m_hat = nn.Parameter(torch.full_like(weight, float(init)))
        self.norm, self.eps = norm, eps

    def mask(self) -> torch.Tensor:
        """The binary mask ``m = H(m_hat)`` (no graph)."""
        return (self.m_hat.detach() > 0).to(self.m_hat.dtype)

    def forward(self, w_hat: torch.Tensor) -> torch.Tensor:
        m = step_ste(self.m_hat)
        if m.requires_grad and self.norm is not None:
            m.register_hook(lambda g: normalize_mask_grad(g, self.norm, self.eps))
        return w_hat * m


def _scl_masks(model: nn.Module):
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, SCLMask):
                    yield name, module, p


def scl_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules of ``model`` whose ``weight`` carries an :class:`SCLMask`, by name."""
    return {name: module for name, module, _ in _scl_masks(model)}


def mask_parameters(model: nn.Module) -> List[nn.Parameter]:
    """All mask variables ``m_hat`` (give them their own param group, no weight decay)."""
    return [p.m_hat for _, _, p in _scl_masks(model)]


@dataclass
class SCLHandle:
    """What :func:`apply_scl` returns: the masked layer names; ``detach()`` folds the masks."""
    model: nn.Module
    names: List[str] = field(default_factory=list)

    def mask_parameters(self) -> List[nn.Parameter]:
        return mask_parameters(self.model)

    def detach(self) -> Dict[str, float]:
        return fold_scl(self.model)

    remove = detach


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) or name.startswith(pat + ".") for pat in exclude)


def apply_scl(model: nn.Module, layers: Iterable[str] = ("conv", "linear"), init: float = 1.0,
              exclude: Iterable[str] = (), norm: Optional[str] = "rms",
              eps: float = 1e-8) -> SCLHandle:
    """Mask every conv / linear ``weight`` of ``model`` as ``w_hat * H(m_hat)`` (SCL, [ABS]).

    ``layers``: kinds among ``"conv"`` / ``"linear"``. ``exclude``: module names or fnmatch patterns
    kept dense (for example the first conv and the last FC, [RECON]). ``init``: the constant start of
    ``m_hat`` (must be > 0: the network starts dense). ``norm`` / ``eps``: the per-feature mask
    gradient normalisation. Biases and norm layers are never masked. Call before building the
    optimizer: ``weight`` becomes ``parametrizations.weight.original`` (``w_hat``) and
    ``parametrizations.weight.0.m_hat``. Layers already masked are left alone.
    """
    layers = tuple(layers)
    unknown = [k for k in layers if k not in _LAYER_TYPES]
    if unknown:
        raise ValueError(f"apply_scl: layers must be among {sorted(_LAYER_TYPES)}, got {unknown}")
    if not init > 0:
        raise ValueError(f"apply_scl: init must be > 0 so that the network starts dense, got {init}")
    types = tuple(t for k in layers for t in _LAYER_TYPES[k])
    done = set(scl_layers(model))
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, types) and n not in done and not _excluded(n, exclude)]
    for _, module in targets:
        parametrize.register_parametrization(
            module, "weight", SCLMask(module.weight.detach(), init=init, norm=norm, eps=eps))
    return SCLHandle(model, [n for n, _ in targets])


def scl_regularizer(model: nn.Module, normalize: bool = False) -> torch.Tensor:
    """Connection count ``R = sum_l sum H(m_hat_l)`` (or ``R / N_total`` with ``normalize``).

    Its value is the number (fraction) of live connections; its gradient under the identity STE is
    ``1`` (``1/N_total``) on every mask variable. The caller adds ``lambda * R`` to the loss.
    """
    masks = list(_scl_masks(model))
    if not masks:
        raise ValueError("scl_regularizer: the model has no SCL masks (call apply_scl first)")
    r = sum(step_ste(p.m_hat).sum() for _, _, p in masks)
    if normalize:
        r = r / sum(p.m_hat.numel() for _, _, p in masks)
    return r


@torch.no_grad()
def sparsity_report(model: nn.Module) -> Dict[str, float]:
    """Fraction of pruned connections ``1 - ||m_l||_0 / numel`` per masked layer, by name."""
    return {name: 1.0 - p.mask().sum().item() / p.m_hat.numel() for name, _, p in _scl_masks(model)}


@torch.no_grad()
def global_sparsity(model: nn.Module) -> float:
    """``1 - sum_l ||m_l||_0 / sum_l numel(w_l)`` over the masked layers."""
    masks = list(_scl_masks(model))
    total = sum(p.m_hat.numel() for _, _, p in masks)
    return 1.0 - sum(p.mask().sum().item() for _, _, p in masks) / max(total, 1)


@torch.no_grad()
def fold_scl(model: nn.Module) -> Dict[str, float]:
    """Write ``w_hat * H(m_hat)`` into a plain ``weight`` parameter of every masked layer and drop
    the masks, so the state dict has plain keys (``<layer>.weight``) and loads into timm. Returns
    the per-layer sparsity measured just before folding. ``weight`` must carry no other
    parametrisation (it would be folded too)."""
    report = sparsity_report(model)
    for name, module, _ in list(_scl_masks(model)):
        if len(module.parametrizations.weight) != 1:
            raise ValueError(f"fold_scl: {name}.weight carries other parametrizations besides "
                             "SCLMask; remove them first")
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return report
