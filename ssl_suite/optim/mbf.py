"""MBF: Mini-Block Fisher (Bahamou, Goldfarb, Ren, AISTATS 2023, PMLR 206:9191-9220,
arXiv 2202.04124; v1 "A Mini-Block Natural Gradient Method for Deep Neural Networks").
Spec: ``shared/algorithms/nsgd_koala_mbf_svi.md`` section 3.

[RECONSTRUCTION] -- READ THIS FIRST. The paper's text could not be read and no official code was
found. What is certain (spec 3.1, from the abstracts): a preconditioned stochastic gradient whose
preconditioner is a block-diagonal approximation of the *empirical Fisher*, one block per layer,
each layer block itself block-diagonal with many *mini-blocks of modest size* for both conv and
FC layers, the mini-blocks processed in parallel (batched), per-iteration cost "only slightly
higher" than first-order methods. EVERYTHING ELSE HERE -- the block definitions, the EMA, the
damping, the schedules, momentum, weight decay and every default -- is the spec's reconstruction
(3.2/3.3) in the conventions of the authors' group (K-FAC / K-BFGS / TNT code), not the paper.
Open questions to settle against the PMLR PDF or arXiv v4 before calling this a reproduction
(spec 3.5):

  (i)   the FC mini-block definition (here: one block per output row with the bias as an appended
        input column, R1; rows cut into chunks, R2; or the K-FAC-style factorisation, R3);
  (ii)  the conv mini-block (here: one block per (out, in) kernel slice, size k_h k_w; the
        per-filter reading, size C_in k_h k_w, is ``conv_block="filter"``);
  (iii) the hyper-parameters (damping lambda, curvature decay beta, T_cov, T_inv, lr).

The method (spec 3.2). For a mini-block theta_m of a layer, with per-sample gradients
G_n = grad_{theta_m} l_n over the samples n = 1..M of the step::

    F_hat_m  = (1/M) sum_n G_n G_n^T                     empirical Fisher of the mini-block
    F_m     <- beta F_m + (1 - beta) F_hat_m              every ``t_cov`` steps (F = F_hat at first)
    Minv_m  <- (F_m + lambda I)^{-1}                      every ``t_inv`` steps, batched Cholesky
    p_m      = Minv_m g_m                                 every step, g = minibatch gradient
    m       <- mu m + p ;   w <- w - lr (m + wd w)       (``weight_decay_mode="decoupled"``, spec)
                           or p = Minv (g + wd w)         (``weight_decay_mode="l2"``)

Mini-blocks (all mini-blocks of a layer live in one tensor and are inverted and applied by single
batched ops; see "Storage and kernels" below for its layout):

* ``nn.Conv2d`` weight ``[C_out, C_in/groups, k_h, k_w]``. ``conv_block="kernel"`` (default, the
  spec's "most likely reading"): one d = k_h k_w block per (o, i); curvature memory is k_h k_w x
  the weight. ``"filter"``: one d = C_in k_h k_w block per output channel (K-FAC sized for wide
  layers). Per-sample gradients: ``unfold`` the layer input to U_n ``[C_in k_h k_w, T]``, take
  Delta_n = grad_output_n ``[C_out, T]``, G_n = Delta_n U_n^T (a bmm over samples), then
  F_hat = einsum('npd,npe->pde'), in chunks of samples so that the transient per-sample tensors
  stay under ``sample_chunk_numel`` elements. The conv bias (if any) gets diagonal (1 x 1) blocks.
* ``nn.Linear`` weight ``[m_out, m_in]`` (+ bias, appended as a ones column of the input,
  a~ = [a, 1]): ``linear_block="row"`` (R1): one block of size m_in+1 per output row,
  F_hat_o = (1/M) sum_n delta_{n,o}^2 a~_n a~_n^T (one GEMM); ``"chunk"`` (R2): every row
  (with its bias entry) cut into chunks of ``chunk_size`` (zero-padded at the end; the padded
  coordinates have zero curvature and zero gradient, so they change nothing); ``"kfac"`` (R3):
  F_hat_o ~= E[delta_o^2] E[a~ a~^T], inverted with one eigendecomposition per layer;
  ``"auto"``: R1 when m_in <= 256 (spec) *and* the R1 curvature has at most 2^24 elements
  (64 MiB in fp32; a guard not in the spec, so that e.g. BYOL's 256 -> 4096 predictor does not
  get a 1 GiB block), else R2. Inputs with extra dims ``[B, ..., m_in]``: the per-sample gradient
  sums over the middle dims (R1/R2); R3 treats every row as a token-level sample.
* BatchNorm affine parameters: diagonal mini-blocks, the per-sample squared-gradient mean, from
  x_hat (recomputed from the layer input with the statistics the forward pass used) and
  grad_output: g_n(gamma_c) = sum_s delta_{n,c,s} x_hat_{n,c,s}, g_n(beta_c) = sum_s delta_{n,c,s}.
  (With batch statistics these "per-sample" terms are the summands of the minibatch gradient,
  not gradients of l_n alone; SyncBatchNorm uses the local statistics.)
* Every other parameter (LayerNorm/GroupNorm affine, Conv1d/3d, embeddings, any module whose
  forward is not exactly ``nn.Linear.forward``/``nn.Conv2d.forward``, e.g. timm's Conv2dSame or
  StdConv2d): diagonal blocks from an EMA of the squared *minibatch* gradient g^2 (no per-sample
  information; g^2 underestimates E[g_n^2] by the gradient variance -- documented approximation).

Per-sample scaling. With a closure that backpropagates ``losses.mean()`` (divided by the number of
micro-batches under gradient accumulation), the hooks see grad_output = (1/M) d l_n / d z_n with
M = the number of samples (rows of dim 0) that passed through the layer during the step, summed
over all calls. We take G_n = M x (the sample's share of the gradient), i.e. grad_output x M,
so that the mean of the per-row gradients over the whole step is exactly the minibatch gradient;
for a single call this is "grad_output x rows in the call". With k micro-batches of loss/k it is
the per-sample Fisher of the whole step's batch. In BYOL the online network's forward runs twice
per micro-batch (two views): each view of each image is a sample (M = 2N rows); the loss is the sum
of the two views' terms averaged over N images, so G_row = 2 x (gradient through that view).

Hooks (``attach(model)``). A forward hook on every ``nn.Linear``/``nn.Conv2d``/BatchNorm whose
parameters are in the optimizer. It returns at once unless grad is enabled, the output requires
grad and the curvature is due (the step counter is a multiple of ``t_cov``): on other steps and
under ``torch.no_grad()`` (kNN, evaluation, the EMA target) a hook costs one Python call. When due,
it registers a *tensor* hook on the layer output, which receives grad_output during backward and
accumulates the per-sample statistics (summed over all calls of the step: views, micro-batches).
A tensor hook rather than ``register_full_backward_hook``: the full backward hook wraps outputs in
a view that timm's ResNet then modifies in place (``x += shortcut``, inplace ReLU after BN), which
raises in autograd; a tensor hook registered before the in-place op gets the gradient with respect
to the layer's own output, and costs nothing on steps without curvature.

Other details (all [RECONSTRUCTION]):

* Cholesky failures (``info != 0``): the failing mini-blocks are retried with 10x, 100x, ... the
  damping (up to 1e6 x), then fall back to diagonal 1/(diag F + lambda).
* Under ``torch.distributed`` the accumulated statistics are summed over ranks (one all-reduce per
  layer every ``t_cov`` steps), so that every replica keeps the same preconditioner.
* Step 0 is a curvature and an inverse step. A layer without curvature yet (no hook fired) is
  preconditioned with 1/lambda (a one-time warning names it).
* Storage and kernels (how, not what: the same math up to float rounding). On the CPU (float32
  and float64) a C kernel forms the per-sample outer products of blocks of size d <= 16 on
  curvature steps (for 3x3 kernel blocks a batched 9x n by n x 9 GEMM was the bulk of a curvature
  step), and three more do the work of layers with blocks of size d <= 64: the Fisher EMA
  (one pass over the hooks' [P, d, d] statistics), the inverse (a batched Cholesky, U^{-1},
  U^{-1} U^{-T}; the failure test and fallback above) and p = Minv g, which for a conv weight is
  fused with the L2 term, the momentum and the update, so that a step reads each inverse block
  once and a weight, its gradient and momentum once (10 floats per 3x3 weight; fused AdamW: 7).
  They keep F and Minv in *tiles* of 8 consecutive blocks, ``[ceil(P/8), d(d+1)/2, 8]``: every
  symmetric block once (F: its lower triangle, the one Cholesky reads; Minv: its upper), entry t
  of the 8 blocks side by side, so each operation is a vector op over the 8 blocks of a tile
  (AVX2 for float) and each tensor is read front to back; they run on torch's OpenMP threads.
  They are compiled on first use with the system C compiler (``CC``, else ``cc``/``gcc``/
  ``clang``; ``-O3 -march=native -fopenmp``) into ``$SSL_SUITE_CACHE`` (default
  ``~/.cache/ssl_suite``), keyed by source, compiler and CPU, checked against torch on random
  blocks, and loaded with ctypes. Elsewhere (no compiler: one warning; ``native=False``;
  ``SSL_SUITE_MBF_NATIVE=0``; other devices and dtypes) torch ops do it with F ``[P, d, d]`` and
  Minv blocks-last ``[d, d, P]`` (p = Minv g as d multiply-adds over contiguous rows, 4x faster
  than ``bmm`` of 9x9 blocks on a CPU; ``torch.compile`` of the product was slower still).
  Larger blocks are ``[P, d, d]`` (``matmul``) on both paths. A state in the other path's layout
  (a checkpoint from the other one) is converted (F) or recomputed (Minv) on first use;
  ``block_fisher(w)`` and ``block_inverse(w)`` return ``[P, d, d]`` blocks for inspection. The
  hooks accumulate into the previous curvature step's statistics buffer and the kernels write the
  inverse into the previous one: on a CPU a fresh multi-100 MB tensor costs page faults (~0.5
  ms/MB on the machine measured) and freeing one costs unmapping.
* ``damping`` and ``beta`` of a layer come from the parameter group of its weight (the factory puts
  biases in another group); ``t_cov``, ``t_inv`` and the block structure are global.
* State: per weight ``fisher`` (F) and ``inverse`` (layouts above); per parameter
  ``momentum_buffer``; diagonal parameters ``fisher``/``inverse`` of their own shape; R3:
  ``fisher_A``, ``fisher_D``, ``eig_Q``, ``eig_L``. The global step counter is
  ``state_dict()["mbf_step"]``.

Cost (``scripts/bench_optim_step.py --part step --only mbf``: ``optimizer.step()`` on timm's
ResNet-18, 11.7M parameters, 2 CPU threads, other jobs on the machine; C kernels). A plain step
moves ~500 MB (the 3x3 inverses: 45 floats per 9 weights; fused AdamW: ~330 MB) and takes
~21-25 ms against fused AdamW's ~9-11 ms (~2.2x); a curvature step adds ~75 ms (the EMA pass
over the hooks' 1.4M 9x9 statistics, ~40 ms, and freeing them); the inverse of all 1.4M blocks
~60 ms (torch's batched Cholesky: ~2.5 s). Over the ``t_cov=10``/``t_inv=100`` cycle: 2.9-3.5x
fused AdamW (with torch ops only: ~9-11x, as before the kernels). Whole training step of that
benchmark (``--part train``, batch 32 of 64x64): 1.3x SGD-momentum.

Defaults [RECONSTRUCTION]: momentum 0.9, beta 0.9, ``t_cov=10``, ``t_inv=100`` (the group's
K-FAC/TNT CNN convention: curvature every 10, inverses every 100 iterations), damping 0.01 (spec
range 1e-3..1e-1; chosen on the digits CNN of ``scripts/demo_mbf.py``), lr 0.01 (same),
``chunk_size=32`` (spec range 32..128; the per-step preconditioning reads (chunk_size + 1) / 2
floats per weight). The closure is called once per step.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _native
from .protocol import Handle

_TILE = 8                        # blocks per tile of the inverse (the C kernels' LANES)
_TILE_MAX_D = 64                 # inverse stored in tiles up to this block size (<= C DMAX = 64)
_ROW_MAX_NUMEL = 1 << 24         # "auto": R1 only while out * (in+1)^2 stays below this
_AUTO_ROW_MAX_IN = 256           # "auto": R1 when in_features <= 256 (spec 3.2)
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class _Layer:
    """A hooked module: geometry of its mini-blocks and the statistics of the current step."""

    def __init__(self, module: nn.Module, kind: str, weight: Tensor, bias: Optional[Tensor],
                 name: str):
        self.module, self.kind, self.weight, self.bias, self.name = module, kind, weight, bias, name
        self.block = None        # "kernel" | "filter" | "row" | "chunk" | "kfac" | "bn"
        self.P = self.d = 0      # number and size of the mini-blocks
        self.d_full = 0          # linear: m_in (+1)
        self.nc = 1              # linear chunk: chunks per row
        self.spare = None        # the last step's acc, reused by the next curvature step's hooks
        self.scratch: dict = {}  # per-step buffers reused from step to step
        self.acc = None
        self.clear()

    def clear(self) -> None:
        if self.acc is not None:
            self.spare = self.acc
        self.acc = None          # sum over samples of unscaled G G^T, [P, d, d]
        self.acc_bias = None     # conv bias / BN beta: sum of squared unscaled per-sample grads
        self.acc_w = None        # BN gamma
        self.acc_A = None        # R3: sum of a~ a~^T over rows
        self.acc_D = None        # R3: sum of grad_output^2 over rows
        self.rows = 0            # M: samples (dim 0) over all calls of the step
        self.tokens = 0          # R3: rows of the flattened input

    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]


def _add(acc: Optional[Tensor], x: Tensor) -> Tensor:
    return x if acc is None else acc.add_(x)


def _add_outer(layer: "_Layer", g: Tensor, kernels: Optional["_Kernels"] = None) -> None:
    """layer.acc += sum_n g_n g_n^T for ``g`` [n, P, d] (one batched GEMM over the P blocks, or
    the C kernel for blocks up to ``_OUTER_C_MAX_D``), written into the previous curvature
    step's buffer when there is one: a fresh multi-100 MB tensor per curvature step costs page
    faults here and unmapping in the step."""
    if kernels is not None and g.shape[-1] <= _OUTER_C_MAX_D and _Kernels.usable(g) and (
            layer.acc is None or _Kernels.usable(g, layer.acc)):
        if layer.acc is not None:
            layer.acc = kernels.outer(g, layer.acc, accumulate=True)
        else:   # the spare buffer is overwritten, not zeroed first
            layer.acc = kernels.outer(g, _spare(layer, (g.shape[1], g.shape[2], g.shape[2]), g))
        return
    a, b = g.permute(1, 2, 0), g.permute(1, 0, 2)                      # [P, d, n], [P, n, d]
    if layer.acc is not None:
        layer.acc.baddbmm_(a, b)
    else:
        layer.acc = torch.bmm(a, b, out=_spare(layer, (g.shape[1], g.shape[2], g.shape[2]), g))


_OUTER_C_MAX_D = 16   # the C outer-product kernel's block size limit (a GEMM wins above)


def _spare(layer: "_Layer", shape: tuple, like: Tensor) -> Optional[Tensor]:
    """The layer's spare acc buffer if it fits ``shape`` (dtype and device of ``like``)."""
    spare, layer.spare = layer.spare, None
    if (spare is not None and tuple(spare.shape) == tuple(shape) and spare.dtype == like.dtype
            and spare.device == like.device):
        return spare
    return None


