"""Learning rates (and damping) from curvature: stability limits, the batch-size scaling rules of
Granziol, Zohren, Roberts (JMLR 23, 2022, arXiv 2006.09092), and their on-the-fly LR/momentum
learner from a Lanczos estimate. Spec: ``shared/algorithms/flat_minima_lr_scaling_generic_adam.md``
§3.1, §3.2, §3.5, §3.6. Curvature estimates come from :mod:`ssl_suite.analysis.hessian`.

Notation: P parameters, B batch size, lambda the top eigenvalue of the full-data Hessian,
s = P sigma^2 the "noise scale" (sigma^2/B is the element variance of the batch-Hessian noise).

* Stability on a quadratic (standard): gradient descent is stable iff lr * lambda_max < 2; heavy
  ball with momentum rho iff lr * lambda_max < 2 (1 + rho); PyTorch's Nesterov form iff
  lr * lambda_max < 2 (1 + rho) / (1 + 2 rho).
* Batch-Hessian outlier (spec §3.1, the paper's central formula [PAPER-R]): lambda appears in
  the batch Hessian at lambda' = lambda + s / (B lambda); read strictly (BBP), only when
  lambda^2 > s/B, else it is inside the bulk of edge 2 sqrt(s/B) (``bbp=True``).
* Maximal SGD learning rate (spec §3.2): lr_max(B) = 2 / lambda'(B) = 2 B lambda /
  (B lambda^2 + s): linear in B for B << B* = s / lambda^2, saturating at 2/lambda for B >> B*.
* Adaptive methods (Adam): lr_max ~ sqrt(B) ([ABS]; derivation [RECONSTRUCTION], spec §3.2).
* Minimal damping for stochastic second-order / adaptive methods: delta_min ~ lr / B ([ABS];
  the paper's K-FAC protocol keeps delta * B fixed at fixed lr, spec §3.3).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "nadam", "radam", "adamax", "adagrad", "adadelta",
                       "rmsprop", "lamb", "generic_adam", "adabelief", "adafactor", "adan")


def _positive(name: str, x: float) -> float:
    x = float(x)
    if not x > 0 or not math.isfinite(x):
        raise ValueError(f"{name} must be a positive finite number, got {x}")
    return x


# ---- stability limits ------------------------------------------------------------------------

def max_stable_lr(lambda_max: float, momentum: float = 0.0, nesterov: bool = False,
                  dampening: float = 0.0) -> float:
    """Largest stable learning rate of (PyTorch) SGD on a quadratic with top curvature
    ``lambda_max``: the iteration on the top eigen-direction has a root at -1 exactly here.

    * plain GD: 2 / lambda_max (spec §3.2: "alpha < 2/lambda'_1");
    * heavy ball, x+ = x - lr g + rho (x - x-) (``torch.optim.SGD`` with momentum, whose buffer
      is rho b + (1 - dampening) g): 2 (1 + rho) / ((1 - dampening) lambda_max);
    * PyTorch Nesterov (x -= lr (g + rho b)): 2 (1 + rho) / ((1 + 2 rho) lambda_max).
    The 2x2 iteration matrices and their Jury conditions are standard; the momentum cases are
    [RECONSTRUCTION] (the paper states the GD case).
    """
    lam = _positive("lambda_max", lambda_max)
    rho = float(momentum)
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {rho}")
    if not 0.0 <= dampening < 1.0:
        raise ValueError(f"dampening must be in [0, 1), got {dampening}")
    if nesterov:
        if dampening:
            raise ValueError("Nesterov momentum requires dampening = 0 (as torch.optim.SGD)")
        return 2.0 * (1.0 + rho) / ((1.0 + 2.0 * rho) * lam)
    return 2.0 * (1.0 + rho) / ((1.0 - dampening) * lam)


# ---- the batch Hessian (spec §3.1) ------------------------------------------------------------

def bulk_edge(noise_scale: float, batch_size: float) -> float:
    """Edge 2 sigma sqrt(P/B) = 2 sqrt(s/B) of the semicircle the batch noise adds (spec §3.1)."""
    return 2.0 * math.sqrt(max(float(noise_scale), 0.0) / _positive("batch_size", batch_size))


def batch_outlier(lambda_full: float, noise_scale: float, batch_size: float,
                  bbp: bool = False) -> float:
    """Top eigenvalue of the batch-B Hessian given the full one: lambda + s/(B lambda), the
    paper's formula (spec §3.1 [PAPER-R]), which gives the linear rule of :func:`max_lr_for_batch`.

    ``bbp=True`` applies the spec's threshold strictly (the BBP transition of a deformed Wigner
    matrix): the outlier exists only when lambda^2 > s/B, i.e. B > B* = s/lambda^2; below it the
    top eigenvalue is the bulk edge 2 sqrt(s/B) (the two agree at B = B*). Note the tension in
    the spec: its linear regime "B << B*" lies below that threshold, where the strict reading
    gives lr_max = sqrt(B/s), a square-root law [RECONSTRUCTION; the paper's text could not be
    checked]. ``scripts/study_batch_hessian.py`` measures which one a small network follows.
    """
    lam = _positive("lambda_full", lambda_full)
    b = _positive("batch_size", batch_size)
    s = float(noise_scale)
    if s < 0:
        raise ValueError(f"noise_scale must be >= 0, got {s}")
    if not bbp or lam * lam > s / b:
        return lam + s / (b * lam)
    return bulk_edge(s, b)


def critical_batch_size(lambda_full: float, noise_scale: float) -> float:
    """B* = s / lambda^2, where the noise term equals lambda (spec §3.1 [RECONSTRUCTION])."""
    return float(noise_scale) / _positive("lambda_full", lambda_full) ** 2


def max_lr_for_batch(batch_size: float, lambda_full: float, noise_scale: float,
                     momentum: float = 0.0, nesterov: bool = False, bbp: bool = False) -> float:
    """The paper's maximal SGD learning rate at batch size B (spec §3.2):
    lr_max(B) = 2 / lambda'(B) = 2 B lambda / (B lambda^2 + s), linear in B for B << B* and
    saturating at 2/lambda for B >> B*; with momentum as in :func:`max_stable_lr`. ``bbp``: see
    :func:`batch_outlier` (below B* the limit is then sqrt(B / s))."""
    return max_stable_lr(batch_outlier(lambda_full, noise_scale, batch_size, bbp), momentum,
                         nesterov)


def fit_outlier_model(batch_sizes: Sequence[float],
                      lambdas: Sequence[float]) -> tuple[float, float]:
    """Fit lambda'(B) = lambda + c/B (c = s/lambda) to measured batch-Hessian top eigenvalues by
    least squares in relative error; returns ``(lambda, s)`` with s = c * lambda. Use points in the
    outlier regime (lambda'(B) well above the bulk)."""
    bs = torch.tensor([float(b) for b in batch_sizes], dtype=torch.float64)
    ls = torch.tensor([float(v) for v in lambdas], dtype=torch.float64)
    if bs.numel() < 2 or bs.numel() != ls.numel():
        raise ValueError("need at least two (batch size, lambda) pairs of equal length")
    if (bs <= 0).any() or (ls <= 0).any():
        raise ValueError("batch sizes and lambdas must be positive")
    A = torch.stack([torch.ones_like(bs), 1.0 / bs], 1) / ls[:, None]
    sol = torch.linalg.lstsq(A, torch.ones_like(ls)[:, None]).solution.squeeze(1)
    lam, c = float(sol[0]), float(sol[1])
    return lam, c * lam


def outlier_model_from_two(lambda_small: float, batch_small: float, lambda_large: float,
                           batch_large: float) -> Optional[tuple[float, float]]:
    """``(lambda, s)`` of lambda'(B) = lambda + s/(B lambda) through two measurements, e.g. a
    mini-batch Hessian (B) and a larger "full" batch (N) [RECONSTRUCTION: the spec §3.1 formula
    solved for its two unknowns]. None when the data do not fit the model (lambda_small <=
    lambda_large, or a non-positive lambda)."""
    if not (batch_small < batch_large and lambda_small > lambda_large > 0):
        return None
    c = (lambda_small - lambda_large) / (1.0 / batch_small - 1.0 / batch_large)
    lam = lambda_large - c / batch_large
    if lam <= 0:
        return None
    return lam, c * lam


def noise_scale_from_hvp_variance(hess_var: float, batch_size: float) -> float:
    """s = P sigma^2 from the batch Hessian-vector variance of
    :func:`ssl_suite.analysis.hessian.batch_hessian_noise`: for a unit z and noise of element
    variance sigma^2/B, E||E z||^2 = P sigma^2 / B, so s = B * hess_var [RECONSTRUCTION]."""
    return float(hess_var) * _positive("batch_size", batch_size)


# ---- batch-size scaling rules (spec §3.2, §3.3) -----------------------------------------------

def scaling_rule(optimizer: str) -> str:
    """``"sqrt"`` for adaptive methods (Adam family, the paper's square-root rule), ``"linear"``
    for SGD-like ones (the linear rule) [ABS]."""
    return "sqrt" if optimizer.lower().replace("-", "_") in ADAPTIVE_OPTIMIZERS else "linear"


def scale_lr(lr: float, batch_size: float, new_batch_size: float, rule: str = "linear") -> float:
    """Learning rate for ``new_batch_size`` from one tuned at ``batch_size`` (spec §3.3 protocol):
    ``linear``: lr * B'/B (SGD: 0.1 @ 128 -> 0.2 @ 256); ``sqrt``: lr * sqrt(B'/B) (Adam:
    0.001 @ 128 -> 0.002 @ 512); ``none``: lr."""
    ratio = _positive("new_batch_size", new_batch_size) / _positive("batch_size", batch_size)
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "none":
        return lr
    raise ValueError(f"rule must be 'linear', 'sqrt' or 'none', got {rule!r}")


def minimal_damping(lr: float, batch_size: float, ref_damping: float, ref_lr: float,
                    ref_batch_size: float) -> float:
    """delta_min proportional to lr / B ([ABS]: "the minimal damping coefficient is proportional
    to the ratio of the learning rate to batch size"), through a reference point: the paper's
    K-FAC runs (lr 1) use (delta, B) = (16, 16), (8, 32), ..., (1, 256), i.e. delta * B = 256."""
    lr_ratio = _positive("lr", lr) / _positive("ref_lr", ref_lr)
    batch_ratio = _positive("ref_batch_size", ref_batch_size) / _positive("batch_size", batch_size)
    return _positive("ref_damping", ref_damping) * lr_ratio * batch_ratio


def adaptive_damping(previous: Optional[float], min_damping: float, hess_var: float) -> float:
    """The damping companion's K-FAC update (spec §3.6 [CODE], ``rmt_damping_dl``
    ``run_damping_gap.py``), applied every ``damping_gap`` steps: the first time
    delta = delta_min + hess_var, afterwards delta <- 0.7 delta + 0.3 delta_min + 0.3 hess_var
    (the weights sum to 1.3 as in the code). The code also rescales the lr by (1 + delta)."""
    if previous is None or previous == 0:
        return float(min_damping) + float(hess_var)
    return 0.7 * float(previous) + 0.3 * float(min_damping) + 0.3 * float(hess_var)


# ---- the on-the-fly learner (spec §3.5) -------------------------------------------------------

@dataclass
class CurvatureHyperparams:
    lr: float
    momentum: float
    lambda_max: float
    mu: float


def _probe_pairs(estimate: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ritz_values, ritz_weights) per probe from a LanczosResult, a SpectralDensity or a pair."""
    if hasattr(estimate, "ritz_values"):
        return [(estimate.ritz_values, estimate.ritz_weights)]
    if hasattr(estimate, "nodes"):
        return list(zip(estimate.nodes, estimate.weights))
    values, weights = estimate
    return [(torch.as_tensor(values, dtype=torch.float64),
             torch.as_tensor(weights, dtype=torch.float64))]


def _mu(values: torch.Tensor, weights: torch.Tensor, rule: str) -> float:
    a = values.double().abs().reshape(-1)
    w = weights.double().reshape(-1)
    if rule == "median":
        return float(statistics.median(a.tolist()))
    if rule != "minimum":
        raise ValueError(f"mu_rule must be 'minimum' or 'median', got {rule!r}")
    keep = w <= 0.5      # the node of weight > 0.5 stands for the bulk near zero
    if not keep.any():   # [RECONSTRUCTION] a single node: nothing else to take
        keep = torch.ones_like(keep)
    return float(a[keep].min())


def lr_momentum_from_ritz(estimate: Any, mu_rule: str = "minimum", variant: str = "heavy_ball",
                          code_momentum: bool = False) -> CurvatureHyperparams:
    """SGD hyper-parameters from a Lanczos estimate (spec §3.5 [CODE]: GadamX
    ``BatchHess_Code/run_ssgdm_fastanddirty.py`` and its ``ssgd``/``ssgdmn`` siblings).

    Magnitudes a_k = |theta_k| keep their pairing with the weights tau_k; lambda_max = max_k a_k;
    mu is ``"minimum"`` (drop the node of weight > 0.5, the bulk, then the smallest remaining
    a_k; the code's default) or ``"median"`` of the a_k. Then ``variant``:

    * ``"heavy_ball"`` (ssgdm), Polyak's optimum for a quadratic with spectrum in [mu, L]:
      lr = 4 / (sqrt L + sqrt mu)^2, momentum = ((sqrt L - sqrt mu) / (sqrt L + sqrt mu))^2.
      The code divides by (sqrt L + mu) in the momentum; ``code_momentum=True`` reproduces it.
    * ``"gd"`` (ssgd): lr = 2 / (L + median_k a_k), momentum 0 (mu is the median here).
    * ``"ssgdmn"`` (the code's Nesterov-like variant, experimental: its lr is dimensionally
      inconsistent, spec §3.5): lr = sqrt(mu / L),
      momentum = (sqrt L - sqrt mu) / (sqrt L + sqrt mu).

    Several probes (a SpectralDensity): L is the largest a_k over probes and mu the median of the
    per-probe mu [RECONSTRUCTION; the code uses one probe].
    """
    pairs = _probe_pairs(estimate)
    lam = max(float(v.double().abs().max()) for v, _ in pairs)
    if not lam > 0:
        raise ValueError("the estimate has no positive curvature (all Ritz values are 0)")
    rule = "median" if variant == "gd" else mu_rule
    mu = float(statistics.median([_mu(v, w, rule) for v, w in pairs]))
    sl, sm = math.sqrt(lam), math.sqrt(mu)
    if variant == "heavy_ball":
        lr = 4.0 / (sl + sm) ** 2
        momentum = ((sl - sm) / (sl + mu)) ** 2 if code_momentum else ((sl - sm) / (sl + sm)) ** 2
    elif variant == "gd":
        lr, momentum = 2.0 / (lam + mu), 0.0
    elif variant == "ssgdmn":
        lr, momentum = math.sqrt(mu / lam), (sl - sm) / (sl + sm)
    else:
        raise ValueError(f"variant must be 'heavy_ball', 'gd' or 'ssgdmn', got {variant!r}")
    return CurvatureHyperparams(lr, momentum, lam, mu)


class LanczosLR(LRScheduler):
    """On-the-fly learning rate and momentum from the Hessian (spec §3.5; Granziol et al. 2022,
    "SSGDM" of ``run_ssgdm_fastanddirty.py``), as an LR scheduler.

    Call ``step()`` after every ``optimizer.step()``. At step t = ``warmstart``,
    ``warmstart + every``, ... (t counts optimizer steps; t = 0 is construction) it calls
    ``estimate()``, which returns a Hessian estimate on a fixed curvature batch (a
    :class:`~ssl_suite.analysis.hessian.LanczosResult`, a
    :class:`~ssl_suite.analysis.hessian.SpectralDensity` or ``(ritz_values, ritz_weights)``; the
    paper: 20 Lanczos steps on 32-1024 fixed examples), converts it with
    :func:`lr_momentum_from_ritz` and holds lr (times ``lr_scale``) and momentum constant until
    the next estimate, in every param group; before ``warmstart`` the lrs are left as they are.
    ``set_momentum`` writes ``group["momentum"]`` (``torch.optim.SGD``, whose momentum is the
    heavy-ball form). The paper's code re-estimates every ``epochfreq`` (20) epochs; ``every`` is
    in steps here. The estimate excludes weight decay unless ``estimate`` adds it.
    ``history`` lists every estimate as ``(step, lr, momentum, lambda_max, mu)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, estimate: Callable[[], Any], every: int,
                 warmstart: int = 0, mu_rule: str = "minimum", variant: str = "heavy_ball",
                 code_momentum: bool = False, lr_scale: float = 1.0, set_momentum: bool = True,
                 last_epoch: int = -1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if warmstart < 0:
            raise ValueError(f"warmstart must be >= 0, got {warmstart}")
        if mu_rule not in ("minimum", "median"):
            raise ValueError(f"mu_rule must be 'minimum' or 'median', got {mu_rule!r}")
        if variant not in ("heavy_ball", "gd", "ssgdmn"):
            raise ValueError(f"variant must be 'heavy_ball', 'gd' or 'ssgdmn', got {variant!r}")
        if set_momentum and any("momentum" not in g for g in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} has no 'momentum' in its param groups; "
                             f"use torch.optim.SGD or set_momentum=False")
        self.estimate = estimate
        self.every, self.warmstart = every, warmstart
        self.mu_rule, self.variant, self.code_momentum = mu_rule, variant, code_momentum
        self.lr_scale, self.set_momentum = float(_positive("lr_scale", lr_scale)), set_momentum
        self.current: Optional[dict[str, float]] = None
        self.history: list[tuple[int, float, float, float, float]] = []
        super().__init__(optimizer, last_epoch)

    def _due(self, t: int) -> bool:
        return t >= self.warmstart and (t - self.warmstart) % self.every == 0

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        if self._due(t):
            hp = lr_momentum_from_ritz(self.estimate(), self.mu_rule, self.variant,
                                       self.code_momentum)
            self.current = asdict(hp)
            self.history.append((t, hp.lr, hp.momentum, hp.lambda_max, hp.mu))
            if self.set_momentum:
                for g in self.optimizer.param_groups:
                    g["momentum"] = hp.momentum
        if self.current is None:
            return [g["lr"] for g in self.optimizer.param_groups]
        return [self.current["lr"] * self.lr_scale for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """As LRScheduler's, without the ``estimate`` callable (pass it again on construction)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "estimate")}


__all__ = ["ADAPTIVE_OPTIMIZERS", "CurvatureHyperparams", "LanczosLR", "adaptive_damping",
           "batch_outlier", "bulk_edge", "critical_batch_size", "fit_outlier_model",
           "lr_momentum_from_ritz", "max_lr_for_batch", "max_stable_lr", "minimal_damping",
           "noise_scale_from_hvp_variance", "outlier_model_from_two", "scale_lr", "scaling_rule"]
