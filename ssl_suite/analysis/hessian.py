"""Hessian-vector products, power iteration, Lanczos and stochastic Lanczos quadrature (SLQ) for the
full-batch and the mini-batch Hessian, and the per-run job ``ssl-suite analyze hessian``.

Granziol, Zohren, Roberts, "Learning Rates as a Function of Batch Size: A Random Matrix Theory
Approach to Neural Network Training", JMLR 23 (2022), arXiv 2006.09092. Spec:
``shared/algorithms/flat_minima_lr_scaling_generic_adam.md`` §3.1, §3.3, §3.4 and §3.6.

* Hessian-vector product (spec §3.4, the paper's code ``curvature/utils.py::hess_vec``):
  H v = d/dw <grad L(w), v> by double backward. The full-batch Hessian is the average of the
  batch Hessians over a fixed list of batches, ``H = sum_b w_b H_b`` (w_b = 1/n by default); the
  mini-batch Hessian H_B is one batch's. Weight decay (+wd I) is not included, as in the code.
  ``method="func"`` computes the same product forward-over-reverse with :mod:`torch.func`
  (``jvp(grad(L))``), for modules whose forward does not mutate buffers.
* Lanczos with full re-orthogonalisation (spec §3.4): m steps from q_1 = z/||z||,
  T = tridiag(alpha, beta) = U Theta U^T; Ritz values theta_k = Theta_kk, quadrature weights
  tau_k = U_1k^2 (Golub-Welsch). With m = dim the Ritz values are the eigenvalues.
* SLQ spectral density (spec §3.4): rho(lambda) ~ (1/n_v) sum_r sum_k tau_k^(r) delta(lambda -
  theta_k^(r)), optionally Gaussian-smoothed; moments (1/n_v) sum tau theta^p estimate tr(H^p)/P.
  The paper's code draws one Gaussian probe; here ``probes`` independent ones.
* Power iteration for the eigenvalue of largest magnitude (a check on Lanczos' lambda_max).
* Batch-Hessian noise statistics of the damping companion (spec §3.6, ``rmt_damping_dl``
  ``curvature/utils.py::loss_stats``): hess_var = E_b||H_b z||^2 - ||E_b H_b z||^2,
  hess_mu = z^T E_b[H_b] z, delta = ||E_b[H_b z] - hess_mu z||^2, shrinkage
  max(0, 1 - hess_var / n / delta).

The theory these numbers feed (outlier shift lambda' = lambda + P sigma^2 / (B lambda), maximal
learning rates, damping) is in :mod:`ssl_suite.analysis.lr_rules`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import SSLSuiteError

LossFn = Callable[[], torch.Tensor]


class HessianJobError(SSLSuiteError, ValueError):
    """Bad input to the Hessian analysis; ``str(err)`` is one line naming what was wrong."""


# ---- flat vectors <-> parameter lists ----------------------------------------------------------

def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (the parameter order defines the coordinates)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[i:i + n].view_as(t))
        i += n
    if i != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the parameters {i}")
    return out


def _params_list(params: Union[torch.Tensor, Sequence[torch.Tensor], Iterator]
                 ) -> list[torch.Tensor]:
    ps = [params] if isinstance(params, torch.Tensor) else list(params)
    if not ps:
        raise ValueError("no parameters given")
    if not all(p.requires_grad for p in ps):
        raise ValueError("every parameter must have requires_grad=True")
    if len({p.dtype for p in ps}) != 1 or len({p.device for p in ps}) != 1:
        raise ValueError("all parameters must share one dtype and one device")
    return ps


class _LossCall(nn.Module):
    """Lets :func:`torch.func.functional_call` substitute ``module``'s parameters while
    ``loss_fn()`` (which calls ``module``) runs."""

    def __init__(self, module: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn()


class HessianOperator:
    """v -> H v for ``L(w) = sum_b weights[b] * loss_fns[b]()``, over the tensors ``params``.

    ``loss_fns`` is one callable (the mini-batch Hessian H_B) or a list (the full-batch Hessian
    over a fixed list of batches; equal weights 1/n unless ``weights`` are given). Each callable
    must compute the same function every call (fixed data, fixed augmentations, no dropout), or
    the operator is not a fixed symmetric matrix.

    ``method``:
      * ``"autograd"`` (default): double backward (spec §3.4). With ``cache_graph`` the graph of
        grad L_b is built once per batch and kept, so a product costs one backward through it
        instead of forward + backward + double backward (about 1.5x faster, but it holds one
        double-backward graph per batch in memory).
      * ``"func"``: ``torch.func.jvp(torch.func.grad(L))`` (forward-over-reverse); needs
        ``module``, the nn.Module holding ``params`` that ``loss_fns`` call. Buffers must not be
        mutated in the forward (BN in eval mode, or with ``track_running_stats=False``).

    Vectors are flat, in the order of ``params``, of their dtype and device; use float64
    parameters for exact comparisons. ``num_matvecs`` counts products (one per batch).
    """

    def __init__(self, params, loss_fns: Union[LossFn, Sequence[LossFn]],
                 weights: Optional[Sequence[float]] = None, method: str = "autograd",
                 module: Optional[nn.Module] = None, cache_graph: bool = False):
        self.params = _params_list(params)
        self.loss_fns = [loss_fns] if callable(loss_fns) else list(loss_fns)
        if not self.loss_fns:
            raise ValueError("loss_fns is empty")
        n = len(self.loss_fns)
        self.weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
        if len(self.weights) != n:
            raise ValueError(f"{len(self.weights)} weights for {n} loss functions")
        if method not in ("autograd", "func"):
            raise ValueError(f"method must be 'autograd' or 'func', got {method!r}")
        if method == "func":
            if module is None:
                raise ValueError("method='func' needs the module that holds the parameters")
            names = {id(p): name for name, p in module.named_parameters()}
            missing = [i for i, p in enumerate(self.params) if id(p) not in names]
            if missing:
                raise ValueError(f"method='func': parameters {missing} are not in the module")
            self._names = ["module." + names[id(p)] for p in self.params]
        self.method, self.module, self.cache_graph = method, module, cache_graph
        self._graphs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.num_matvecs = 0

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def loss(self) -> float:
        """``L(w)`` at the current parameters."""
        with torch.no_grad():
            return float(sum(w * fn().detach().double()
                             for w, fn in zip(self.weights, self.loss_fns)))

    def _grads(self, b: int) -> tuple[torch.Tensor, ...]:
        if self.cache_graph and b in self._graphs:
            return self._graphs[b]
        with torch.enable_grad():
            grads = torch.autograd.grad(self.loss_fns[b](), self.params, create_graph=True,
                                        allow_unused=True)
        if self.cache_graph:
            self._graphs[b] = grads
        return grads

    def _hvp_autograd(self, b: int, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = self._grads(b)
        # A gradient that is constant in w (or absent) contributes a zero block.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = [torch.zeros_like(p) for p in self.params]
        if live:
            with torch.enable_grad():
                hv = torch.autograd.grad([grads[i] for i in live], self.params,
                                         grad_outputs=[vs[i] for i in live],
                                         retain_graph=self.cache_graph, allow_unused=True)
            out = [h if h is not None else o for h, o in zip(hv, out)]
        return out

    def _hvp_func(self, b: int, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.func import functional_call, grad, jvp
        call = _LossCall(self.module, self.loss_fns[b])
        names = self._names
        argnums = tuple(range(len(names)))

        def loss(*ps):
            return functional_call(call, dict(zip(names, ps)), (), strict=False)

        primals = tuple(p.detach() for p in self.params)
        _, hv = jvp(lambda *ps: grad(loss, argnums=argnums)(*ps), primals, tuple(vs))
        return list(hv)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (returns a flat vector, detached)."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {tuple(v.shape)}")
        vs = unflatten(v.to(self.dtype), self.params)
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for b, w in enumerate(self.weights):
            hv = self._hvp_func(b, vs) if self.method == "func" else self._hvp_autograd(b, vs)
            total.add_(flatten([h.detach() for h in hv]), alpha=w)
            self.num_matvecs += 1
        return total

    __call__ = matvec

    def dense(self) -> torch.Tensor:
        """The explicit ``dim x dim`` Hessian, column by column (``dim`` products; small models)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(eye[i]) for i in range(self.dim)], dim=1)

    def clear_cache(self) -> None:
        self._graphs.clear()