class MBF(Optimizer):
    """Mini-block Fisher preconditioned SGD with momentum ([RECONSTRUCTION], see module docstring).

    Args:
        params: parameters or parameter groups (unknown group keys are ignored).
        lr: learning rate (read from ``group["lr"]`` every step, so schedulers work).
        momentum: mu in m <- mu m + p (0 disables).
        weight_decay: wd; see ``weight_decay_mode``.
        damping: lambda added to every mini-block before inversion (> 0).
        beta: curvature EMA decay, F <- beta F + (1 - beta) F_hat on curvature steps.
        t_cov: curvature (per-sample statistics) every ``t_cov`` steps.
        t_inv: inverses every ``t_inv`` steps.
        conv_block: "kernel" (k_h k_w blocks per (out, in) slice) or "filter" (per out channel).
        linear_block: "auto", "row" (R1), "chunk" (R2) or "kfac" (R3).
        chunk_size: block size b of R2.
        weight_decay_mode: "decoupled" (w <- w - lr (m + wd w), spec) or "l2" (p = Minv (g + wd w)).
        sample_chunk_numel: bound (elements) on the transient per-sample tensors of one chunk.
        native: use the C kernels for blocks of size <= 64 on the CPU (compiled on first use
            with the system C compiler, cached; torch ops where they cannot be built). False:
            torch ops only. Same results up to float rounding. Not part of the state_dict.
    """

    supports_growth = False   # curvature mini-blocks sized by the layer at attach

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 damping: float = 0.01, beta: float = 0.9, t_cov: int = 10, t_inv: int = 100,
                 conv_block: str = "kernel", linear_block: str = "auto", chunk_size: int = 32,
                 weight_decay_mode: str = "decoupled", sample_chunk_numel: int = 1 << 24,
                 native: bool = True):
        if not lr >= 0:
            raise ValueError(f"MBF: lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"MBF: momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"MBF: weight_decay must be >= 0, got {weight_decay}")
        if not damping > 0:
            raise ValueError(f"MBF: damping must be > 0, got {damping}")
        if not 0 <= beta < 1:
            raise ValueError(f"MBF: beta must be in [0, 1), got {beta}")
        for key, val in (("t_cov", t_cov), ("t_inv", t_inv), ("chunk_size", chunk_size),
                         ("sample_chunk_numel", sample_chunk_numel)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"MBF: {key} must be an integer >= 1, got {val!r}")
        if conv_block not in ("kernel", "filter"):
            raise ValueError(f"MBF: conv_block must be 'kernel' or 'filter', got {conv_block!r}")
        if linear_block not in ("auto", "row", "chunk", "kfac"):
            raise ValueError("MBF: linear_block must be 'auto', 'row', 'chunk' or 'kfac', "
                             f"got {linear_block!r}")
        if weight_decay_mode not in ("decoupled", "l2"):
            raise ValueError("MBF: weight_decay_mode must be 'decoupled' or 'l2', "
                             f"got {weight_decay_mode!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                        beta=beta)
        super().__init__(params, defaults)
        self.t_cov, self.t_inv = t_cov, t_inv
        self.conv_block, self.linear_block, self.chunk_size = conv_block, linear_block, chunk_size
        self.weight_decay_mode = weight_decay_mode
        self.sample_chunk_numel = sample_chunk_numel
        self.native = bool(native)
        self._k = 0                      # completed steps (the schedule counter)
        self._layers: list[_Layer] = []
        self._warned: set = set()

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> Handle:
        """Hook every Linear/Conv2d/BatchNorm of ``model`` whose parameters are optimized.

        Returns a :class:`~ssl_suite.optim.protocol.Handle`; ``remove()`` detaches the hooks (the
        curvature collected so far keeps preconditioning the layers)."""
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        handle, layers, seen = Handle(), [], set()
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, Tensor) or id(w) not in ours or id(w) in seen:
                continue
            b = getattr(mod, "bias", None)
            b = b if isinstance(b, Tensor) and id(b) in ours else None
            if type(mod).forward is nn.Conv2d.forward:
                layer = _Layer(mod, "conv", w, b, name)
            elif type(mod).forward is nn.Linear.forward:
                layer = _Layer(mod, "linear", w, b, name)
            elif isinstance(mod, _BN_TYPES):
                layer = _Layer(mod, "bn", w, b, name)
            else:
                continue
            self._geometry(layer)
            seen.update(id(p) for p in layer.params())
            layers.append(layer)
            handle.add(mod.register_forward_hook(functools.partial(self._forward_hook, layer)))
        self._layers = layers
        return handle

    def _geometry(self, layer: _Layer) -> None:
        w = layer.weight
        if layer.kind == "conv":
            layer.block = self.conv_block
            c_out, c_in_g, kh, kw = w.shape
            layer.P, layer.d = ((c_out * c_in_g, kh * kw) if layer.block == "kernel"
                                else (c_out, c_in_g * kh * kw))
        elif layer.kind == "linear":
            m_out, m_in = w.shape
            layer.d_full = m_in + (layer.bias is not None)
            block = self.linear_block
            if block == "auto":
                block = ("row" if m_in <= _AUTO_ROW_MAX_IN
                         and m_out * layer.d_full ** 2 <= _ROW_MAX_NUMEL else "chunk")
            layer.block = block
            if block == "row":
                layer.P, layer.d = m_out, layer.d_full
            elif block == "chunk":
                layer.d = min(self.chunk_size, layer.d_full)
                layer.nc = -(-layer.d_full // layer.d)
                layer.P = m_out * layer.nc
            else:
                layer.P, layer.d = m_out, layer.d_full
        else:
            layer.block = "bn"

    def _due(self) -> bool:
        return self._k % self.t_cov == 0

    def _forward_hook(self, layer: _Layer, module: nn.Module, inputs, output) -> None:
        if not (self._due() and torch.is_grad_enabled() and isinstance(output, Tensor)
                and output.requires_grad):
            return
        x = inputs[0].detach()
        extra = None
        if layer.kind == "bn" and not (module.training or module.running_mean is None):
            extra = (module.running_mean.detach().clone(), module.running_var.detach().clone())
        output.register_hook(functools.partial(self._backward_hook, layer, x, extra))

    def _backward_hook(self, layer: _Layer, x: Tensor, extra, grad_output: Tensor) -> None:
        with torch.no_grad():
            dtype = layer.weight.dtype
            x, go = x.to(dtype), grad_output.detach().to(dtype)
            if layer.kind == "conv":
                self._conv_stats(layer, x, go)
            elif layer.kind == "linear":
                self._linear_stats(layer, x, go)
            else:
                self._bn_stats(layer, x, go, extra)
            layer.rows += x.shape[0]

    def _chunks(self, n: int, per_sample: int):
        step = max(1, self.sample_chunk_numel // max(1, per_sample))
        return range(0, n, step), step

    def _conv_stats(self, layer: _Layer, x: Tensor, go: Tensor) -> None:
        mod: nn.Conv2d = layer.module
        n_all, c_out = go.shape[0], go.shape[1]
        groups, c_in_g = mod.groups, layer.weight.shape[1]
        pad = mod.padding
        if isinstance(pad, str) or mod.padding_mode != "zeros":
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
            pad = 0
        delta = go.reshape(n_all, c_out, -1)                                   # [B, C_out, T]
        T, kk = delta.shape[-1], layer.weight.shape[2] * layer.weight.shape[3]
        per_sample = c_in_g * groups * kk * T + 3 * c_out * c_in_g * kk
        starts, size = self._chunks(n_all, per_sample)
        for s in starts:
            u = F.unfold(x[s:s + size], mod.kernel_size, mod.dilation, pad, mod.stride)
            n = u.shape[0]
            u = u.view(n, groups, c_in_g * kk, T)
            dl = delta[s:s + size].view(n, groups, c_out // groups, T)
            g = torch.matmul(dl, u.transpose(-1, -2)).reshape(n, layer.P, layer.d)  # G_n
            _add_outer(layer, g, self._kernels(g))
        if layer.bias is not None:
            layer.acc_bias = _add(layer.acc_bias, delta.sum(-1).square().sum(0))

    def _linear_stats(self, layer: _Layer, x: Tensor, go: Tensor) -> None:
        n_all, m_in, m_out = x.shape[0], x.shape[-1], go.shape[-1]
        if layer.block == "kfac":
            a = x.reshape(-1, m_in)
            if layer.bias is not None:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
            layer.acc_A = _add(layer.acc_A, a.t() @ a)
            layer.acc_D = _add(layer.acc_D, go.reshape(-1, m_out).square().sum(0))
            layer.tokens += a.shape[0]
            return
        x3, go3 = x.reshape(n_all, -1, m_in), go.reshape(n_all, -1, m_out)
        pad = layer.nc * layer.d - layer.d_full
        flat = x3.shape[1] == 1
        per_sample = (layer.nc * layer.d * layer.d) if flat else 3 * m_out * layer.nc * layer.d
        starts, size = self._chunks(n_all, per_sample)
        for s in starts:
            xa = x3[s:s + size]
            n = xa.shape[0]
            if layer.bias is not None:
                xa = torch.cat([xa, xa.new_ones(n, xa.shape[1], 1)], -1)
            if flat:
                # F_hat_{o,c} = sum_n delta_{n,o}^2 a~_{n,c} a~_{n,c}^T as one GEMM
                a = F.pad(xa[:, 0], (0, pad)).view(n, layer.nc, layer.d)
                outer = (a.unsqueeze(-1) * a.unsqueeze(-2)).reshape(n, -1)
                sq = go3[s:s + size, 0].square().t()
                if layer.acc is not None:
                    layer.acc.view(m_out, -1).addmm_(sq, outer)
                else:
                    buf = _spare(layer, (layer.P, layer.d, layer.d), outer)
                    f = torch.mm(sq, outer, out=None if buf is None else buf.view(m_out, -1))
                    layer.acc = f.view(layer.P, layer.d, layer.d)
            else:
                g = torch.einsum("nto,nti->noi", go3[s:s + size], xa)           # G_n [n, out, d]
                g = F.pad(g, (0, pad)).reshape(n, layer.P, layer.d)
                _add_outer(layer, g, self._kernels(g))

    def _bn_stats(self, layer: _Layer, x: Tensor, go: Tensor, extra) -> None:
        mod = layer.module
        dims = [0] + list(range(2, x.ndim))
        shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
        if extra is None:
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
        else:
            mean, var = extra[0].to(x.dtype).view(shape), extra[1].to(x.dtype).view(shape)
        spatial = list(range(2, x.ndim))
        if layer.weight is not None:
            xhat = (x - mean) * torch.rsqrt(var + mod.eps)
            gw = (go * xhat).sum(spatial) if spatial else go * xhat
            layer.acc_w = _add(layer.acc_w, gw.square().sum(0))
        if layer.bias is not None:
            gb = go.sum(spatial) if spatial else go
            layer.acc_bias = _add(layer.acc_bias, gb.square().sum(0))

    # ------------------------------------------------------------------ state
    def state_dict(self):
        sd = super().state_dict()
        sd["mbf_step"] = self._k
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        k = state_dict.pop("mbf_step", 0)
        super().load_state_dict(state_dict)
        self._k = int(k)

    def __setstate__(self, state):
        super().__setstate__(state)
        for key, val in (("_k", 0), ("_layers", []), ("_warned", set()), ("t_cov", 10),
                         ("t_inv", 100), ("conv_block", "kernel"), ("linear_block", "auto"),
                         ("chunk_size", 32), ("weight_decay_mode", "decoupled"),
                         ("sample_chunk_numel", 1 << 24), ("native", True)):
            self.__dict__.setdefault(key, val)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One MBF update; ``closure`` (zero-grad, forward, backward, return per-sample losses) is
        called once. Returns what the closure returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cov_due, inv_due = self._k % self.t_cov == 0, self._k % self.t_inv == 0
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        l2 = self.weight_decay_mode == "l2"
        direction: dict = {}
        updated: set = set()     # weights updated in place by the fused C kernel

        def grad_of(p: Tensor) -> Optional[Tensor]:
            if p.grad is None:
                return None
            wd = group_of[p]["weight_decay"]
            return p.grad.add(p, alpha=wd) if (l2 and wd != 0) else p.grad

        # curvature (summed over ranks), then inverse and direction per hooked layer
        layers = [l for l in self._layers if l.weight in group_of]
        if cov_due:
            self._all_reduce(layers)
        diag = []    # (param, per-sample fisher_hat or None, hooked, group)
        for layer in layers:
            grp = group_of[layer.weight]
            if layer.kind == "bn":
                for p, acc in ((layer.weight, layer.acc_w), (layer.bias, layer.acc_bias)):
                    if p is not None and p.grad is not None:
                        diag.append((p, None if acc is None else acc.mul_(layer.rows), True,
                                     group_of[p]))
                layer.clear()
                continue
            gw = layer.weight.grad                  # L2 weight decay: added in _precondition
            if gw is None:
                layer.clear()
                continue
            b = layer.bias
            gb = None if b is None else grad_of(b)
            if layer.kind == "conv" and b is not None and gb is not None:
                acc = None if layer.acc_bias is None else layer.acc_bias.mul_(layer.rows)
                diag.append((b, acc, True, group_of[b]))
            if cov_due and layer.rows > 0:
                self._update_fisher(layer, grp)
            layer.clear()
            if inv_due:
                self._invert(layer, grp)
            pw, pb = self._precondition(layer, grp, gw, gb, l2)
            if pw is None:
                updated.add(layer.weight)
            else:
                direction[layer.weight] = pw
            if pb is not None:
                direction[b] = pb

        # diagonal mini-blocks: BN / conv bias (per-sample) and everything else (g^2 EMA)
        handled = {p for p, *_ in diag}
        for group in self.param_groups:
            for p in group["params"]:
                if (p.grad is not None and p not in direction and p not in handled
                        and p not in updated):
                    diag.append((p, None, False, group))
        for p, fhat, hooked, group in diag:
            g = grad_of(p)
            st = self.state[p]
            if cov_due:
                if fhat is None and not hooked:
                    fhat = g.square()                              # no per-sample information
                if fhat is not None:
                    if "fisher" not in st:
                        st["fisher"] = fhat.clone()
                    else:
                        st["fisher"].lerp_(fhat, 1 - group["beta"])
            if "fisher" in st and (inv_due or "inverse" not in st):
                st["inverse"] = (st["fisher"] + group["damping"]).reciprocal_()
            direction[p] = g * st["inverse"] if "inverse" in st else g / group["damping"]

        # momentum and update, one set of foreach kernels per group
        for group in self.param_groups:
            params = [p for p in group["params"] if p in direction]
            if not params:
                continue
            ps = [direction[p] for p in params]
            views = [p.view(u.shape) if u.shape != p.shape else p for p, u in zip(params, ps)]
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            if mu != 0:
                bufs = []
                for p, u in zip(params, ps):
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(st["momentum_buffer"].view(u.shape))
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, ps)
                ps = bufs
            if wd != 0 and not l2:
                torch._foreach_add_(views, views, alpha=-lr * wd)
            torch._foreach_add_(views, ps, alpha=-lr)
        self._k += 1
        return loss

    def _all_reduce(self, layers: list[_Layer]) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for layer in layers:
            stats = [layer.acc, layer.acc_bias, layer.acc_w, layer.acc_D]   # grad_output-based
            if layer.rows == 0:
                continue
            counts = torch.tensor([float(layer.rows), float(layer.tokens)],
                                  dtype=torch.float64, device=layer.weight.device)
            dist.all_reduce(counts)
            for s in stats + [layer.acc_A]:
                if s is not None:
                    dist.all_reduce(s)
            layer.rows, layer.tokens = int(counts[0]), int(counts[1])
            # F_hat = M * sum(unscaled), with the loss a mean over each rank's rows and the
            # gradients averaged by DDP: the global grad_output is the local one / world size
            ws = dist.get_world_size()
            for s in stats:
                if s is not None:
                    s.div_(ws * ws)

    def _update_fisher(self, layer: _Layer, grp: dict) -> None:
        st, beta, M = self.state[layer.weight], grp["beta"], layer.rows
        if layer.block == "kfac":
            if layer.acc_A is None:
                return
            a_hat = layer.acc_A / layer.tokens                     # E[a~ a~^T]
            d_hat = layer.acc_D * (M * M / layer.tokens)           # E[(M grad_output)^2]
            for key, new in (("fisher_A", a_hat), ("fisher_D", d_hat)):
                if key not in st:
                    st[key] = new
                else:
                    st[key].lerp_(new, 1 - beta)
            return
        if layer.acc is None:
            return
        # F_hat = (1/M) sum (M G)(M G)^T = M acc
        if layer.d <= _TILE_MAX_D and self._kernels(layer.acc) is not None:
            fisher = self._fisher(layer, native=True)              # tiles, lower triangle
            kernels = self._kernels(layer.acc, *(() if fisher is None else (fisher,)))
            if kernels is not None:                                # one pass, no M x acc
                st["fisher"] = kernels.ema(fisher, layer.acc, layer.d, M, 1 - beta)
                return
        fisher = self._fisher(layer, native=False)                 # [P, d, d]
        if fisher is None:
            st["fisher"], layer.acc = layer.acc.mul_(M), None
        else:
            fisher.lerp_(layer.acc.mul_(M), 1 - beta)

    def _fisher(self, layer: _Layer, native: bool) -> Optional[Tensor]:
        """The layer's F in the layout of the backend (tiles for the C kernels, [P, d, d] for
        torch), converting one in the other layout (a checkpoint from the other backend); None
        if there is none yet. The two shapes never coincide (the tiles' last dim is 8)."""
        st = self.state[layer.weight]
        fisher = st.get("fisher")
        if fisher is None or layer.d > _TILE_MAX_D:
            return fisher
        tiles = tuple(fisher.shape) == _tile_shape(layer.P, layer.d)
        if native and not tiles:
            fisher = st["fisher"] = _tiles_from_blocks(fisher, lower=True)
        elif tiles and not native:
            fisher = st["fisher"] = _blocks_from_tiles(fisher, layer.P, layer.d).contiguous()
        return fisher

    def _invert(self, layer: _Layer, grp: dict) -> None:
        st, lam = self.state[layer.weight], grp["damping"]
        if layer.block == "kfac":
            if "fisher_A" not in st:
                return
            evals, q = torch.linalg.eigh(st["fisher_A"])
            st["eig_Q"], st["eig_L"] = q, evals.clamp_min(0)
            return
        if "fisher" not in st:
            return
        if layer.d > _TILE_MAX_D:
            st["inverse"] = _damped_inverse(st["fisher"], lam)     # [P, d, d]
            return
        kernels = self._kernels(st["fisher"])
        fisher = self._fisher(layer, native=kernels is not None)
        if kernels is None:                                        # torch: [d, d, P]
            st["inverse"] = _damped_inverse(fisher, lam).permute(1, 2, 0).contiguous()
            return
        # into the previous inverse: a fresh one costs page faults, freeing the old unmapping
        tiles, info = kernels.inverse(fisher, layer.P, layer.d, lam, st.get("inverse"),
                                      layer.scratch.get("info"))
        layer.scratch["info"] = info
        bad = info[:layer.P].nonzero().squeeze(1)                  # host sync on inverse steps
        if bad.numel():                                            # retries and fallback there
            rows, cols, sym = _tri_index(layer.d)
            blocks = fisher[bad // _TILE, :, bad % _TILE][:, sym].view(-1, layer.d, layer.d)
            tiles[bad // _TILE, :, bad % _TILE] = _damped_inverse(blocks, lam)[:, rows, cols]
        st["inverse"] = tiles

    def _precondition(self, layer: _Layer, grp: dict, gw: Tensor, gb: Optional[Tensor],
                      l2: bool):
        """p = Minv g per mini-block (``gw``: the weight's raw gradient, ``gb``: the bias's with
        any L2 term); returns the directions of weight and (linear) bias. A conv weight whose
        blocks the C kernel can take is updated in place instead (L2 term, momentum, weight
        decay and the step fused into the one pass over its inverse): direction None."""
        st, lam, w = self.state[layer.weight], grp["damping"], layer.weight
        wd_l2 = grp["weight_decay"] if l2 else 0.0                 # p = Minv (g + wd w)
        m_in = w.shape[-1]
        if layer.kind == "conv":
            blocks = gw.reshape(layer.P, layer.d)                  # + wd w in the fused kernel
        elif layer.block == "kfac":
            gw = gw.add(w, alpha=wd_l2) if wd_l2 else gw
            g = gw if layer.bias is None else torch.cat(
                [gw, (gb if gb is not None else torch.zeros_like(layer.bias)).unsqueeze(1)], 1)
            if "eig_Q" not in st and "fisher_A" in st:
                self._invert(layer, grp)
            if "eig_Q" not in st:
                self._warn_missing(layer)
                p = g / lam
            else:
                q = st["eig_Q"]
                h = (g @ q).div_(torch.outer(st["fisher_D"], st["eig_L"]).add_(lam))
                p = h @ q.t()
            return self._split_linear(layer, p, gb)
        else:
            # [W | b | 0-padding] rows cut into the P blocks, in a buffer kept from step to step
            # (the padding stays zero)
            width = layer.nc * layer.d
            g = layer.scratch.get("g")
            if g is None or g.dtype != gw.dtype or g.device != gw.device:
                g = layer.scratch["g"] = gw.new_zeros(gw.shape[0], width)
            g[:, :m_in].copy_(gw)
            if wd_l2:
                g[:, :m_in].add_(w, alpha=wd_l2)
            if layer.bias is not None:
                g[:, m_in].copy_(gb) if gb is not None else g[:, m_in].zero_()
            blocks = g.view(layer.P, layer.d)
        tiled = layer.d <= _TILE_MAX_D
        native = tiled and "fisher" in st and self._kernels(st["fisher"]) is not None
        if "fisher" in st and tuple(st.get("inverse", torch.empty(0)).shape) != self._inverse_shape(
                layer, native):
            self._invert(layer, grp)           # none yet, or another layout (other backend)
        inv = st.get("inverse")
        if layer.kind == "conv":
            mu, wd, lr = grp["momentum"], grp["weight_decay"], grp["lr"]
            buf = None
            if mu != 0:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = torch.zeros_like(w)
            kernels = None if inv is None or not native else self._kernels(
                inv, blocks, w, *(() if buf is None else (buf,)))
            if kernels is not None:            # the whole update in one pass over the inverse
                kernels.apply(inv, blocks, layer.d, buf=buf, w=w, mu=mu, gwd=wd_l2,
                              awd=-lr * wd if (wd != 0 and not l2) else 0.0, alpha=-lr)
                return None, None
            if wd_l2:
                blocks = gw.add(w, alpha=wd_l2).reshape(layer.P, layer.d)
        pb = None
        if layer.kind == "linear":
            pb = layer.scratch.get("p")
            if pb is None or pb.dtype != blocks.dtype or pb.device != blocks.device:
                pb = layer.scratch["p"] = torch.empty_like(blocks)
        if inv is None:
            self._warn_missing(layer)
            pb = torch.div(blocks, lam, out=pb)
        elif not tiled:
            pb = torch.matmul(inv, blocks.unsqueeze(-1),
                              out=None if pb is None else pb.unsqueeze(-1)).squeeze(-1)
        else:
            kernels = self._kernels(inv, blocks, *(() if pb is None else (pb,))) if native else None
            if kernels is not None:
                pb = torch.empty_like(blocks) if pb is None else pb
                kernels.apply(inv, blocks, layer.d, out=pb)
            elif native:                       # tensors the kernel cannot take: from tiles
                p = _blocks_from_tiles(inv, layer.P, layer.d) @ blocks.unsqueeze(-1)
                pb = p.squeeze(-1) if pb is None else pb.copy_(p.squeeze(-1))
            else:
                pb = _blocks_last_apply(inv, blocks, layer.scratch, out=pb)
        if layer.kind == "conv":
            return pb, None                                        # [P, d]
        p = pb.view(layer.P // layer.nc, layer.nc * layer.d)       # views into the buffer
        return p[:, :m_in], (p[:, m_in] if layer.bias is not None and gb is not None else None)

    @staticmethod
    def _inverse_shape(layer: _Layer, native: bool) -> tuple[int, int, int]:
        """Where Minv lives: tiles for the C kernels, blocks-last [d, d, P] for torch's d
        multiply-adds over contiguous rows, [P, d, d] (``matmul``) for blocks over 64."""
        if layer.d > _TILE_MAX_D:
            return (layer.P, layer.d, layer.d)
        return _tile_shape(layer.P, layer.d) if native else (layer.d, layer.d, layer.P)

    def _kernels(self, *tensors: Tensor) -> Optional[_Kernels]:
        """The C kernels if this optimizer uses them and they can take ``tensors``."""
        if not (self.native and _Kernels.usable(*tensors)):
            return None
        kernels = _native_kernels()
        if kernels is None and _NATIVE_WARNING not in self._warned and _NATIVE.get("warn"):
            self._warned.add(_NATIVE_WARNING)
            warnings.warn(f"MBF: C kernels unavailable ({_NATIVE.get('error')}); using torch "
                          "ops, slower on the CPU", RuntimeWarning, stacklevel=4)
        return kernels

    def block_fisher(self, p: Tensor) -> Optional[Tensor]:
        """The curvature EMA F of weight ``p`` as ``[P, d, d]`` blocks (None if none; for
        inspection: with the C kernels the lower triangles of blocks of size <= 64 are kept in
        tiles)."""
        fisher = self.state.get(p, {}).get("fisher")
        layer = next((l for l in self._layers if l.weight is p), None)
        if (fisher is None or layer is None or layer.d > _TILE_MAX_D
                or tuple(fisher.shape) != _tile_shape(layer.P, layer.d)):
            return fisher
        return _blocks_from_tiles(fisher, layer.P, layer.d)

    def block_inverse(self, p: Tensor) -> Optional[Tensor]:
        """The stored (F + lambda I)^{-1} of weight ``p`` as ``[P, d, d]`` blocks (None if none;
        for inspection: the optimizer keeps blocks of size <= 64 in tiles)."""
        inv = self.state.get(p, {}).get("inverse")
        layer = next((l for l in self._layers if l.weight is p), None)
        if inv is None or layer is None or layer.d > _TILE_MAX_D:
            return inv
        if tuple(inv.shape) == _tile_shape(layer.P, layer.d):
            return _blocks_from_tiles(inv, layer.P, layer.d)
        return inv.permute(2, 0, 1)                                # [d, d, P]

    @staticmethod
    def _split_linear(layer: _Layer, p: Tensor, gb: Optional[Tensor]):
        m_in = layer.weight.shape[1]
        pw = p[:, :m_in].contiguous()
        pb = p[:, m_in].contiguous() if (layer.bias is not None and gb is not None) else None
        return pw, pb

    def _warn_missing(self, layer: _Layer) -> None:
        if layer.name not in self._warned:
            self._warned.add(layer.name)
            warnings.warn(f"MBF: layer {layer.name!r} has gradients but no curvature yet (no "
                          "per-sample statistics reached its hooks): preconditioned with "
                          "1/damping", RuntimeWarning, stacklevel=3)


def _damped_inverse(fisher: Tensor, lam: float) -> Tensor:
    """(F + lam I)^{-1} for a stack ``[P, d, d]`` by one batched Cholesky; blocks where it fails
    are retried with 10x, 100x, ... the damping, then fall back to 1/(diag F + lam)."""
    d = fisher.shape[-1]
    eye = torch.eye(d, dtype=fisher.dtype, device=fisher.device)
    a = fisher + lam * eye
    chol, info = torch.linalg.cholesky_ex(a)
    bad = info != 0
    if bool(bad.any()):                                             # host sync on inverse steps
        boost = lam
        for _ in range(6):
            boost *= 10.0
            idx = bad.nonzero().squeeze(1)
            c2, i2 = torch.linalg.cholesky_ex(a[idx] + boost * eye)
            chol[idx] = c2
            bad[idx] = i2 != 0
            if not bool(bad.any()):
                break
    inv = torch.cholesky_inverse(chol)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        diag = torch.diagonal(fisher[idx], dim1=-2, dim2=-1).clamp_min(0).add(lam)
        inv[idx] = torch.diag_embed(diag.reciprocal())
    return inv


# ---------------------------------------------------------------------- tile layout (torch)
# The inverse of a layer with blocks of size d <= _TILE_MAX_D is stored in tiles of _TILE blocks:
# ``[ceil(P / 8), d (d + 1) / 2, 8]``, the upper triangle (row-major) of 8 consecutive blocks,
# one entry of the 8 blocks next to each other, zero-padded after the last block. The C kernels
# below work on this layout; these torch functions are the same operations for other devices,
# dtypes, or when no C compiler is available.

def _tile_shape(P: int, d: int) -> tuple[int, int, int]:
    return (-(-P // _TILE), d * (d + 1) // 2, _TILE)


@functools.lru_cache(maxsize=None)
def _tri_index(d: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols) of the packed upper triangle, and for every (i, j) of a d x d block the
    packed position of (min(i, j), max(i, j)) (flattened, d * d)."""
    iu = torch.triu_indices(d, d)
    pos = torch.zeros(d, d, dtype=torch.long)
    pos[iu[0], iu[1]] = torch.arange(iu.shape[1])
    return iu[0], iu[1], (pos.triu() + pos.triu(1).t()).reshape(-1)


def _tiles_from_blocks(full: Tensor, lower: bool = False) -> Tensor:
    """``[P, d, d]`` symmetric blocks -> tiles ``[ceil(P/8), d(d+1)/2, 8]``: the upper triangle
    (row-major), or with ``lower`` the same entries read from the lower triangle (the one
    Cholesky reads, for blocks symmetric only up to rounding)."""
    P, d = full.shape[0], full.shape[-1]
    rows, cols, _ = _tri_index(d)
    flat = (cols * d + rows) if lower else (rows * d + cols)
    nt = -(-P // _TILE)
    up = full.new_zeros(nt * _TILE, flat.numel())
    torch.index_select(full.reshape(P, d * d), 1, flat.to(full.device), out=up[:P])
    return up.view(nt, _TILE, -1).transpose(1, 2).contiguous()


def _blocks_from_tiles(tiles: Tensor, P: int, d: int) -> Tensor:
    """Inverse of :func:`_tiles_from_blocks`: ``[P, d, d]``."""
    up = tiles.transpose(1, 2).reshape(-1, tiles.shape[1])[:P]
    return torch.index_select(up, 1, _tri_index(d)[2].to(tiles.device)).view(P, d, d)


def _blocks_last_apply(inv: Tensor, blocks: Tensor, scratch: dict,
                       out: Optional[Tensor] = None) -> Tensor:
    """p = M g with torch ops for ``inv`` blocks-last ``[d, d, P]`` and ``blocks`` ``[P, d]``: d
    multiply-adds over contiguous rows (4x faster than ``bmm`` of 9x9 blocks on a CPU), g^T and
    p^T in the layer's buffers (p^T lives until the update at the end of the step)."""
    P, d = blocks.shape
    gt, pt = scratch.get("gt"), scratch.get("pt")
    if gt is None or gt.shape != (d, P) or gt.dtype != blocks.dtype or gt.device != blocks.device:
        gt = scratch["gt"] = blocks.new_empty(d, P)
        pt = scratch["pt"] = blocks.new_empty(d, P)
    gt.copy_(blocks.t())
    torch.mul(inv[:, 0], gt[0], out=pt)
    for j in range(1, d):
        pt.addcmul_(inv[:, j], gt[j])
    return pt.t() if out is None else out.copy_(pt.t())


# ---------------------------------------------------------------------- C kernels (CPU)
# Three kernels over the tile layout, for float and double: p = M g (optionally fused with the
# momentum and weight update), (F + lambda I)^{-1} by a Cholesky vectorized over the 8 blocks of
# a tile, and the Fisher EMA. Written with GCC/Clang vector extensions (8 lanes: AVX2 registers
# for float) and OpenMP; compiled once per machine with the system C compiler into
# ``$SSL_SUITE_CACHE`` (default ``~/.cache/ssl_suite``) and loaded with ctypes (the .so links
# the libgomp torch has already loaded, so it shares torch's OpenMP threads). Any failure
# (no compiler, no OpenMP, a failed self-check) leaves the torch implementation in charge.
# ``SSL_SUITE_MBF_NATIVE=0`` disables them process-wide, ``MBF(native=False)`` per optimizer.

_C_HEAD = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#define LANES 8
#define DMAX 64
#define TMAX (DMAX * (DMAX + 1) / 2)
#define TRI(i, d) ((i) * (d) - (i) * ((i) - 1) / 2)     /* packed position of (i, i) */
#define INLINE static inline __attribute__((always_inline))
"""

_C_TYPES = r"""
typedef $S $V __attribute__((vector_size(LANES * sizeof($S))));
typedef $I $M __attribute__((vector_size(LANES * sizeof($S))));
"""

# $N names a specialization, $D is its block size (a literal, so that the loops of the tile
# functions have constant bounds inside the OpenMP-outlined loop body), $UNROLL its pragma.
_C_TILES = r"""
/* p = M g for one tile of nl <= 8 blocks (nl rows of d in g, out, buf, w). mode 0: out = p;
   1: p = M (g + gwd w), nb = mu buf + p, buf = nb, w = w + awd w, w = w + alpha nb;
   2: as 1 with nb = p. */
INLINE void $SUF_apply_tile$N(const $S* m, const $S* g, $S* out, $S* buf, $S* w,
                               const int nl, const int d, const $S mu, const $S gwd,
                               const $S awd, const $S alpha, const int mode) {
    $V gs[DMAX], ps[DMAX], v;
    $S tmp[LANES * DMAX];
    if (nl < LANES) memset(tmp, 0, sizeof($S) * LANES * d);
    memcpy(tmp, g, sizeof($S) * nl * d);
    if (mode != 0 && gwd != 0)
        for (int k = 0; k < nl * d; k++) tmp[k] = tmp[k] + gwd * w[k];
    $UNROLL
    for (int j = 0; j < d; j++) {
        for (int l = 0; l < LANES; l++) gs[j][l] = tmp[l * d + j];
        ps[j] = ($V){0};
    }
    const $S* r = m;                                     /* row i of the upper triangle */
    $UNROLL
    for (int i = 0; i < d; i++) {
        const $V gi = gs[i];
        $V a0, a1 = ($V){0}, a2 = ($V){0}, a3 = ($V){0};  /* 4 chains for the row's dot */
        memcpy(&v, r, sizeof v);
        a0 = v * gi;
        int j = i + 1;
        for (; j + 3 < d; j += 4) {
            memcpy(&v, r + LANES * (j - i), sizeof v); a0 += v * gs[j]; ps[j] += v * gi;
            memcpy(&v, r + LANES * (j + 1 - i), sizeof v); a1 += v * gs[j + 1]; ps[j + 1] += v * gi;
            memcpy(&v, r + LANES * (j + 2 - i), sizeof v); a2 += v * gs[j + 2]; ps[j + 2] += v * gi;
            memcpy(&v, r + LANES * (j + 3 - i), sizeof v); a3 += v * gs[j + 3]; ps[j + 3] += v * gi;
        }
        for (; j < d; j++) {
            memcpy(&v, r + LANES * (j - i), sizeof v); a0 += v * gs[j]; ps[j] += v * gi;
        }
        ps[i] += (a0 + a1) + (a2 + a3);
        r += LANES * (d - i);
    }
    $UNROLL
    for (int i = 0; i < d; i++)
        for (int l = 0; l < LANES; l++) tmp[l * d + i] = ps[i][l];
    if (mode == 0) { memcpy(out, tmp, sizeof($S) * nl * d); return; }
    for (int k = 0; k < nl * d; k++) {
        $S nb = tmp[k];
        if (mode == 1) { nb = buf[k] * mu + nb; buf[k] = nb; }
        $S x = w[k];
        x = x + awd * x;
        w[k] = x + alpha * nb;
    }
}

static void $SUF_apply$N(const $S* inv, const $S* g, $S* out, $S* buf, $S* w,
                         const int64_t P, const int d_, const $S mu, const $S gwd,
                         const $S awd, const $S alpha, const int mode, const int nt) {
    const int d = $D;
    const int64_t NT = P / LANES, T = d * (d + 1) / 2;
    #pragma omp parallel for schedule(dynamic, 64) num_threads(nt) if(NT * T > 32768)
    for (int64_t b = 0; b < NT; b++) {
        const int64_t o = b * LANES * d;
        if (b + 2 < NT) {            /* the inverse 2 tiles ahead: ~10% on one thread */
            const char* pf = (const char*)(inv + (b + 2) * T * LANES);
            for (int64_t c = 0; c < T * LANES * (int64_t)sizeof($S); c += 64)
                __builtin_prefetch(pf + c, 0, 0);
        }
        if (mode == 1)
            $SUF_apply_tile$N(inv + b * T * LANES, g + o, 0, buf + o, w + o, LANES, d, mu, gwd,
                              awd, alpha, 1);
        else
            $SUF_apply_tile$N(inv + b * T * LANES, g + o, out ? out + o : 0, 0, w ? w + o : 0,
                              LANES, d, mu, gwd, awd, alpha, mode);
    }
    if (P % LANES) {
        const int64_t o = NT * LANES * d;
        $SUF_apply_tile$N(inv + NT * T * LANES, g + o, out ? out + o : 0, buf ? buf + o : 0,
                          w ? w + o : 0, P % LANES, d, mu, gwd, awd, alpha, mode);
    }
}

/* (F + lam I)^{-1} for one tile of F: Cholesky F + lam I = U^T U, W = U^{-1}, inverse = W W^T,
   upper triangle written to the tile (zeros in lanes >= nl). info = 1 where a pivot is not > 0
   (or is NaN), LAPACK's failure test; those blocks' results are meaningless. */
INLINE void $SUF_inv_tile$N(const $S* ft, $S* outm, int32_t* info, const int nl, const int d,
                             const $S lam) {
    $V a[TMAX], wi[TMAX], rd[DMAX];
    $M bad = ($M){0};
    const $V one = ($V){0} + 1;
    int t = 0;
    $UNROLL
    for (int i = 0; i < d; i++) {
        $UNROLL
        for (int j = i; j < d; j++, t++) {
            memcpy(&a[t], ft + LANES * t, sizeof a[t]);
            if (i == j) a[t] += lam;
        }
    }
    if (nl < LANES)                                /* identity in the unused lanes */
        for (int i = 0; i < d; i++)
            for (int j = i; j < d; j++)
                for (int l = nl; l < LANES; l++) a[TRI(i, d) + j - i][l] = i == j;
    $UNROLL
    for (int k = 0; k < d; k++) {
        const int kk = TRI(k, d);
        $V s = a[kk];
        const $M ok = s > 0;
        bad |= ~ok;
        s = ($V)((($M)s & ok) | (($M)one & ~ok));
        for (int l = 0; l < LANES; l++) s[l] = sqrt(s[l]);
        const $V r = one / s;
        a[kk] = s;
        rd[k] = r;
        $UNROLL
        for (int j = 1; j < d - k; j++) a[kk + j] *= r;
        $UNROLL
        for (int i = k + 1; i < d; i++) {
            const int ii = TRI(i, d);
            const $V aki = a[kk + i - k];
            $UNROLL
            for (int j = i; j < d; j++) a[ii + j - i] -= aki * a[kk + j - k];
        }
    }
    /* W = U^{-1} (upper): W_jj = 1 / u_jj, W_ij = -(sum_{m=i+1..j} u_im W_mj) / u_ii */
    $UNROLL
    for (int j = 0; j < d; j++) {
        wi[TRI(j, d)] = rd[j];
        $UNROLL
        for (int i = j - 1; i >= 0; i--) {
            const int ii = TRI(i, d);
            $V acc = ($V){0};
            $UNROLL
            for (int m = i + 1; m <= j; m++) acc += a[ii + m - i] * wi[TRI(m, d) + j - m];
            wi[ii + j - i] = -acc * rd[i];
        }
    }
    /* inverse_ij = sum_{m >= j} W_im W_jm  (i <= j) */
    $M keep = ($M){0} - 1;
    for (int l = nl; l < LANES; l++) keep[l] = 0;
    t = 0;
    $UNROLL
    for (int i = 0; i < d; i++) {
        const int ii = TRI(i, d);
        $UNROLL
        for (int j = i; j < d; j++, t++) {
            const int jj = TRI(j, d);
            $V acc = ($V){0};
            $UNROLL
            for (int m = j; m < d; m++) acc += wi[ii + m - i] * wi[jj + m - j];
            if (nl < LANES) acc = ($V)(($M)acc & keep);
            memcpy(outm + LANES * t, &acc, sizeof acc);
        }
    }
    for (int l = 0; l < nl; l++) info[l] = bad[l] != 0;
}

static void $SUF_inverse$N(const $S* F, $S* out, int32_t* info, const int64_t P,
                           const int d_, const $S lam, const int nt) {
    const int d = $D;
    const int64_t NT = P / LANES, T = d * (d + 1) / 2;
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nt) if(NT * T * d > 32768)
    for (int64_t b = 0; b < NT; b++)
        $SUF_inv_tile$N(F + b * T * LANES, out + b * T * LANES, info + b * LANES, LANES, d, lam);
    if (P % LANES)
        $SUF_inv_tile$N(F + NT * T * LANES, out + NT * T * LANES, info + NT * LANES, P % LANES,
                        d, lam);
}

/* Fisher tiles <- lerp(tiles, scale acc, w) (mode 1: w < 0.5, 2: w >= 0.5, torch.lerp's two
   formulas) or scale acc (mode 0), for acc [P, d, d] read at its lower triangle. */
static void $SUF_ema$N($S* F, const $S* acc, const int64_t P, const int d_, const $S sc,
                       const $S ws, const int mode, const int nt) {
    const int d = $D;
    const int64_t NT = (P + LANES - 1) / LANES, T = d * (d + 1) / 2;
    const $S wc = 1 - ws;
    #pragma omp parallel for schedule(static) num_threads(nt) if(NT * T > 32768)
    for (int64_t b = 0; b < NT; b++) {
        const int nl = P - b * LANES < LANES ? P - b * LANES : LANES;
        const $S* ab = acc + b * LANES * d * d;
        $S* ft = F + b * T * LANES;
        $V e[TMAX], f;
        if (nl < LANES) memset(e, 0, sizeof($V) * T);
        for (int l = 0; l < nl; l++) {          /* the 8 blocks' lower triangles, transposed */
            const $S* a = ab + (int64_t)l * d * d;
            int t = 0;
            $UNROLL
            for (int i = 0; i < d; i++)
                $UNROLL
                for (int j = i; j < d; j++, t++) e[t][l] = a[j * d + i];
        }
        $UNROLL
        for (int t = 0; t < T; t++) {
            const $V x = e[t] * sc;
            if (mode == 0) f = x;
            else {
                memcpy(&f, ft + LANES * t, sizeof f);
                f = mode == 1 ? f + ws * (x - f) : x - (x - f) * wc;
            }
            memcpy(ft + LANES * t, &f, sizeof f);
        }
    }
}
"""

_C_API = r"""
void mbf_apply_$SUF(const $S* inv, const $S* g, $S* out, $S* buf, $S* w, int64_t P, int64_t d,
                    double mu, double gwd, double awd, double alpha, int64_t nt) {
    const int mode = out ? 0 : (buf ? 1 : 2);
    switch (d) {
    case 1: $SUF_apply_1(inv, g, out, buf, w, P, 1, mu, gwd, awd, alpha, mode, nt); break;
    case 9: $SUF_apply_9(inv, g, out, buf, w, P, 9, mu, gwd, awd, alpha, mode, nt); break;
    default: $SUF_apply_n(inv, g, out, buf, w, P, (int)d, mu, gwd, awd, alpha, mode, nt);
    }
}

void mbf_inverse_$SUF(const $S* F, $S* out, int32_t* info, int64_t P, int64_t d, double lam,
                      int64_t nt) {
    switch (d) {
    case 1: $SUF_inverse_1(F, out, info, P, 1, lam, nt); break;
    case 9: $SUF_inverse_9(F, out, info, P, 9, lam, nt); break;
    default: $SUF_inverse_n(F, out, info, P, (int)d, lam, nt);
    }
}

/* acc[p] (+)= sum_n g[n, p] g[n, p]^T for g [n, P, d] (both triangles written): the
   per-sample outer products of small mini-blocks, one block per iteration (a batched GEMM of
   d x n by n x d matrices does this an order of magnitude slower for d = 9). */
static void outer9_$SUF(const $S* g, $S* acc, int64_t n, int64_t P, int64_t first, int64_t nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t p = 0; p < P; p++) {
        $S s[81] = {0};
        for (int64_t m = 0; m < n; m++) {
            const $S* gp = g + (m * P + p) * 9;
            $S v[9];
            for (int i = 0; i < 9; i++) v[i] = gp[i];
            #pragma GCC unroll 81
            for (int i = 0; i < 9; i++)
                #pragma GCC unroll 9
                for (int j = 0; j <= i; j++) s[i * 9 + j] += v[i] * v[j];
        }
        $S* a = acc + p * 81;
        for (int i = 0; i < 9; i++)
            for (int j = 0; j <= i; j++) {
                const $S x = first ? s[i * 9 + j] : a[i * 9 + j] + s[i * 9 + j];
                a[i * 9 + j] = x;
                a[j * 9 + i] = x;
            }
    }
}

void mbf_outer_$SUF(const $S* g, $S* acc, int64_t n, int64_t P, int64_t d, int64_t first,
                    int64_t nt) {
    if (d == 9) {
        outer9_$SUF(g, acc, n, P, first, nt);
        return;
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t p = 0; p < P; p++) {
        $S s[DMAX * DMAX];
        const int dd = (int)d;
        for (int k = 0; k < dd * dd; k++) s[k] = 0;
        for (int64_t m = 0; m < n; m++) {
            const $S* gp = g + (m * P + p) * d;
            for (int i = 0; i < dd; i++) {
                const $S gi = gp[i];
                for (int j = 0; j <= i; j++) s[i * dd + j] += gi * gp[j];
            }
        }
        $S* a = acc + p * d * d;
        for (int i = 0; i < dd; i++)
            for (int j = 0; j <= i; j++) {
                const $S v = first ? s[i * dd + j] : a[i * dd + j] + s[i * dd + j];
                a[i * dd + j] = v;
                a[j * dd + i] = v;
            }
    }
}

void mbf_ema_$SUF($S* F, const $S* acc, int64_t P, int64_t d, double scale, double w,
                  int64_t first, int64_t nt) {
    const int mode = first ? 0 : (w < 0.5 ? 1 : 2);
    switch (d) {
    case 1: $SUF_ema_1(F, acc, P, 1, scale, w, mode, nt); break;
    case 9: $SUF_ema_9(F, acc, P, 9, scale, w, mode, nt); break;
    default: $SUF_ema_n(F, acc, P, (int)d, scale, w, mode, nt);
    }
}
"""


def _c_source() -> str:
    parts = [_C_HEAD]
    for s, i, suf in (("float", "int32_t", "f32"), ("double", "int64_t", "f64")):
        def sub(text: str, n: str = "", dd: str = "d_", unroll: str = "") -> str:
            return (text.replace("$SUF", suf).replace("$S", s).replace("$V", "v" + suf)
                    .replace("$M", "m" + suf).replace("$I", i).replace("$N", n)
                    .replace("$D", dd).replace("$UNROLL", unroll))
        parts.append(sub(_C_TYPES))
        for n, dd, unroll in (("_1", "1", "#pragma GCC unroll 16"),
                              ("_9", "9", "#pragma GCC unroll 16"), ("_n", "d_", "")):
            parts.append(sub(_C_TILES, n, dd, unroll))
        parts.append(sub(_C_API))
    return "\n".join(parts)


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class _Kernels:
    """ctypes bindings of the compiled kernels (float32 and float64 CPU tensors)."""

    def __init__(self, path: str):
        import ctypes
        lib = ctypes.CDLL(path)
        vp, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        self._fn = {}
        for dtype, suf in ((torch.float32, "f32"), (torch.float64, "f64")):
            apply_, inverse, ema, outer = (getattr(lib, f"mbf_{k}_{suf}")
                                           for k in ("apply", "inverse", "ema", "outer"))
            apply_.argtypes = [vp] * 5 + [i64, i64, f64, f64, f64, f64, i64]
            inverse.argtypes = [vp, vp, vp, i64, i64, f64, i64]
            ema.argtypes = [vp, vp, i64, i64, f64, f64, i64, i64]
            outer.argtypes = [vp, vp, i64, i64, i64, i64, i64]
            for fn in (apply_, inverse, ema, outer):
                fn.restype = None
            self._fn[dtype] = (apply_, inverse, ema, outer)
        self.lib, self.path = lib, path

    @staticmethod
    def usable(*tensors: Tensor) -> bool:
        t0 = tensors[0]
        return all(t.device.type == "cpu" and t.dtype == t0.dtype and t.is_contiguous()
                   for t in tensors) and t0.dtype in (torch.float32, torch.float64)

    def apply(self, inv: Tensor, g: Tensor, d: int, out: Optional[Tensor] = None,
              buf: Optional[Tensor] = None, w: Optional[Tensor] = None, mu: float = 0.0,
              gwd: float = 0.0, awd: float = 0.0, alpha: float = 0.0) -> None:
        """out = M g; or (out None) with p = M (g + gwd w): buf = mu buf + p (buf may be None:
        p itself), w = w + awd w, w = w + alpha buf. All [P, d]-shaped, contiguous."""
        self._fn[g.dtype][0](_ptr(inv), _ptr(g), _ptr(out), _ptr(buf), _ptr(w),
                             g.numel() // d, d, mu, gwd, awd, alpha, torch.get_num_threads())

    def inverse(self, fisher: Tensor, P: int, d: int, lam: float, out: Optional[Tensor] = None,
                info: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Tiles of (F + lam I)^{-1} for the Fisher tiles ``fisher`` of P blocks of size d (into
        ``out`` if it is given and fits), and the failure flag per block (int32, into ``info``
        likewise; the first P entries are set)."""
        nt = -(-P // _TILE)
        shape = (nt, d * (d + 1) // 2, _TILE)
        if out is None or tuple(out.shape) != shape or not self.usable(fisher, out):
            out = fisher.new_empty(shape)
        if info is None or info.numel() != nt * _TILE or info.dtype != torch.int32:
            info = torch.empty(nt * _TILE, dtype=torch.int32)
        self._fn[fisher.dtype][1](_ptr(fisher), _ptr(out), _ptr(info), P, d, lam,
                                  torch.get_num_threads())
        return out, info                                # info: the first P entries are set

    def outer(self, g: Tensor, acc: Optional[Tensor], accumulate: bool = False) -> Tensor:
        """``acc (+)= sum_n g_n g_n^T`` per block for ``g`` [n, P, d] (contiguous): added to
        ``acc`` with ``accumulate``, else written into it (a new [P, d, d] tensor if None).
        Returns it."""
        n, P, d = g.shape
        first = not accumulate
        if acc is None:
            acc = g.new_empty(P, d, d)
        self._fn[g.dtype][3](_ptr(g), _ptr(acc), n, P, d, int(first), torch.get_num_threads())
        return acc

    def ema(self, fisher: Optional[Tensor], acc: Tensor, d: int, scale: float,
            weight: float) -> Tensor:
        """Fisher tiles <- lerp(tiles, scale * acc, weight) in place, for ``acc`` [P, d, d]
        (its lower triangle); with ``fisher`` None, new tiles of scale * acc. Returns them."""
        P = acc.shape[0]
        first = fisher is None
        if first:
            fisher = acc.new_empty(-(-P // _TILE), d * (d + 1) // 2, _TILE)
        self._fn[acc.dtype][2](_ptr(fisher), _ptr(acc), P, d, scale, weight, int(first),
                               torch.get_num_threads())
        return fisher


_NATIVE: dict = {}               # "kernels": _Kernels | None once tried, "error": why not
_NATIVE_LOCK = threading.Lock()
_NATIVE_WARNING = ("native",)    # key in MBF._warned (layer names are strings)


def _build() -> str:
    """Compile the kernels (or find them compiled) and return the path of the shared object."""
    return _native.build("mbf", _c_source(), ["-O3", "-fno-math-errno", "-shared", "-fPIC"])


def _self_check(k: _Kernels) -> None:
    """The compiled kernels against torch on a few random blocks (a miscompiled kernel must
    not reach an optimizer)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for d, P in ((1, 11), (3, 13), (9, 21), (49, 9)):
            x = torch.randn(P, 2 * d, d, generator=g, dtype=torch.float64)
            fisher = x.transpose(1, 2) @ x / (2 * d)
            ref = torch.linalg.inv(fisher + 0.1 * torch.eye(d, dtype=torch.float64))
            tiles, info = k.inverse(_tiles_from_blocks(fisher.to(dtype), lower=True), P, d, 0.1)
            info = info[:P]
            grad = torch.randn(P, d, generator=g, dtype=torch.float64)
            out = torch.empty(P, d, dtype=dtype)
            k.apply(tiles, grad.to(dtype), d, out=out)
            ema = k.ema(_tiles_from_blocks(fisher.to(dtype), lower=True), fisher.to(dtype), d,
                        3.0, 0.25)                               # lerp(F, 3 F, 1/4) = 1.5 F
            tol = 1e-3 if dtype == torch.float32 else 1e-9
            got = _blocks_from_tiles(tiles, P, d).double()
            if (bool(info.any()) or not torch.allclose(got, ref, rtol=tol, atol=tol)
                    or not torch.allclose(out.double(), (ref @ grad.unsqueeze(-1)).squeeze(-1),
                                          rtol=tol, atol=tol)
                    or not torch.allclose(_blocks_from_tiles(ema, P, d).double(), 1.5 * fisher,
                                          rtol=tol, atol=tol)):
                raise RuntimeError(f"self-check failed (d={d}, {dtype})")
        for d in (1, 9, 12):
            gs = torch.randn(5, 7, d, generator=g, dtype=torch.float64)
            ref = torch.einsum("npi,npj->pij", gs, gs)
            acc = k.outer(gs[:3].to(dtype).contiguous(), torch.full((7, d, d), 9.0, dtype=dtype))
            acc = k.outer(gs[3:].to(dtype).contiguous(), acc, accumulate=True)
            tol = 1e-4 if dtype == torch.float32 else 1e-12
            if not torch.allclose(acc.double(), ref, rtol=tol, atol=tol):
                raise RuntimeError(f"self-check failed (outer, d={d}, {dtype})")


def _native_kernels() -> Optional[_Kernels]:
    """The compiled kernels, built on first use; None where they cannot be had."""
    def make() -> _Kernels:
        kernels = _Kernels(_build())
        _self_check(kernels)
        return kernels
    return _native.load_once(_NATIVE, _NATIVE_LOCK, "SSL_SUITE_MBF_NATIVE", make)
