"""NSGD / INSGD: (Input-)Normalized SGD (Atici, Pan, Cetin: "Normalized Stochastic Gradient Descent
Training of Deep Neural Networks", arXiv 2212.09921 v1, 2022; renamed INSGD in v2 and in TMLR 2024,
OpenReview ``5TaBxctwRZ``). Spec: ``shared/algorithms/nsgd_koala_mbf_svi.md`` section 1.
Official code: ``SalihFurkan/Normalized-SGD`` (v1 ``normalized_lms_sgd.py`` @ f63cfc7, 2023
``nisgd.py``) and ``SalihFurkan/INSGD`` (``insgd.py`` @ d789f2c).

Idea (spec 1.2, NLMS): the step of each Linear/Conv2d weight is divided by the energy of that
layer's **input** (not by the error), ``w <- w - mu * grad / (eps + ||x||^2)``.

Paper algorithm (TMLR Algorithm 1, spec 1.3), per layer weight theta with layer input x_t::

    P_t = beta P_{t-1} + (1 - beta) ||x_t||_2^2          P_1 = ||x_1||_2^2   (input power)
    g_t = grad_theta f_t / f_eps(log P_t)                 f_eps(u) = max(u, eps), eps = 0.01
    g_t = g_t + lambda theta_{t-1}                        weight decay AFTER the normalisation
    b_t = gamma b_{t-1} + (1 - tau) g_t                   b_1 = g_t  (momentum gamma, dampening tau)
    theta_t = theta_{t-1} - mu b_t

Everything the update needs from the forward pass comes from forward hooks that
:meth:`NSGD.attach` installs on every ``nn.Linear``/``nn.Conv2d`` (grouped and depthwise included)
whose weight this optimizer holds. A hook reduces the layer input to the statistic below at once
(the activation itself is not kept), only while ``torch.is_grad_enabled()`` (so kNN/evaluation under
``no_grad`` and the BYOL target network, which runs under ``no_grad``, record nothing), and the
statistics of all calls between two steps (two BYOL views, gradient-accumulation micro-batches) are
averaged; ``step`` consumes and clears them. Weights with no recorded input, biases, norm
parameters and anything else: plain SGD-momentum (``torch.optim.SGD`` math, the group's
weight_decay). A stale statistic (a grad-enabled forward not followed by a step) goes into the next
step.

``norm_source`` (what "the energy of the input" is; spec 1.4-1.5). x: layer input; for a Linear,
``[..., D]`` is flattened to rows ``[N, D]`` (tokens join the batch, as ``main.py``); a Conv2d input
is ``[B, C_in, H, W]``. ``p`` picks the l1 (``|x|``) or l2-squared (``x^2``) mass:

* ``"paper"`` (default): one scalar per layer, ``n = mean_b sum_{c,h,w} |x_b|^p`` (conv) or
  ``mean_rows sum_j |x|^p`` (linear): the per-sample energy of the layer's whole input, averaged
  over the batch. The v1 figure ("x_1 = the whole input feature map") and TMLR's "input vector
  to the neuron" say the whole input; the batch mean is [RECONSTRUCTION] (the derivation is per
  sample and every code version takes a batch mean). Then the input-power EMA and
  ``D = max(log P, eps)`` (TMLR, log_clip=True).
* ``"code_v1_matrix1"`` (spec 1.4.a, v1 code): conv: per input channel,
  ``n[c] = mean_b ||X[b,c]||_{1,induced}`` (``torch.linalg.matrix_norm(ord=1)`` of each H x W map,
  max column sum), divisor ``D = n + 0.01`` broadcast as ``[1, C_in, 1, 1]`` over the weight;
  linear: ``n = max_j sum_b |X[b, j]|`` (the induced 1-norm of the whole batch matrix: it grows
  with the batch size), ``D = n + 0.01``. p = 1 only (the code has no l2 form).
* ``"insgd_standardized"`` (spec 1.4.c, ``insgd.py``): every map is standardised first,
  ``X^ = (X - mean_hw) / max(std_hw, 0.01)`` (unbiased std; a 1x1 map has NaN std, which the code
  turns into 0.001, so X^ = 0), then conv ``n[c] = mean_b sum_hw |X^[b,c]|^p`` (per input channel),
  linear (rows standardised over features) ``n = mean_rows sum_j |X^|^p + 0.1``;
  ``D = max(log n, 0.01)``. With l2 this is ``log(HW - 1)`` for any map with std > 0.01: a fixed
  per-layer LR multiplier, not a data-dependent one (spec 1.4.d).
* ``"nlms_patch"`` ([RECONSTRUCTION], spec 1.5): the faithful NLMS input of a conv output neuron is
  its receptive-field patch u_t in R^{C_in/groups * kh * kw}; ``n = mean_{b,t} sum |u_{b,t}|^p``
  (patch energy averaged over the batch and output positions; for a Linear, the row energy as in
  "paper"), ``D = eps + n`` (NLMS; log_clip=False). Computed as ``sum_b |x|^p`` (one pass over the
  input, no unfold), then a conv with a ones kernel of the layer's own kernel size, stride,
  padding, dilation and padding mode over that single ``[C, H, W]`` map (= unfold's patch sums,
  summed over positions). For grouped convs each output neuron sees only its group's channels,
  so D is per group. The NLMS step is scale-free: lr lives on the NLMS scale mu in (0, 2), far
  above SGD's.

Grouped/depthwise conv: a per-input-channel divisor ``D[c]`` (v1, insgd) is laid out over the
weight ``[C_out, C_in/G, kh, kw]`` as ``D[g(o) * C_in/G + j]`` for output o in group g(o) and
weight input slot j (``nisgd.py`` permutes to ``[C, 1, 1, 1]``, right for depthwise with
multiplier 1 only; ``insgd.py`` fails to broadcast). "paper" is one scalar per layer whatever
the groups.

Options, with the per-``norm_source`` default each resolves to when left ``None``:

==================  ===  ========  ==============  =========================  ===============
norm_source         p    log_clip  input_ema_beta  normalize_before_momentum  insgd quirk
==================  ===  ========  ==============  =========================  ===============
paper               2    True      0.9             True (TMLR Algorithm 1)    False
code_v1_matrix1     1    False     0.0             False (code order)         False
insgd_standardized  2    True      0.0             False (code order)         True (insgd.py)
nlms_patch          2    False     0.0             True                       False
==================  ===  ========  ==============  =========================  ===============

* ``eps`` (0.01 everywhere): with ``log_clip`` the floor of ``D = max(log P, eps)`` (the paper's
  ReLU-like clip that stops a negative log from flipping the step); without it the additive
  regulariser of ``D = P + eps`` (v1's ``+ 0.01``, NLMS's epsilon). Note [derived]: with the
  paper's 0.01, a layer whose input power is below e gets D < 1, i.e. up to 100x the SGD step.
  Standardised inputs (``insgd.py``) never go there (P >= ~HW - 1), raw inputs do: the last layer
  of a BN-free CNN after global pooling has P ~ 0.05, and in ``scripts/demo_nsgd.py`` that breaks
  training at lr >= 0.25 where SGD still trains; ``eps=1`` (D >= 1, never amplifies) trains
  stably up to lr 1.0 there, where SGD diverges.
* ``input_ema_beta``: beta of ``P_t = beta P_{t-1} + (1 - beta) n_t`` with ``P_1 = n_1`` (the
  paper's recursion with its ``(1 - beta)`` factor; ``nisgd.py`` used a factor 1 and never stored
  the buffer, ``insgd.py`` commented it out, so no released code runs it: code sources default to
  0, i.e. ``P_t = n_t``). The paper does not give its beta; 0.9 is the only value in any source
  (``nisgd.py`` wires the gradient momentum 0.9 in as the input momentum), and with ``P_1 = n_1``
  it needs no bias correction. The EMA is applied to the divisor statistic before the log/eps.
* ``normalize_before_momentum``: True = paper order (normalise, add weight decay, momentum);
  False = the released codes' order (``d = g + wd w``; SGD momentum of d; ``w -= lr * b / D``).
* ``insgd_bias_correction_quirk``: ``insgd.py``'s Adadelta/bias-correction block is never written
  back to the state, so every step it multiplies the normalised update by
  ``sqrt(1 + 1e-6) / (sqrt(1 - momentum) + 1e-6)`` (3.162 for momentum 0.9; spec 1.4.c). True
  reproduces that factor on the normalised weights (biases and BN parameters do not get it).
* ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``, ``lr``: as ``torch.optim.SGD``
  (first step ``b = d``). Defaults lr 0.1, momentum 0.9 (TMLR CIFAR runs; the paper uses the SGD
  baseline's lr), weight_decay 0 (the factory passes the run's).

State per parameter: ``momentum_buffer`` (as torch SGD) and, for hooked weights with beta > 0,
``input_power`` (P, ``[]`` or per channel/group); both are in the state_dict, so a resumed run
continues bit-identically. Under ``torch.distributed`` the per-layer statistics are averaged over
ranks (one all_reduce per step), so every rank divides by the same D and DDP replicas stay equal;
all ranks must record the same layers (they run the same model).

Cost. Hooks: one or two reductions over each layer input per forward (``vector_norm`` for
"paper"). Step: the divisors of all layers in a few multi-tensor kernels, then the SGD-momentum
update with one division by a per-tensor divisor. Code paths (no ``.item()``, no host sync):

* compiled (CPU default from ``_compile.COMPILE_MIN_NUMEL`` (4M) parameters with a gradient,
  ``compile=True`` anywhere): the per-tensor loop :func:`_nsgd_loop` under ``torch.compile``;
  Inductor fuses each tensor's update into one pass. As :mod:`ssl_suite.optim.lars`: compiled
  once per process, eager if compiling fails.
* fused (default otherwise on CPU and CUDA): ``torch._fused_sgd_`` (torch SGD's one-pass kernel)
  over the plain tensors in one call; hooked weights first get ``g / D`` (one foreach division on
  accelerators, a reused scratch buffer per tensor on the CPU) or, in code order with a scalar
  D, the step size ``lr * c / D`` as a device tensor; a per-channel D in code order takes the loop.
* ``foreach=True``: multi-tensor kernels; ``foreach=False``: the per-tensor loop, eager.

The closure is called once per step.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from ._compile import CompiledLoop, wants_compile
from .protocol import Handle

NORM_SOURCES = ("paper", "code_v1_matrix1", "insgd_standardized", "nlms_patch")

#: what each option resolves to when left None (see the module docstring's table)
SOURCE_DEFAULTS = {
    "paper": dict(p=2, log_clip=True, input_ema_beta=0.9, normalize_before_momentum=True,
                  insgd_bias_correction_quirk=False),
    "code_v1_matrix1": dict(p=1, log_clip=False, input_ema_beta=0.0,
                            normalize_before_momentum=False, insgd_bias_correction_quirk=False),
    "insgd_standardized": dict(p=2, log_clip=True, input_ema_beta=0.0,
                               normalize_before_momentum=False, insgd_bias_correction_quirk=True),
    "nlms_patch": dict(p=2, log_clip=False, input_ema_beta=0.0, normalize_before_momentum=True,
                       insgd_bias_correction_quirk=False),
}

_INSGD_LINEAR_OFFSET = 0.1   # insgd.py: norm_input = mean(...) + 0.1 for Linear layers
_STD_FLOOR = 0.01            # insgd.py / nisgd.py: clamp(std, min=0.01)


def insgd_quirk_factor(momentum: float) -> float:
    """``insgd.py``'s constant factor: sqrt(acc_delta + 1e-6) / (sqrt(1 - momentum^step) + 1e-6)
    with acc_delta = 1 and step = 1 every step (its state is never written back)."""
    return math.sqrt(1.0 + 1e-6) / (math.sqrt(1.0 - momentum) + 1e-6)


# ----------------------------------------------------------------------------- statistics
class _Layer:
    """A hooked Linear/Conv2d: its weight, parameter group, and the statistic of this step."""

    __slots__ = ("module", "weight", "kind", "group_index", "name", "acc", "calls", "n0")

    def __init__(self, module: nn.Module, weight: Tensor, kind: str, group_index: int, name: str):
        self.module, self.weight, self.kind = module, weight, kind
        self.group_index, self.name = group_index, name
        self.acc: Optional[Tensor] = None   # sum over calls of statistic * n0 / n
        self.calls = 0
        self.n0 = 1.0


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mass(x: Tensor, p: int, dim=None) -> Tensor:
    """sum |x|^p over ``dim`` (all if None) in one pass, no temporary of x's size."""
    n = torch.linalg.vector_norm(x, ord=p, dim=dim, dtype=_stat_dtype(x))
    return n.square() if p == 2 else n