def hessian_vector_product(loss_fn: LossFn, params, vector) -> list[torch.Tensor]:
    """``H v`` of the scalar ``loss_fn()`` w.r.t. ``params`` by double backward (spec §3.4);
    ``vector`` is a flat tensor or a list shaped like ``params``. Returns a list like ``params``."""
    op = HessianOperator(params, loss_fn)
    v = vector if isinstance(vector, torch.Tensor) else flatten(list(vector))
    return unflatten(op.matvec(v.reshape(-1)), op.params)


Operator = Union[HessianOperator, Callable[[torch.Tensor], torch.Tensor]]


def _op_info(op: Operator, dim: Optional[int], dtype, device):
    dim = getattr(op, "dim", dim)
    if dim is None:
        raise ValueError("dim is needed when the operator is a plain callable")
    return int(dim), getattr(op, "dtype", dtype or torch.float64), \
        getattr(op, "device", device or torch.device("cpu"))


def _random_unit(dim: int, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(dim, generator=g, dtype=torch.float64)
    return (z / z.norm()).to(dtype=dtype, device=device)


# ---- power iteration --------------------------------------------------------------------------

@dataclass
class PowerIterationResult:
    eigenvalue: float        # Rayleigh quotient v^T H v at the last iterate (signed)
    vector: torch.Tensor     # unit eigenvector estimate
    iterations: int
    converged: bool


def power_iteration(op: Operator, iters: int = 100, tol: float = 1e-6, seed: int = 0,
                    v0: Optional[torch.Tensor] = None, dim: Optional[int] = None,
                    dtype=None, device=None) -> PowerIterationResult:
    """Power iteration v <- Hv/||Hv|| for the eigenvalue of largest *magnitude* (it may be a
    negative one); stops when the Rayleigh quotient changes by less than ``tol`` relative."""
    dim, dtype, device = _op_info(op, dim, dtype, device)
    v = _random_unit(dim, seed, dtype, device) if v0 is None else (v0 / v0.norm()).to(dtype)
    lam_prev, lam = None, 0.0
    for it in range(1, iters + 1):
        w = op(v)
        lam = float(torch.dot(v.double(), w.double()))
        norm = w.norm()
        if norm == 0:
            return PowerIterationResult(0.0, v, it, True)
        v = w / norm
        if lam_prev is not None and abs(lam - lam_prev) <= tol * max(abs(lam), 1e-30):
            return PowerIterationResult(lam, v, it, True)
        lam_prev = lam
    return PowerIterationResult(lam, v, iters, False)


# ---- Lanczos and SLQ --------------------------------------------------------------------------

@dataclass
class LanczosResult:
    alphas: torch.Tensor          # diagonal of T (float64, cpu), length m
    betas: torch.Tensor           # off-diagonal of T, length m - 1
    ritz_values: torch.Tensor     # theta_k, ascending (float64, cpu)
    ritz_weights: torch.Tensor    # tau_k = U_1k^2, sum to 1
    basis: Optional[torch.Tensor] = None   # Q (m x dim) when kept
    eigvecs_T: Optional[torch.Tensor] = None

    @property
    def steps(self) -> int:
        return self.alphas.numel()

    @property
    def lambda_max(self) -> float:
        return float(self.ritz_values[-1])

    @property
    def lambda_min(self) -> float:
        return float(self.ritz_values[0])

    def ritz_vectors(self) -> torch.Tensor:
        """Ritz vectors (rows, ascending Ritz value) ``U^T Q``; needs ``keep_basis=True``."""
        if self.basis is None:
            raise ValueError("run lanczos(..., keep_basis=True) to get Ritz vectors")
        return self.eigvecs_T.T.to(self.basis.dtype).to(self.basis.device) @ self.basis


def lanczos(op: Operator, steps: int, v0: Optional[torch.Tensor] = None, seed: int = 0,
            reorthogonalize: bool = True, keep_basis: bool = False, tol: Optional[float] = None,
            dim: Optional[int] = None, dtype=None, device=None,
            callback: Optional[Callable[[int], None]] = None) -> LanczosResult:
    """Lanczos tridiagonalisation of the symmetric operator ``op`` (spec §3.4).

    q_1 = v0/||v0|| (default a seeded Gaussian); for j = 1..m: w = H q_j - beta_{j-1} q_{j-1},
    alpha_j = q_j^T H q_j, w -= alpha_j q_j, then (``reorthogonalize``) w -= Q (Q^T w) twice
    ("twice is enough", which removes the ghost copies of converged Ritz values), beta_j = ||w||,
    q_{j+1} = w / beta_j. Stops early at an invariant subspace (beta_j <= tol * ||T||). The
    basis Q (m x dim) is held in memory. ``steps`` is capped at ``dim``.
    Ritz values and weights come from ``eigh(T)`` in float64: theta = eig(T), tau_k = U_1k^2.
    """
    dim, dtype, device = _op_info(op, dim, dtype, device)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = min(int(steps), dim)
    q = _random_unit(dim, seed, dtype, device) if v0 is None \
        else (v0.reshape(-1) / v0.norm()).to(dtype=dtype, device=device)
    Q = torch.empty(m, dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(dtype).eps
    tol = 1e3 * eps if tol is None else tol
    scale = 0.0
    for j in range(m):
        Q[j] = q
        w = op(q).to(dtype)
        if callback is not None:
            callback(j)
        alpha = float(torch.dot(q.double(), w.double()))
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * Q[j - 1]
        if reorthogonalize:
            for _ in range(2):
                w = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        alphas.append(alpha)
        if j == m - 1:
            break
        beta = float(w.double().norm())
        scale = max(scale, abs(alpha), beta)
        if beta <= tol * max(scale, 1e-300):
            break
        betas.append(beta)
        q = w / beta
    a = torch.tensor(alphas, dtype=torch.float64)
    b = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
    T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
    theta, U = torch.linalg.eigh(T)
    weights = U[0] ** 2
    k = len(alphas)
    return LanczosResult(a, b, theta, weights / weights.sum(),
                         Q[:k] if keep_basis else None, U if keep_basis else None)


@dataclass
class SpectralDensity:
    """SLQ estimate of the spectral density of a ``dim x dim`` symmetric matrix: per probe r, Ritz
    values ``nodes[r]`` with quadrature weights ``weights[r]`` (each sums to 1)."""

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    dim: int
    alphas: list[torch.Tensor] = field(default_factory=list)
    betas: list[torch.Tensor] = field(default_factory=list)

    @property
    def probes(self) -> int:
        return len(self.nodes)

    @property
    def lambda_max(self) -> float:
        """Largest Ritz value over probes (a lower bound on the true lambda_max)."""
        return max(float(t.max()) for t in self.nodes)

    @property
    def lambda_min(self) -> float:
        return min(float(t.min()) for t in self.nodes)

    def moment(self, p: int) -> float:
        """(1/n_v) sum_r sum_k tau_k theta_k^p, an estimate of tr(H^p) / dim."""
        total = sum(float((w * t ** p).sum()) for t, w in zip(self.nodes, self.weights))
        return total / self.probes

    @property
    def trace(self) -> float:
        """dim * first moment: the Hutchinson-type estimate of tr(H) (spec §3.4)."""
        return self.dim * self.moment(1)

    def cdf(self, x: Union[float, torch.Tensor]) -> torch.Tensor:
        """Fraction of the spectrum at or below ``x``: (1/n_v) sum tau_k 1[theta_k <= x]."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1)
        total = sum((w * (t <= x)).sum(-1) for t, w in zip(self.nodes, self.weights))
        return total / self.probes

    def default_sigma(self) -> float:
        """Smoothing width: 1% of the estimated spectral range (or 1e-3 for a point spectrum)."""
        width = self.lambda_max - self.lambda_min
        return 0.01 * width if width > 0 else 1e-3

    def grid(self, points: int = 400, margin: float = 0.05) -> torch.Tensor:
        lo, hi = self.lambda_min, self.lambda_max
        pad = margin * (hi - lo) if hi > lo else 1.0
        return torch.linspace(lo - pad, hi + pad, points, dtype=torch.float64)

    def density(self, grid: Optional[torch.Tensor] = None,
                sigma: Optional[float] = None) -> torch.Tensor:
        """Gaussian-smoothed density (1/n_v) sum_r sum_k tau_k N(lambda; theta_k, sigma^2) on
        ``grid``; it integrates to 1."""
        grid = self.grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64)
        sigma = self.default_sigma() if sigma is None else float(sigma)
        x = grid.reshape(-1, 1)
        out = torch.zeros(grid.numel(), dtype=torch.float64)
        for t, w in zip(self.nodes, self.weights):
            out += (w * torch.exp(-0.5 * ((x - t) / sigma) ** 2)).sum(-1)
        return out / (self.probes * sigma * math.sqrt(2 * math.pi))


def slq(op: Operator, steps: int, probes: int = 1, seed: int = 0, dim: Optional[int] = None,
        dtype=None, device=None,
        callback: Optional[Callable[[int], None]] = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature (spec §3.4): ``probes`` Lanczos runs of ``steps`` steps with
    full re-orthogonalisation from independent Gaussian probes (seeds ``seed``, ``seed+1``, ...)."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    dim, dtype, device = _op_info(op, dim, dtype, device)
    runs = [lanczos(op, steps, seed=seed + r, dim=dim, dtype=dtype, device=device,
                    callback=callback) for r in range(probes)]
    return SpectralDensity([r.ritz_values for r in runs], [r.ritz_weights for r in runs], dim,
                           [r.alphas for r in runs], [r.betas for r in runs])


# ---- batch-Hessian noise (spec §3.6) ------------------------------------------------------------

@dataclass
class HessianNoise:
    hess_mu: float       # z^T E_b[H_b] z
    hess_var: float      # E_b ||H_b z||^2 - ||E_b H_b z||^2  (~ P sigma^2 / B, see lr_rules)
    delta: float         # ||E_b[H_b z] - hess_mu z||^2
    shrinkage: float     # max(0, 1 - hess_var / n / delta)
    num_batches: int


def batch_hessian_noise(params, loss_fns: Sequence[LossFn], seed: int = 0,
                        z: Optional[torch.Tensor] = None) -> HessianNoise:
    """Hessian-vector statistics over batches for a random unit z (spec §3.6, ``rmt_damping_dl``
    ``curvature/utils.py::loss_stats``): each batch's H_b z, their mean and spread. hess_var is
    the noise that the batch Hessian adds along z; with element variance sigma^2/B it is
    P sigma^2 / B [RECONSTRUCTION: the Wigner-model reading of the spec §3.1]."""
    loss_fns = list(loss_fns)
    if len(loss_fns) < 2:
        raise ValueError("batch_hessian_noise needs at least two batches")
    ops = [HessianOperator(params, fn) for fn in loss_fns]
    z = _random_unit(ops[0].dim, seed, ops[0].dtype, ops[0].device) if z is None \
        else (z / z.norm()).to(ops[0].dtype)
    hz = torch.stack([op(z).double() for op in ops])
    mean = hz.mean(0)
    hess_var = float((hz ** 2).sum(1).mean() - (mean ** 2).sum())
    hess_mu = float(torch.dot(z.double(), mean))
    delta = float(((mean - hess_mu * z.double()) ** 2).sum())
    n = len(loss_fns)
    shrink = max(0.0, 1.0 - hess_var / n / delta) if delta > 0 else 0.0
    return HessianNoise(hess_mu, hess_var, delta, shrink, n)


# ---- the per-run job ----------------------------------------------------------------------------

@contextlib.contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers in train mode normalise with batch statistics but leave their running
    statistics untouched (``track_running_stats=False`` for the duration)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    try:
        for m in bns:
            m.track_running_stats = False
        yield
    finally:
        for m, s in zip(bns, saved):
            m.track_running_stats = s


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HessianJobError(f"hessian: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _summary(sd: SpectralDensity, loss: float, images: int) -> dict:
    return {"images": images, "loss": loss, "lambda_max": sd.lambda_max,
            "lambda_min": sd.lambda_min, "trace": sd.trace,
            "sgd_max_lr": 2.0 / sd.lambda_max if sd.lambda_max > 0 else None,
            "negative_mass": float(sd.cdf(0.0)[0]) if sd.lambda_min < 0 else 0.0}


def _plot(path: Path, spectra: dict[str, SpectralDensity], title: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise HessianJobError("hessian: the plot needs matplotlib: "
                              "pip install 'ssl_suite[plots]'") from None
    lo = min(s.lambda_min for s in spectra.values())
    hi = max(s.lambda_max for s in spectra.values())
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    grid = torch.linspace(lo - pad, hi + pad, 600, dtype=torch.float64)
    sigma = 0.01 * (hi - lo) if hi > lo else 1e-3
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.88, wspace=0.22)
    ax1, ax2 = fig.subplots(1, 2)
    peak = 0.0
    for (name, sd), colour in zip(spectra.items(), ("C0", "C3")):
        dens = sd.density(grid, sigma)
        peak = max(peak, float(dens.max()))
        ax1.plot(grid.numpy(), dens.clamp_min(1e-300).numpy(), color=colour,
                 label=f"{name} (lambda_max {sd.lambda_max:.3g})")
        ax1.axvline(sd.lambda_max, color=colour, ls="--", lw=0.8)
        for r, (t, w) in enumerate(zip(sd.nodes, sd.weights)):
            ax2.scatter(t.numpy(), w.clamp_min(1e-300).numpy(), s=14, color=colour, alpha=0.7,
                        marker="o" if r == 0 else "x", label=name if r == 0 else None)
    ax1.set_yscale("log")
    ax1.set_ylim(peak * 1e-7, peak * 3)   # seven decades: the outliers' weights are small
    ax1.set_xlabel("eigenvalue")
    ax1.set_ylabel(f"SLQ density (Gaussian sigma {sigma:.2g})")
    ax2.set_yscale("log")
    ax2.set_xlabel("Ritz value theta_k")
    ax2.set_ylabel("quadrature weight tau_k (o first probe, x others)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _atomic_write(path, lambda p: fig.savefig(p, format="png"))


def hessian_job(run_dir: str, batch_size: int = 128, num_batches: int = 4, lanczos_steps: int = 30,
                probes: int = 2, seed: int = 0, out: Optional[str] = None, progress: bool = True,
                bn_mode: str = "train", cache_graph: Optional[bool] = None,
                device: Optional[str] = None) -> dict:
    """Spectrum of the BYOL loss Hessian of a run's online network, full-batch and mini-batch.

    The function (fixed so that its Hessian is a fixed matrix): ``num_batches * batch_size``
    pretraining images drawn once with ``seed``; their two views T, T' drawn once from the run's
    augmentation with ``seed``; the target network (latest checkpoint) frozen, its projections
    z1, z2 computed once; the loss per batch is the run's ``byol_loss(q1, q2, z1, z2)`` (mean over
    the batch). The Hessian is w.r.t. all online parameters (encoder, projector, predictor);
    weight decay is not included (as in the paper's ``hess_vec``).

    * full-batch Hessian: the average of the ``num_batches`` batch Hessians;
    * mini-batch Hessian H_B: the first batch's (B = ``batch_size``), spec §3.3.

    ``bn_mode="train"`` (default, the function training optimises and the paper's default in
    ``spectrum.py``): batch-norm uses each batch's statistics, computed per view as in training;
    running statistics are left untouched. ``"eval"``: running statistics of the checkpoint.

    SLQ with ``lanczos_steps`` steps and ``probes`` probes for each Hessian (probes *
    lanczos_steps * (num_batches + 1) batch products, the same probes for both). The summary
    per Hessian: lambda_max / lambda_min (extreme Ritz values), trace estimate, loss, 2/lambda_max
    (the largest stable plain-SGD lr), the spectral mass below 0; and ``outlier_model``, the
    (lambda, s) of lambda'(B) = lambda + s/(B lambda) through the two top eigenvalues with
    B* = s/lambda^2 (spec §3.1; [RECONSTRUCTION], None when the mini-batch value is not the
    larger). Writes ``hessian.csv`` (Ritz values and
    weights: hessian, images, probe, index, ritz_value, weight), ``hessian.json`` (the summary
    returned) and ``hessian.png`` (smoothed densities on a log scale, Ritz values and weights) into
    ``out`` (default ``RUN/analysis``). Bad input raises :class:`HessianJobError` (a ValueError)
    with one line. ``cache_graph`` (see :class:`HessianOperator`; about 1.5x faster, one
    double-backward graph per batch held in memory): default on for a CPU device, off on a GPU.
    ``device``: default CUDA when available.
    """
    from tqdm.auto import tqdm

    from ..augment import BYOLAugment
    from ..data import build_data
    from ..engine.runs import load_networks
    from ..models import byol_loss
    from . import lr_rules

    t_start = time.perf_counter()
    batch_size = _check_int("batch_size", batch_size, 2 if bn_mode == "train" else 1)
    num_batches = _check_int("num_batches", num_batches, 1)
    lanczos_steps = _check_int("lanczos_steps", lanczos_steps, 1)
    probes = _check_int("probes", probes, 1)
    seed = _check_int("seed", seed, 0)
    if bn_mode not in ("train", "eval"):
        raise HessianJobError(f"hessian: bn_mode must be 'train' or 'eval', got {bn_mode!r}")
    try:
        cfg, online, target, state, latest = load_networks(run_dir)
    except SSLSuiteError as e:
        raise HessianJobError(str(e)) from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cache_graph is None:
        cache_graph = dev.type == "cpu"
    online.to(dev)
    target.to(dev)

    data = build_data(cfg.data, show_progress=False)
    n_images = len(data.pretrain)
    need = batch_size * num_batches
    if need > n_images:
        raise HessianJobError(f"hessian: batch_size * num_batches = {need} exceeds the "
                              f"{n_images} pretraining images of {cfg.data.name}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_images, generator=g)[:need]
    pretrain = data.pretrain
    images = pretrain.images[idx] if hasattr(pretrain, "images") \
        else torch.stack([pretrain[int(i)][0] for i in idx])
    augment = BYOLAugment(cfg.augment, data.mean, data.std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = [augment(images[b * batch_size:(b + 1) * batch_size]) for b in range(num_batches)]
    views = [(v1.to(dev), v2.to(dev)) for v1, v2 in views]

    online.train(bn_mode == "train")
    target.train(bn_mode == "train")
    params = [p for p in online.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    rows: list[tuple] = []
    spectra: dict[str, SpectralDensity] = {}
    summary: dict = {}
    bn_ctx = batch_statistics_only if bn_mode == "train" else (lambda m: contextlib.nullcontext())
    with bn_ctx(online), bn_ctx(target):
        with torch.no_grad():
            z = [(target(v1), target(v2)) for v1, v2 in views]

        def batch_loss(b: int) -> LossFn:
            def fn() -> torch.Tensor:
                q1, q2 = online(*views[b])
                return byol_loss(q1, q2, z[b][0], z[b][1])
            return fn

        fns = [batch_loss(b) for b in range(num_batches)]
        steps = min(lanczos_steps, dim)
        total = probes * steps * (num_batches + 1)
        bar = tqdm(total=total, disable=not progress, desc="hessian (batch products)",
                   unit="hvp", dynamic_ncols=True)
        try:
            for name, loss_fns in (("full", fns), ("mini", fns[:1])):
                op = HessianOperator(params, loss_fns, cache_graph=cache_graph)
                per = len(loss_fns)
                sd = slq(op, steps, probes, seed=seed, callback=lambda _j, per=per: bar.update(per))
                op.clear_cache()
                spectra[name] = sd
                images_used = per * batch_size
                summary[name] = _summary(sd, op.loss(), images_used)
                for r, (t, w) in enumerate(zip(sd.nodes, sd.weights)):
                    rows += [(name, images_used, r, k, float(tk), float(wk))
                             for k, (tk, wk) in enumerate(zip(t.tolist(), w.tolist()))]
        finally:
            bar.close()

    full, mini = summary["full"], summary["mini"]
    model = None
    if num_batches > 1:   # lambda' = lambda + s/(B lambda) through the two measured outliers
        model = lr_rules.outlier_model_from_two(mini["lambda_max"], batch_size,
                                                full["lambda_max"], need)
    result = {
        "run_dir": str(run_dir), "checkpoint": str(latest),
        "step": int(state.get("step", -1)) if isinstance(state, dict) else -1,
        "params": dim, "batch_size": batch_size, "num_batches": num_batches,
        "lanczos_steps": steps, "probes": probes, "seed": seed, "bn_mode": bn_mode,
        "full": full, "mini": mini,
        "outlier_ratio": mini["lambda_max"] / full["lambda_max"] if full["lambda_max"] else None,
        "outlier_model": None if model is None else {
            "lambda_inf": model[0], "noise_scale": model[1],
            "critical_batch_size": lr_rules.critical_batch_size(model[0], model[1])},
    }
    out_dir = Path(out) if out else Path(run_dir) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / "hessian.csv", "json": out_dir / "hessian.json",
             "png": out_dir / "hessian.png"}

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["hessian", "images", "probe", "index", "ritz_value", "weight"])
            w.writerows(rows)

    _atomic_write(files["csv"], write_csv)
    _plot(files["png"], {f"full ({full['images']} images)": spectra["full"],
                         f"mini-batch (B={batch_size})": spectra["mini"]},
          f"BYOL loss Hessian of the online network, {Path(run_dir).name} step {result['step']}, "
          f"SLQ {steps} steps x {probes} probes, BN {bn_mode} mode")
    result["files"] = {k: str(v) for k, v in files.items()}
    result["seconds"] = time.perf_counter() - t_start
    _atomic_write(files["json"], lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    return result


__all__ = ["HessianJobError", "HessianNoise", "HessianOperator", "LanczosResult",
           "PowerIterationResult", "SpectralDensity", "batch_hessian_noise",
           "batch_statistics_only", "flatten", "hessian_job", "hessian_vector_product", "lanczos",
           "power_iteration", "slq", "unflatten"]
