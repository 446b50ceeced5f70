"""GradMax: grow the hidden width between two layers without changing the function.

Evci, van Merriënboer, Unterthiner, Vladymyrov, Pedregosa, "GradMax: Growing Neural Networks
using Gradient Information", ICLR 2022 (reference code: google-research/growneuron,
``growers.py`` / ``layers.py`` / ``updaters.py``).

Two consecutive layers ``layer_in -> f -> layer_out`` (``nn.Linear`` pairs or ``nn.Conv2d`` pairs,
optionally with a ``BatchNorm`` between) get ``k`` new hidden units:

* the new **incoming** weights (rows of ``layer_in.weight``) and biases are **zero**, so with
  ``f(0) = 0`` the network computes exactly the same function (paper, Sec. 3);
* the new **outgoing** weights (columns of ``layer_out.weight``) maximise the squared gradient
  norm of those zero incoming weights under an orthonormality constraint (paper, Eq. 8-9)::

      dL/dW_in_new = f'(0) * W_out_new^T M,    M = sum_b g_{l+1}^(b) h_{l-1}^(b)T      (dense)
      max ||W_out_new^T M||_F^2  s.t.  W_out_new^T W_out_new = I
      =>  W_out_new[:, j] = u_j  (top-k left singular vectors of M),  value = sum_j sigma_j^2

  Each new column is then rescaled to ``magnitude`` (``scale_method='fixed'``: ``scale``;
  ``'mean_norm'``: ``scale * mean_j ||W_out_existing[:, j]||``, as ``grow_new_layer`` in the
  code), so ``||dL/dW_in_new||_F^2 = magnitude^2 * sum_{j<=k} sigma_j^2``.

For convolutions ``M`` is built exactly with ``unfold`` (the official code uses an auxiliary
``(k1+k2-1)``-kernel conv, which is only exact without zero-padding border effects; we implement
the exact paper objective, not that approximation)::

      M[(c2,q),(c0,p)] = sum_{b,v} g_pad[b,c2, v + P - q'] x_pad[b,c0, s1*v + p]

``f'(0)`` must be 1 or the new incoming weights never receive gradient: torch's ``relu`` has
derivative 0 at 0. Use :class:`ReLU1` (``torch.where(x >= 0, x, 0)``, the code's ``relu1``).

``M`` is computed from one batch through a user closure that does forward + backward of the
(batch-mean) loss; it is called **once** per :func:`grow_pair` call. Forward / tensor hooks
capture ``h_{l-1}`` (input of ``layer_in``) and ``g_{l+1}`` (gradient of ``layer_out``'s output);
if the closure runs the pair several times (e.g. BYOL's two views) the contributions are summed,
matching the gradient of the total loss.

BatchNorm between the pair is grown by identity (gamma=1, beta=0, running_mean=0, running_var=1,
as ``add_neurons_identity``), which keeps the function in train and eval mode. The SVD objective
ignores the BN (as in the code, whose grown pairs use ``normalization_type='none'``), so with a BN
in train mode the new gradient is not the maximiser; we only guarantee function preservation.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["ReLU1", "relu1", "gradmax_matrix", "gradmax_matrices", "grow_pair", "grow_linear_pair", "grow_conv_pair",
           "grow_optimizer_state", "pad_pair", "shrink_pair", "hidden_width"]


def relu1(x: torch.Tensor) -> torch.Tensor:
    """ReLU whose derivative at 0 is 1 (the reference code's ``relu1``); f(0)=0, f'(0)=1."""
    return torch.where(x >= 0, x, torch.zeros_like(x))


class ReLU1(nn.Module):
    """Module form of :func:`relu1`; put it between grown layers (GradMax needs f'(0)=1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu1(x)


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _check_pair(layer_in: nn.Module, layer_out: nn.Module) -> str:
    if isinstance(layer_in, nn.Linear) and isinstance(layer_out, nn.Linear):
        if layer_in.out_features != layer_out.in_features:
            raise ValueError("layer_in.out_features must equal layer_out.in_features")
        return "linear"
    if isinstance(layer_in, nn.Conv2d) and isinstance(layer_out, nn.Conv2d):
        if layer_in.out_channels != layer_out.in_channels:
            raise ValueError("layer_in.out_channels must equal layer_out.in_channels")
        for name, conv in (("layer_in", layer_in), ("layer_out", layer_out)):
            if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                raise ValueError(f"{name}: GradMax conv growth needs groups=1, zero padding given "
                                 "as integers")
        if _pair(layer_out.stride) != (1, 1) or _pair(layer_out.dilation) != (1, 1):
            raise ValueError("layer_out: GradMax conv growth needs stride 1 and dilation 1")
        k2, p2 = _pair(layer_out.kernel_size), _pair(layer_out.padding)
        if any(p > k - 1 for p, k in zip(p2, k2)):
            raise ValueError("layer_out: padding must be <= kernel_size - 1")
        return "conv"
    raise TypeError("grow_pair supports nn.Linear->nn.Linear and nn.Conv2d->nn.Conv2d pairs "
                    f"(got {type(layer_in).__name__} -> {type(layer_out).__name__})")


def _conv_contribution(x: torch.Tensor, g: torch.Tensor, conv_in: nn.Conv2d,
                       conv_out: nn.Conv2d) -> torch.Tensor:
    """Exact conv ``M`` of shape (C2*k2h*k2w, C0*k1h*k1w) for one forward call (Sec. 2.3 of spec).

    The gradient of a new incoming filter is ``M^T vec(W_out_new)``: unfold the layer input with
    ``conv_in``'s geometry, unfold ``g_{l+1}`` with padding ``k2 - 1 - P2`` and flip the kernel
    index (the adjoint of the stride-1 cross-correlation of ``conv_out``).
    """
    ux = F.unfold(x, conv_in.kernel_size, dilation=conv_in.dilation, padding=conv_in.padding,
                  stride=conv_in.stride)                                   # (B, C0*k1^2, V)
    k2 = _pair(conv_out.kernel_size)
    p2 = _pair(conv_out.padding)
    pad = (k2[0] - 1 - p2[0], k2[1] - 1 - p2[1])
    ug = F.unfold(g, k2, padding=pad)                                       # (B, C2*k2^2, V)
    b, c2 = g.shape[:2]
    ug = ug.view(b, c2, k2[0], k2[1], -1).flip(2, 3).reshape(b, c2 * k2[0] * k2[1], -1)
    if ug.shape[-1] != ux.shape[-1]:
        raise ValueError("spatial size of layer_in output and layer_out input differ; GradMax "
                         "conv growth needs the pair to be directly connected")
    return torch.einsum("bjv,biv->ji", ug, ux)


class _Recorder:
    """Forward/tensor hooks on one pair that accumulate ``M`` while a closure runs."""

    def __init__(self, layer_in: nn.Module, layer_out: nn.Module):
        self.kind = _check_pair(layer_in, layer_out)
        self.layer_in, self.layer_out = layer_in, layer_out
        self.inputs: list = []
        self.n_out = 0
        self.M: Optional[torch.Tensor] = None
        self.handles = [layer_in.register_forward_hook(self._hook_in),
                        layer_out.register_forward_hook(self._hook_out)]

    def _hook_in(self, module, args, output):
        self.inputs.append(args[0].detach())

    def _hook_out(self, module, args, output):
        idx = self.n_out
        self.n_out += 1
        if output.requires_grad:
            output.register_hook(lambda g: self._add(idx, g))

    @torch.no_grad()
    def _add(self, idx: int, g: torch.Tensor) -> None:
        x, g = self.inputs[idx].to(torch.float64), g.detach().to(torch.float64)
        if self.kind == "linear":
            c = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        else:
            c = _conv_contribution(x, g, self.layer_in, self.layer_out)
        self.M = c if self.M is None else self.M + c

    def finish(self) -> torch.Tensor:
        for h in self.handles:
            h.remove()
        if len(self.inputs) != self.n_out:
            raise RuntimeError(f"closure ran layer_in {len(self.inputs)} times but layer_out "
                               f"{self.n_out} times; GradMax needs them paired")
        if self.M is None:
            raise RuntimeError("closure produced no gradient for layer_out's output; it must run "
                               "forward and backward of the loss")
        return self.M


def gradmax_matrices(pairs, closure: Callable[[], torch.Tensor]) -> list:
    """``M`` of every ``(layer_in, layer_out)`` pair from **one** run of ``closure``."""
    recorders = []
    try:
        for layer_in, layer_out in pairs:
            recorders.append(_Recorder(layer_in, layer_out))
        closure()
    except BaseException:
        for r in recorders:
            for h in r.handles:
                h.remove()
        raise
    return [r.finish() for r in recorders]


def gradmax_matrix(layer_in: nn.Module, layer_out: nn.Module,
                   closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``closure`` once and return ``M`` (fan_out_of_new_unit x fan_in_of_new_unit).

    Dense: ``M = sum_b g_{l+1}^(b) h_{l-1}^(b)T`` (paper Eq. 8), i.e. ``G^T H`` where ``G`` is the
    gradient of the (mean) loss w.r.t. ``layer_out``'s output, leading dims flattened.
    Conv: the exact unfold construction of :func:`_conv_contribution`.
    ``dL/dW_in_new = f'(0) * W_out_new^T M`` for zero incoming weights.
    """
    return gradmax_matrices([(layer_in, layer_out)], closure)[0]


def _replace_param(module: nn.Module, name: str, new: torch.Tensor,
                   grown: Dict[nn.Parameter, Tuple[nn.Parameter, int]], dim: int) -> None:
    old = getattr(module, name)
    p = nn.Parameter(new.to(dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)
    setattr(module, name, p)
    grown[old] = (p, dim)


def _grow_norm(norm: nn.Module, k: int, grown) -> None:
    """Identity growth of a BatchNorm between the pair (gamma=1, beta=0, mean=0, var=1)."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"only BatchNorm can sit between a grown pair, got {type(norm).__name__}")
    with torch.no_grad():
        if norm.affine:
            _replace_param(norm, "weight", torch.cat([norm.weight, norm.weight.new_ones(k)]),
                           grown, 0)
            _replace_param(norm, "bias", torch.cat([norm.bias, norm.bias.new_zeros(k)]), grown, 0)
        if norm.running_mean is not None:
            norm.running_mean = torch.cat([norm.running_mean, norm.running_mean.new_zeros(k)])
            norm.running_var = torch.cat([norm.running_var, norm.running_var.new_ones(k)])
    norm.num_features += k


def pad_pair(layer_in: nn.Module, layer_out: nn.Module, k: int, *,
             new_out: Optional[torch.Tensor] = None, norm: Optional[nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None,
             exp_avg_sq_fill: str = "mean") -> Dict[nn.Parameter, Tuple[nn.Parameter, int]]:
    """Add ``k`` hidden units between the pair: zero incoming rows (and biases), outgoing
    columns ``new_out`` (``layer_out.weight``'s layout with ``k`` in dim 1; zeros if None), a
    BatchNorm between grown by identity. With ``f(0) = 0`` the function is unchanged whatever
    ``new_out`` is. Used by :func:`grow_pair`, to grow a BYOL target alongside its online network,
    and to give a freshly built network the widths of a checkpoint. Returns ``{old: (new, dim)}``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kind = _check_pair(layer_in, layer_out)
    grown: Dict[nn.Parameter, Tuple[nn.Parameter, int]] = {}
    with torch.no_grad():
        w_in, w_out = layer_in.weight, layer_out.weight
        if new_out is None:
            new_out = w_out.new_zeros((w_out.shape[0], k) + tuple(w_out.shape[2:]))
        if new_out.shape[1] != k or new_out.shape[0] != w_out.shape[0]:
            raise ValueError(f"new_out has shape {tuple(new_out.shape)}; expected "
                             f"{(w_out.shape[0], k) + tuple(w_out.shape[2:])}")
        _replace_param(layer_in, "weight",
                       torch.cat([w_in, w_in.new_zeros((k,) + tuple(w_in.shape[1:]))], 0), grown, 0)
        if layer_in.bias is not None:
            _replace_param(layer_in, "bias", torch.cat([layer_in.bias, layer_in.bias.new_zeros(k)]),
                           grown, 0)
        _replace_param(layer_out, "weight", torch.cat([w_out, new_out.to(w_out)], 1), grown, 1)
    if kind == "linear":
        layer_in.out_features += k
        layer_out.in_features += k
    else:
        layer_in.out_channels += k
        layer_out.in_channels += k
    if norm is not None:
        _grow_norm(norm, k, grown)
    if optimizer is not None:
        for old, (new, dim) in grown.items():
            grow_optimizer_state(optimizer, old, new, dim, exp_avg_sq_fill=exp_avg_sq_fill)
    return grown


def hidden_width(layer_in: nn.Module) -> int:
    """The number of hidden units a pair starting at ``layer_in`` has."""
    return layer_in.out_features if isinstance(layer_in, nn.Linear) else layer_in.out_channels


def shrink_pair(layer_in: nn.Module, layer_out: nn.Module, width: int,
                norm: Optional[nn.Module] = None) -> None:
    """Keep the first ``width`` hidden units of the pair (and of the BatchNorm between): the thin
    network a growth schedule starts from (the paper's ``width_multiplier``). Call before the
    optimizer is built; the kept weights keep their initial values."""
    kind = _check_pair(layer_in, layer_out)
    if not 1 <= width <= hidden_width(layer_in):
        raise ValueError(f"width must be in [1, {hidden_width(layer_in)}], got {width}")
    unused: Dict = {}
    with torch.no_grad():
        _replace_param(layer_in, "weight", layer_in.weight[:width].clone(), unused, 0)
        if layer_in.bias is not None:
            _replace_param(layer_in, "bias", layer_in.bias[:width].clone(), unused, 0)
        _replace_param(layer_out, "weight", layer_out.weight[:, :width].clone(), unused, 1)
        if norm is not None:
            if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
                raise TypeError(f"only BatchNorm can sit between a pair, got {type(norm).__name__}")
            if norm.affine:
                _replace_param(norm, "weight", norm.weight[:width].clone(), unused, 0)
                _replace_param(norm, "bias", norm.bias[:width].clone(), unused, 0)
            if norm.running_mean is not None:
                norm.running_mean = norm.running_mean[:width].clone()
                norm.running_var = norm.running_var[:width].clone()
            norm.num_features = width
    if kind == "linear":
        layer_in.out_features = layer_out.in_features = width
    else:
        layer_in.out_channels = layer_out.in_channels = width


def grow_pair(layer_in: nn.Module, layer_out: nn.Module, k: int,
              closure: Optional[Callable[[], torch.Tensor]] = None, *, scale: float = 0.5,
              scale_method: str = "mean_norm", norm: Optional[nn.Module] = None,
              optimizer: Optional[torch.optim.Optimizer] = None,
              exp_avg_sq_fill: str = "mean", method: str = "gradmax",
              reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              generator: Optional[torch.Generator] = None,
              M: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Grow the hidden width between ``layer_in`` and ``layer_out`` by ``k`` GradMax units.

    Args:
        closure: zero-grad + forward + backward of the batch-mean loss (called once; not needed
            for ``method='random'``).
        scale, scale_method: magnitude of each new outgoing vector (Sec. 2.4 of the spec):
            ``'fixed'`` -> ``scale``; ``'mean_norm'`` -> ``scale * mean_j ||W_out[:, j]||``
            over the existing hidden units (paper code default for WRN/ImageNet, scale 0.5).
        norm: optional BatchNorm between the pair, grown by identity.
        optimizer: if given, its state and param groups follow the growth
            (:func:`grow_optimizer_state`).
        method: ``'gradmax'`` (Eq. 9, top-k left singular vectors of ``M``) or ``'random'``
            (the paper's baseline: random orthonormal directions of the same magnitude).
        reduce: applied to ``M`` before the SVD (e.g. an all-reduce mean over processes, so every
            process grows the same units).
        M: the GradMax matrix if already computed (:func:`gradmax_matrices` gets every pair's
            from one forward/backward); then ``closure`` is not called.

    Returns a dict with ``M`` (float64; None for random), ``singular_values`` (top-k,
    descending; None for random), ``magnitude`` and ``replaced`` ({old_param: (new_param, dim)})
    for re-wrapping EMA / DDP copies. The modules are modified in place (new ``nn.Parameter``
    objects, sizes updated).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if scale_method not in ("fixed", "mean_norm"):
        raise ValueError(f"scale_method must be 'fixed' or 'mean_norm', got {scale_method!r}")
    if method not in ("gradmax", "random"):
        raise ValueError(f"method must be 'gradmax' or 'random', got {method!r}")
    kind = _check_pair(layer_in, layer_out)
    w_out = layer_out.weight.detach()
    fan_out = w_out.shape[0] * int(torch.tensor(w_out.shape[2:]).prod()) if kind == "conv" \
        else w_out.shape[0]
    S = None
    if method == "gradmax":
        if M is None and closure is None:
            raise ValueError("grow_pair: method='gradmax' needs a closure")
        if M is None:
            M = gradmax_matrix(layer_in, layer_out, closure)
        if reduce is not None:
            M = reduce(M)
        if k > min(M.shape):
            raise ValueError(f"k={k} exceeds rank bound min{tuple(M.shape)} of the GradMax matrix")
        U, S, _ = torch.linalg.svd(M, full_matrices=False)   # Eq. 9: top-k left singular vectors
        directions, S = U[:, :k], S[:k]                        # unit-norm, orthonormal columns
    else:
        M = None
        if k > fan_out:
            raise ValueError(f"k={k} exceeds the {fan_out} outgoing dimensions")
        z = torch.randn(fan_out, k, dtype=torch.float64, generator=generator)
        directions = torch.linalg.qr(z).Q

    fan_out_norms = w_out.transpose(0, 1).reshape(w_out.shape[1], -1).norm(dim=1)
    if scale_method == "fixed":
        magnitude = float(scale)
    else:
        magnitude = float(scale * fan_out_norms.mean())
    new_out_cols = (directions * magnitude).to(w_out.dtype)   # (fan_out, k)
    if kind == "linear":
        extra = new_out_cols
    else:
        extra = new_out_cols.T.reshape(k, w_out.shape[0], *w_out.shape[2:]).transpose(0, 1)
    grown = pad_pair(layer_in, layer_out, k, new_out=extra.to(w_out.device), norm=norm,
                     optimizer=optimizer, exp_avg_sq_fill=exp_avg_sq_fill)
    return {"M": M, "singular_values": S, "magnitude": magnitude, "replaced": grown}


def grow_linear_pair(layer_in: nn.Linear, layer_out: nn.Linear, k: int, closure, **kwargs):
    """:func:`grow_pair` for ``nn.Linear -> f -> nn.Linear`` (type-checked)."""
    if not (isinstance(layer_in, nn.Linear) and isinstance(layer_out, nn.Linear)):
        raise TypeError("grow_linear_pair needs two nn.Linear layers")
    return grow_pair(layer_in, layer_out, k, closure, **kwargs)


def grow_conv_pair(layer_in: nn.Conv2d, layer_out: nn.Conv2d, k: int, closure, **kwargs):
    """:func:`grow_pair` for ``nn.Conv2d -> [BN] -> f -> nn.Conv2d`` (type-checked)."""
    if not (isinstance(layer_in, nn.Conv2d) and isinstance(layer_out, nn.Conv2d)):
        raise TypeError("grow_conv_pair needs two nn.Conv2d layers")
    return grow_pair(layer_in, layer_out, k, closure, **kwargs)


_SQ_STATES = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "sum")


def grow_optimizer_state(optimizer: torch.optim.Optimizer, old_param: torch.Tensor,
                         new_param: torch.Tensor, dim: int, *,
                         exp_avg_sq_fill: str = "mean", swap: bool = True) -> None:
    """Swap ``old_param`` for ``new_param`` in ``optimizer`` and grow its state along ``dim``.

    Old entries keep their state (``copy_optimizer_slots`` / ``pad_zeros_to`` in the paper code);
    first-moment-like tensors (``momentum_buffer``, ``exp_avg``, ...) get zeros for the new
    entries. Scalars such as Adam's per-tensor ``step`` are kept. **Pitfall (Adam):** with a large
    ``step``, zero second moments give new entries a first update of about
    ``(1-beta1)/sqrt(1-beta2) * lr * sign(g)``; so by default (``exp_avg_sq_fill='mean'``)
    second-moment tensors (``exp_avg_sq``, ``max_exp_avg_sq``, RMSprop's ``square_avg``, ...) are
    padded with the mean of the old entries. ``'zero'`` reproduces the paper code's zero padding.
    ``swap=False`` only moves the state (for a wrapper whose ``param_groups`` are its base
    optimizer's, already swapped: our Lookahead keeps its slow weights in its own ``state``).
    """
    if exp_avg_sq_fill not in ("mean", "zero"):
        raise ValueError(f"exp_avg_sq_fill must be 'mean' or 'zero', got {exp_avg_sq_fill!r}")
    found = not swap
    for group in optimizer.param_groups if swap else ():
        for i, p in enumerate(group["params"]):
            if p is old_param:
                group["params"][i] = new_param
                found = True
    if not found:
        raise KeyError("old_param is not in the optimizer's param_groups")
    state = optimizer.state.pop(old_param, None)
    if not state:
        return
    new_state = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old_param.shape:
            pad_shape = list(value.shape)
            pad_shape[dim] = new_param.shape[dim] - old_param.shape[dim]
            if key in _SQ_STATES and exp_avg_sq_fill == "mean" and value.numel() > 0:
                pad = value.new_full(pad_shape, float(value.mean()))
            else:
                pad = value.new_zeros(pad_shape)
            new_state[key] = torch.cat([value, pad], dim)
        elif torch.is_tensor(value) and value.dim() > 0 and value.numel() > 1:
            raise ValueError(f"optimizer state {key!r} of shape {tuple(value.shape)} does not "
                             f"match param shape {tuple(old_param.shape)}; cannot grow it")
        else:
            new_state[key] = value
    optimizer.state[new_param] = new_state