def _standardized_mass(x: Tensor, dims: tuple, p: int) -> Tensor:
    """``insgd.py``: sum over ``dims`` of |(x - mean) / max(std, 0.01)|^p (unbiased std; where the
    std is undefined, a single element, x - mean = 0 and the sum is 0)."""
    x = x.to(_stat_dtype(x))
    count = math.prod(x.shape[d] for d in dims)
    if count < 2:
        reduced = {k % x.dim() for k in dims}
        return x.new_zeros([n for k, n in enumerate(x.shape) if k not in reduced])
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=1)
    if p == 2:  # sum (x - m)^2 = (count - 1) var;  / max(std, 0.01)^2
        out = var * (count - 1) / var.clamp_min(_STD_FLOOR ** 2)
    else:
        out = (x - mean).abs().sum(dims, keepdim=True) / var.sqrt().clamp_min(_STD_FLOOR)
    return out.squeeze(dims)


def _patch_energy(conv: nn.Conv2d, x: Tensor, p: int) -> tuple[Tensor, float]:
    """Sum over the batch and the output positions of each receptive-field patch's |x|^p mass,
    per group (``[G]``, ``[]`` for G = 1), and the count B * H_out * W_out."""
    e = _mass(x, p, dim=0)                                       # [C, H, W] = sum_b |x|^p
    groups = conv.groups
    if groups > 1:
        e = e.view(groups, e.shape[0] // groups, *e.shape[1:]).sum(1)
    else:
        e = e.sum(0, keepdim=True)                               # [G, H, W]
    e = e.unsqueeze(0)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        e = F.pad(e, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    ones = e.new_ones(groups, 1, *conv.kernel_size)
    win = F.conv2d(e, ones, None, conv.stride, padding, conv.dilation, groups)  # [1, G, Ho, Wo]
    s = win.sum((0, 2, 3))
    return (s if groups > 1 else s.reshape(())), float(x.shape[0] * win.shape[2] * win.shape[3])


def _statistic(layer: _Layer, x: Tensor, source: str, p: int) -> tuple[Tensor, float]:
    """The reduced input statistic of one forward call as ``(S, N)``: the step's statistic is the
    mean over calls of ``S / N`` (N = rows/samples/positions it averages over)."""
    if layer.kind == "linear":
        x = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        rows = float(x.shape[0])
        if source == "code_v1_matrix1":
            return torch.linalg.matrix_norm(x.to(_stat_dtype(x)), ord=1), 1.0
        if source == "insgd_standardized":
            return _standardized_mass(x, (1,), p).sum(), rows
        return _mass(x, p), rows                                 # paper, nlms_patch
    if x.dim() == 3:                                             # unbatched conv input
        x = x.unsqueeze(0)
    batch = float(x.shape[0])
    if source == "paper":
        return _mass(x, p), batch
    if source == "code_v1_matrix1":
        return torch.linalg.matrix_norm(x.to(_stat_dtype(x)), ord=1, dim=(-2, -1)).sum(0), batch
    if source == "insgd_standardized":
        return _standardized_mass(x, (-2, -1), p).sum(0), batch
    return _patch_energy(layer.module, x, p)                     # nlms_patch


def _layout(layer: _Layer, d: Tensor, source: str) -> Tensor:
    """The divisor laid out to broadcast over the weight ``[C_out, C_in/G, kh, kw]``."""
    if d.dim() == 0:
        return d
    w = layer.weight
    c_out, c_in_g = w.shape[0], w.shape[1]
    groups = layer.module.groups
    if source == "nlms_patch":                                   # [G]: one per group
        return d.repeat_interleave(c_out // groups).view(c_out, 1, 1, 1)
    if groups == 1:                                              # [C_in] -> [1, C_in, 1, 1]
        return d.view(1, c_in_g, 1, 1)
    return (d.view(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g)
            .reshape(c_out, c_in_g, 1, 1))


class _Forget:
    """Part of the attach handle: drops the layers from the optimizer's registry on remove()."""

    def __init__(self, opt: "NSGD", layers: list):
        self.opt, self.layers = opt, layers

    def remove(self) -> None:
        ids = {id(layer) for layer in self.layers}
        self.opt._layers = [layer for layer in self.opt._layers if id(layer) not in ids]
        self.layers = []


# ----------------------------------------------------------------------------- update loops
def _nsgd_loop(work, scratch: Optional[dict] = None) -> None:
    """The update, one tensor at a time (compiled: one fused pass per tensor). ``work``: per
    bucket ``(params, grads, bufs, divs, hyper, has_wd, has_momentum, nesterov, norm_first)``,
    ``divs[i]`` a divisor tensor or None (plain SGD), ``bufs`` None without momentum,
    ``hyper = tensor([-lr, -lr * c, wd, a, b, momentum])`` with ``b_t = a b_{t-1} + b d``
    (a = momentum, b = 1 - dampening; a = 0, b = 1 on a buffer's first step)."""
    for params, grads, bufs, divs, hyper, has_wd, has_momentum, nesterov, norm_first in work:
        neg_lr, neg_lr_c, wd, a, b, mu = hyper.unbind()
        for i, (w, g) in enumerate(zip(params, grads)):
            dv = divs[i]
            out = None if scratch is None else scratch[w.device, w.dtype][:w.numel()].view_as(w)
            d = g
            if dv is not None and norm_first:
                d = torch.div(g, dv, out=out) if out is not None else g / dv     # g / D
                if has_wd:
                    d.addcmul_(w, wd)                                           # + wd w
            elif has_wd:
                d = torch.addcmul(g, w, wd, out=out) if out is not None else torch.addcmul(g, w, wd)
            if has_momentum:
                m = bufs[i]
                m.mul_(a).addcmul_(d, b)                                        # a m + b d
                if nesterov:
                    if d is g:
                        u = (torch.addcmul(g, m, mu, out=out) if out is not None
                             else torch.addcmul(g, m, mu))
                    else:
                        u = d.addcmul_(m, mu)                                   # d + mu m
                else:
                    u = m
            else:
                u = d
            if dv is None:
                w.addcmul_(u, neg_lr)
            elif norm_first:
                w.addcmul_(u, neg_lr_c)
            else:
                w.addcmul_(u, neg_lr_c / dv)                                    # - lr c u / D


_COMPILED = CompiledLoop(_nsgd_loop, "NSGD")


def _nsgd_foreach(params, grads, bufs, divs, *, lr: float, c: float, wd: float, momentum: float,
                  dampening: float, first: bool, nesterov: bool, norm_first: bool) -> None:
    """The same update as multi-tensor kernels (few launches on a GPU); the divisions by the
    per-tensor divisors are one foreach call over the hooked weights."""
    ni = [i for i, dv in enumerate(divs) if dv is not None]
    pi = [i for i, dv in enumerate(divs) if dv is None]
    pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
    if norm_first and ni:
        d = list(grads)
        q = torch._foreach_div(pick(grads, ni), pick(divs, ni))                # g / D
        if wd:
            torch._foreach_add_(q, pick(params, ni), alpha=wd)
        for j, i in enumerate(ni):
            d[i] = q[j]
        if wd and pi:
            for j, t in enumerate(torch._foreach_add(pick(grads, pi), pick(params, pi), alpha=wd)):
                d[pi[j]] = t
    else:
        d = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
    if bufs is not None:
        if first:
            torch._foreach_copy_(bufs, d)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d, alpha=1.0 - dampening)
        u = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    else:
        u = d
    if pi:
        torch._foreach_add_(pick(params, pi), pick(u, pi), alpha=-lr)
    if ni:
        if norm_first:
            torch._foreach_add_(pick(params, ni), pick(u, ni), alpha=-lr * c)
        else:
            torch._foreach_addcdiv_(pick(params, ni), pick(u, ni), pick(divs, ni), value=-lr * c)


_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_ok(params) -> bool:
    return params[0].device.type in _FUSED_DEVICES and params[0].dtype in _FUSED_DTYPES


def _nsgd_fused(params, grads, bufs, divs, *, lr: float, c: float, wd: float, momentum: float,
                dampening: float, first: bool, nesterov: bool, norm_first: bool,
                scratch: Optional[dict]) -> None:
    """The update through ``torch._fused_sgd_`` (one pass over w, g, b per tensor, torch SGD's
    exact math): plain tensors in one call; hooked weights get ``g / D`` first (paper order) or
    a step size ``lr * c / D`` (code order, scalar D; a per-channel D takes the per-tensor loop)."""
    ni = [i for i, dv in enumerate(divs) if dv is not None]
    pi = [i for i, dv in enumerate(divs) if dv is None]
    kw = dict(weight_decay=wd, momentum=momentum, dampening=dampening, nesterov=nesterov,
              maximize=False, is_first_step=first and bufs is not None)

    def call(idx, grads_, lr_):
        torch._fused_sgd_([params[i] for i in idx], grads_,
                          [] if bufs is None else [bufs[i] for i in idx], lr=lr_, **kw)

    if pi:
        call(pi, [grads[i] for i in pi], lr)
    if not ni:
        return
    if norm_first:                                             # d = g / D, then SGD(wd, momentum)
        if scratch is None:                                    # accelerators: one foreach call
            call(ni, torch._foreach_div([grads[i] for i in ni], [divs[i] for i in ni]), lr * c)
        else:                                                  # CPU: one tensor at a time, in cache
            for i in ni:
                w = params[i]
                d = torch.div(grads[i], divs[i],
                              out=scratch[w.device, w.dtype][:w.numel()].view_as(w))
                call([i], [d], lr * c)
        return
    loop = []
    for i in ni:                                               # w -= (lr c / D) * SGD buffer
        if divs[i].dim() == 0:
            call([i], [grads[i]], (lr * c) / divs[i])
        else:
            loop.append(i)
    if loop:
        a, b = (0.0, 1.0) if first else (momentum, 1.0 - dampening)
        ref = params[loop[0]]
        hyper = torch.tensor([-lr, -lr * c, wd, a, b, momentum], device=ref.device,
                             dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
        pick = lambda seq: None if seq is None else [seq[i] for i in loop]  # noqa: E731
        _nsgd_loop([(pick(params), pick(grads), pick(bufs), pick(divs), hyper, wd != 0,
                     bufs is not None, nesterov, False)], scratch)


# ----------------------------------------------------------------------------- optimizer
class NSGD(Optimizer):
    """Input-normalised SGD (NSGD v1 / INSGD, TMLR Algorithm 1); see the module docstring.

    Args:
        params: parameters or parameter groups (unknown group keys are ignored).
        lr: mu, the learning rate (a scheduler may change ``group["lr"]`` every step).
        momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD`` (gamma, tau, lambda).
        norm_source: "paper" (default), "code_v1_matrix1", "insgd_standardized", "nlms_patch".
        p: 1 (l1 mass) or 2 (l2 squared); None: the source's default.
        eps: 0.01; the log clip floor (``log_clip``) or the additive term.
        log_clip: ``D = max(log P, eps)`` (True) or ``D = P + eps`` (False); None: per source.
        input_ema_beta: beta of the input-power EMA, 0 <= beta < 1 (0: no EMA); None: per source.
        normalize_before_momentum: paper order (True) or code order (False); None: per source.
        insgd_bias_correction_quirk: multiply normalised updates by insgd.py's constant
            1/sqrt(1-momentum) factor; None: per source (True for "insgd_standardized").
        foreach: None: fused kernels where torch has them (CPU, CUDA), else foreach off the CPU;
            True: eager multi-tensor kernels; False: the eager per-tensor loop.
        compile: ``torch.compile`` the per-tensor loop; None: on the CPU from
            ``_compile.COMPILE_MIN_NUMEL`` parameters with a gradient. Not in the state_dict.

    Call :meth:`attach` (or ``protocol.attach``) once with the model before training.
    """

    supports_growth = False   # input statistics per layer (per input channel in the v1 form)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *,
                 norm_source: str = "paper", p: Optional[int] = None, eps: float = 0.01,
                 log_clip: Optional[bool] = None, input_ema_beta: Optional[float] = None,
                 normalize_before_momentum: Optional[bool] = None,
                 insgd_bias_correction_quirk: Optional[bool] = None,
                 foreach: Optional[bool] = None, compile: Optional[bool] = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, norm_source=norm_source, p=p, eps=eps,
                        log_clip=log_clip, input_ema_beta=input_ema_beta,
                        normalize_before_momentum=normalize_before_momentum,
                        insgd_bias_correction_quirk=insgd_bias_correction_quirk, foreach=foreach)
        _resolve(dict(defaults))  # validate the defaults even if every group overrides them
        super().__init__(params, defaults)
        self.compile = compile
        self._layers: list[_Layer] = []
        self._scratch: dict = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("compile", None)
        self.__dict__.setdefault("_layers", [])
        self.__dict__.setdefault("_scratch", {})

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _resolve(self.param_groups[-1])

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> Handle:
        """Forward hooks on every ``nn.Linear``/``nn.Conv2d`` of ``model`` (the raw module, not a
        DDP wrapper) whose weight is one of this optimizer's parameters. Returns a
        :class:`~ssl_suite.optim.protocol.Handle`; ``remove()`` removes the hooks and forgets the
        layers (their weights then take plain SGD-momentum steps)."""
        group_of = {id(w): gi for gi, g in enumerate(self.param_groups) for w in g["params"]}
        have = {id(layer.weight) for layer in self._layers}
        handle, added = Handle(), []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Conv2d):
                kind = "conv"
            elif isinstance(mod, nn.Linear):
                kind = "linear"
            else:
                continue
            w = mod.weight
            if not isinstance(w, Tensor) or id(w) not in group_of or id(w) in have:
                continue
            have.add(id(w))
            layer = _Layer(mod, w, kind, group_of[id(w)], name)
            added.append(layer)
            handle.add(mod.register_forward_hook(functools.partial(self._hook, layer)))
        self._layers.extend(added)
        handle.add(_Forget(self, added))
        return handle

    def _hook(self, layer: _Layer, module: nn.Module, inputs, output) -> None:
        if not torch.is_grad_enabled() or not inputs or not layer.weight.requires_grad:
            return
        x = inputs[0]
        if not isinstance(x, Tensor):
            return
        group = self.param_groups[layer.group_index]
        x = x.detach()
        if torch.is_autocast_enabled(x.device.type):   # statistics in float32, not half
            with torch.autocast(x.device.type, enabled=False):
                s, n = _statistic(layer, x, group["norm_source"], group["p"])
        else:
            s, n = _statistic(layer, x, group["norm_source"], group["p"])
        if layer.calls == 0:
            layer.acc, layer.n0 = s, n
        else:
            layer.acc.add_(s if n == layer.n0 else s * (layer.n0 / n))
        layer.calls += 1

    # ------------------------------------------------------------------ divisors
    def _take_divisors(self) -> dict:
        """id(weight) -> D laid out over the weight, from this step's statistics (then cleared);
        updates the input-power EMA of the weights that have a gradient."""
        layers = [layer for layer in self._layers if layer.calls]
        if not layers:
            return {}
        stats = [layer.acc for layer in layers]
        torch._foreach_mul_(stats, [1.0 / (layer.calls * layer.n0) for layer in layers])
        for layer in layers:
            layer.acc, layer.calls = None, 0
        groups = [self.param_groups[layer.group_index] for layer in layers]
        for s, layer, g in zip(stats, layers, groups):
            if layer.kind == "linear" and g["norm_source"] == "insgd_standardized":
                s.add_(_INSGD_LINEAR_OFFSET)
        stats = _all_reduce_mean(stats)
        # EMA and divisor, in multi-tensor calls per (beta, log_clip, eps)
        keep = [i for i, layer in enumerate(layers) if layer.weight.grad is not None]
        by_rule: dict[tuple, list[int]] = {}
        for i in keep:
            g = groups[i]
            by_rule.setdefault((g["input_ema_beta"], g["log_clip"], g["eps"]), []).append(i)
        out = {}
        for (beta, log_clip, eps), idx in by_rule.items():
            powers = []
            if beta > 0:
                old, new = [], []
                for i in idx:
                    state = self.state[layers[i].weight]
                    prev = state.get("input_power")
                    if prev is None or prev.shape != stats[i].shape:
                        state["input_power"] = stats[i]                 # P_1 = n_1
                    else:
                        old.append(prev)
                        new.append(stats[i])
                    powers.append(state["input_power"])
                if old:
                    torch._foreach_lerp_(old, new, 1.0 - beta)          # beta P + (1 - beta) n
            else:
                powers = [stats[i] for i in idx]
            if log_clip:
                divs = torch._foreach_log(powers)
                torch._foreach_clamp_min_(divs, eps)                    # max(log P, eps)
            else:
                divs = torch._foreach_add(powers, eps)                  # P + eps
            for i, dv in zip(idx, divs):
                w = layers[i].weight
                out[id(w)] = _layout(layers[i], dv, groups[i]["norm_source"]).to(w.dtype)
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One update; ``closure`` (zero-grad, forward, backward, return the per-sample losses)
        is called once. Returns what the closure returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        divisors = self._take_divisors()
        work = []   # (group, first, params, grads, bufs, divs)
        for group in self.param_groups:
            has_momentum = group["momentum"] != 0
            buckets: dict[tuple, tuple] = {}
            for w in group["params"]:
                if w.grad is None:
                    continue
                if w.grad.is_sparse:
                    raise RuntimeError("NSGD does not support sparse gradients")
                buf, first = None, False
                if has_momentum:
                    state = self.state[w]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(
                            w, memory_format=torch.preserve_format)
                        first = True
                b = buckets.setdefault((first, w.device, w.dtype), ([], [], [], []))
                b[0].append(w)
                b[1].append(w.grad)
                b[2].append(buf)
                b[3].append(divisors.get(id(w)))
            for (first, _, _), (params, grads, bufs, divs) in buckets.items():
                work.append((group, first, params, grads, bufs if has_momentum else None, divs))
        if work and not (self._wants_compile(work) and self._step_compiled(work)):
            self._step_eager(work)
        return loss

    @staticmethod
    def _coefficients(group: dict, first: bool) -> tuple:
        mom = group["momentum"]
        c = insgd_quirk_factor(mom) if group["insgd_bias_correction_quirk"] else 1.0
        a, b = (0.0, 1.0) if first else (mom, 1.0 - group["dampening"])
        return c, a, b

    def _args(self, group: dict, first: bool, params, grads, bufs, divs) -> tuple:
        c, a, b = self._coefficients(group, first)
        ref = params[0]
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        lr = group["lr"]
        hyper = torch.tensor([-lr, -lr * c, group["weight_decay"], a, b, group["momentum"]],
                             dtype=dtype, device=ref.device)
        return (params, grads, bufs, divs, hyper, group["weight_decay"] != 0, bufs is not None,
                bool(group["nesterov"]), bool(group["normalize_before_momentum"]))

    def _wants_compile(self, work) -> bool:
        return wants_compile(self.compile, (p for w in work for p in w[2]))

    def _step_compiled(self, work) -> bool:
        """True when the compiled loop did the step; False (after one warning) when compiling
        fails: this optimizer then stays eager."""
        if _COMPILED([self._args(*w) for w in work]):
            return True
        self.compile = False
        return False

    def _step_eager(self, work) -> None:
        for group, first, params, grads, bufs, divs in work:
            foreach = group["foreach"]
            if foreach is None and _fused_ok(params):
                c, _, _ = self._coefficients(group, first)
                cpu = params[0].device.type == "cpu"
                _nsgd_fused(params, grads, bufs, divs, lr=group["lr"], c=c,
                            wd=group["weight_decay"], momentum=group["momentum"],
                            dampening=group["dampening"], first=first,
                            nesterov=bool(group["nesterov"]),
                            norm_first=bool(group["normalize_before_momentum"]),
                            scratch=self._scratch_for(params) if cpu else None)
                continue
            if foreach is None:
                foreach = params[0].device.type != "cpu"
            if foreach:
                c, _, _ = self._coefficients(group, first)
                _nsgd_foreach(params, grads, bufs, divs, lr=group["lr"], c=c,
                              wd=group["weight_decay"], momentum=group["momentum"],
                              dampening=group["dampening"], first=first,
                              nesterov=bool(group["nesterov"]),
                              norm_first=bool(group["normalize_before_momentum"]))
            else:
                _nsgd_loop([self._args(group, first, params, grads, bufs, divs)],
                           self._scratch_for(params))

    def _scratch_for(self, params) -> dict:
        for w in params:
            key = (w.device, w.dtype)
            if key not in self._scratch or self._scratch[key].numel() < w.numel():
                self._scratch[key] = torch.empty(w.numel(), dtype=w.dtype, device=w.device)
        return self._scratch


def _all_reduce_mean(stats: list) -> list:
    """Average the statistics over ranks (one all_reduce) under torch.distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return stats
    flat = torch.cat([s.reshape(-1).to(torch.float64 if s.dtype == torch.float64
                                       else torch.float32) for s in stats])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    return [v.view(s.shape).to(s.dtype) for v, s in zip(flat.split([s.numel() for s in stats]),
                                                         stats)]


def _resolve(group: dict) -> None:
    """Fill the per-source defaults of a group's None options and validate it (one-line
    ValueErrors naming the argument)."""
    source = group.get("norm_source", "paper")
    if source not in NORM_SOURCES:
        raise ValueError(f"NSGD: norm_source must be one of {', '.join(NORM_SOURCES)}, "
                         f"got {source!r}")
    for key, value in SOURCE_DEFAULTS[source].items():
        if group.get(key) is None:
            group[key] = value
    if group["p"] not in (1, 2):
        raise ValueError(f"NSGD: p must be 1 or 2, got {group['p']!r}")
    if source == "code_v1_matrix1" and group["p"] != 1:
        raise ValueError("NSGD: p must be 1 for norm_source='code_v1_matrix1' (the v1 code's "
                         "induced matrix 1-norm has no l2 form)")
    lr = group.get("lr")
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"NSGD: lr must be a number >= 0, got {lr!r}")
    if group["momentum"] < 0:
        raise ValueError(f"NSGD: momentum must be >= 0, got {group['momentum']}")
    if not 0 <= group["dampening"] <= 1:
        raise ValueError(f"NSGD: dampening must be in [0, 1], got {group['dampening']}")
    if group["weight_decay"] < 0:
        raise ValueError(f"NSGD: weight_decay must be >= 0, got {group['weight_decay']}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("NSGD: nesterov needs momentum > 0 and dampening = 0")
    if not 0 <= group["input_ema_beta"] < 1:
        raise ValueError(f"NSGD: input_ema_beta must be in [0, 1), got {group['input_ema_beta']}")
    if group["log_clip"] and not group["eps"] > 0:
        raise ValueError(f"NSGD: eps must be > 0 with log_clip (it floors log P), got "
                         f"{group['eps']}")
    if not group["log_clip"] and group["eps"] < 0:
        raise ValueError(f"NSGD: eps must be >= 0, got {group['eps']}")
    if group["insgd_bias_correction_quirk"] and group["momentum"] >= 1:
        raise ValueError("NSGD: insgd_bias_correction_quirk needs momentum < 1")
