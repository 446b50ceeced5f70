"""Zou et al.'s sufficient condition for Generic Adam, Reddi et al.'s counterexample, Chen et al.'s
mini-batch effect. Spec: ``shared/algorithms/flat_minima_lr_scaling_generic_adam.md`` §4.3-§4.6.

Sufficient condition (Zou, Shen, Jie, Zhang, Liu, CVPR 2019, [PAPER-R]) for
x_{t+1} = x_t - alpha_t m_t / sqrt(v_t), m_t = beta_t m_{t-1} + (1-beta_t) g_t,
v_t = theta_t v_{t-1} + (1-theta_t) g_t^2 (:class:`ssl_suite.optim.generic_adam.GenericAdam`):

- SC1  0 <= beta_t <= beta < 1.
- SC2  0 < theta_t < 1, theta_t non-decreasing, beta^2 < theta_1 (gamma = beta^2/theta_1 < 1).
- SC3  chi_t = alpha_t / sqrt(1 - theta_t) almost non-increasing: a_t <= chi_t <= C0 a_t for a
  non-increasing a_t; the smallest such C0 is max_t chi_t / min_{s<=t} chi_s.
- Theorem: (E||grad f(x_tau)||^{4/3})^{3/2} <= (C + C' sum_{t<=T} alpha_t sqrt(1-theta_t)) / (T alpha_T);
  it vanishes iff R(T) = sum_{t<=T} alpha_t sqrt(1-theta_t) / (T alpha_T) -> 0 and T alpha_T -> oo.

For alpha_t = alpha t^-s, theta_t = 1 - beta t^-r this is (spec §4.3, [RECON]): 0 < r <= 2s < 2 with
beta1^2 < theta_1. Naming as in the optimizer: ``beta1`` is the momentum (the paper's beta in
SC1), ``beta`` the coefficient of theta_t (the paper's theta).

Unsettled (spec §4.3 ⚠): whether SC2 needs beta1^2 < theta_1 or only beta1^2 < lim theta_t. The
checkers take ``t0`` (test theta from t0 on; 1 = the strict reading) and report ``min_t0``, the
smallest t0 for which SC2 holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from ssl_suite.optim.generic_adam import GenericAdam

HORIZONS = (10**3, 10**4, 10**5, 10**6)
_TOL = 1e-12


@dataclass(frozen=True)
class Clause:
    name: str            # SC1, SC2.range, SC2.monotone, SC2.momentum, SC3, bound.theta, bound.alpha
    formula: str         # the clause, with the numbers put in
    value: float         # the quantity the clause tests
    passed: bool


@dataclass
class ConditionReport:
    ok: bool                                   # every clause passed: the theorem's bound -> 0
    clauses: list[Clause]
    rate: str = ""                             # the rate the theorem gives, where it applies
    min_t0: Optional[int] = None               # smallest t0 with SC2 (range and momentum)
    rate_proxy: dict[int, float] = field(default_factory=dict)   # R(T) at the horizons
    explanation: str = ""

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.clauses if not c.passed]

    def clause(self, name: str) -> Clause:
        return next(c for c in self.clauses if c.name == name)

    def __str__(self) -> str:
        verdict = "MET" if self.ok else f"NOT MET ({', '.join(self.failed)})"
        lines = [f"sufficient condition: {verdict}"]
        for c in self.clauses:
            mark = "pass" if c.passed else "FAIL"
            lines.append(f"  [{mark}] {c.name:<13} {c.formula}   value={c.value:.6g}")
        if self.rate:
            lines.append(f"  rate: {self.rate}")
        if self.rate_proxy:
            lines.append("  R(T) = sum alpha_t sqrt(1-theta_t) / (T alpha_T): " + ", ".join(
                f"T={T:.0e}: {v:.4g}" for T, v in self.rate_proxy.items()))
        if self.explanation:
            lines.append("  " + self.explanation)
        return "\n".join(lines)


def rate_proxy(s: float, r: float, beta: float, T: int) -> float:
    """R(T) = sum_{t<=T} alpha_t sqrt(1 - theta_t) / (T alpha_T) for alpha t^-s, 1 - beta t^-r."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    return float((t.pow(-s) * (beta * t.pow(-r)).sqrt()).sum() / (T * T ** (-s)))


def check_sufficient_condition(s: float, r: float, beta1: float, beta: float, *,
                               beta1_decay: float = 1.0, t0: int = 1,
                               horizons: Sequence[int] = HORIZONS) -> ConditionReport:
    """Each clause of the sufficient condition for alpha_t = alpha t^-s, theta_t = 1 - beta t^-r,
    beta_t = beta1 lambda^(t-1) (alpha does not enter). ``t0``: SC2 is tested from t0 on."""
    theta_t0 = 1.0 - beta * t0 ** (-r)
    gamma = beta1 ** 2 / theta_t0 if theta_t0 > 0 else math.inf
    clauses = [
        Clause("SC1", f"0 <= beta_t <= beta1 = {beta1:g} < 1 (beta_t = beta1 * {beta1_decay:g}^(t-1))",
               beta1, 0 <= beta1 < 1 and 0 < beta1_decay <= 1),
        Clause("SC2.range", f"0 < theta_t < 1 for t >= {t0}: theta_{t0} = 1 - {beta:g}/{t0}^{r:g} "
               f"= {theta_t0:.6g}, theta_t -> {1 - beta if r == 0 else 1}",
               theta_t0, beta > 0 and r >= 0 and 0 < theta_t0 < 1),
        Clause("SC2.monotone", f"theta_t = 1 - {beta:g}/t^{r:g} non-decreasing <=> r = {r:g} >= 0",
               r, r >= 0 and beta > 0),
        Clause("SC2.momentum", f"gamma = beta1^2/theta_{t0} = {beta1 ** 2:.6g}/{theta_t0:.6g} < 1",
               gamma, gamma < 1),
        Clause("SC3", f"chi_t = alpha_t/sqrt(1-theta_t) ~ t^(r/2-s) = t^({r / 2 - s:+.6g}) "
               f"almost non-increasing <=> r <= 2s ({r:g} <= {2 * s:g})",
               r / 2 - s, r / 2 - s <= _TOL),
        Clause("bound.theta", f"sum alpha_t sqrt(1-theta_t) = o(T alpha_T) needs 1 - theta_t -> 0 "
               f"<=> r = {r:g} > 0", r, r > 0),
        Clause("bound.alpha", f"T alpha_T ~ T^(1-s) -> infinity <=> s = {s:g} < 1", s, s < 1),
    ]
    ok = all(c.passed for c in clauses)
    e = s + r / 2
    if not ok:
        rate = "no vanishing bound"
    elif abs(e - 1) <= _TOL:
        rate = f"O(log T / T^{1 - s:g})"
    elif e < 1:
        rate = f"O(T^-{r / 2:g})"
    else:
        rate = f"O(T^-{1 - s:g})"
    report = ConditionReport(ok=ok, clauses=clauses, rate=rate,
                             min_t0=_min_t0(r, beta1, beta),
                             rate_proxy={T: rate_proxy(s, r, beta, T) for T in horizons}
                             if beta > 0 else {})
    report.explanation = _explain(report)
    return report


def check_schedule(alpha: Iterable[float], beta_t: Iterable[float], theta: Iterable[float], *,
                   t0: int = 1, C0_max: float = 10.0) -> ConditionReport:
    """The same clauses on explicit sequences (t = 1..T), e.g. a scheduler's alpha_t times t^-s.

    SC3 uses the smallest C0 (max chi_t / running min chi) and fails if it is above ``C0_max`` or
    still growing after the first tenth of the horizon. The bound clause passes if R(T) < R(T/10).
    Both are finite-horizon heuristics, not proofs; for alpha t^-s, 1 - beta t^-r use
    :func:`check_sufficient_condition`, which decides each clause in closed form.
    """
    a, b, th = (torch.as_tensor(x if torch.is_tensor(x) else list(x), dtype=torch.float64).flatten()
                for x in (alpha, beta_t, theta))
    T = len(a)
    if not (len(b) == len(th) == T and T >= 10 and 1 <= t0 <= T):
        raise ValueError("check_schedule: alpha, beta_t, theta need the same length T >= 10, "
                         "and 1 <= t0 <= T")
    tail = th[t0 - 1:]
    max_drop = float((tail[:-1] - tail[1:]).max().clamp_min(0))
    gamma = float(b.max()) ** 2 / float(tail[0]) if tail[0] > 0 else math.inf
    in_range = bool(((tail > 0) & (tail < 1)).all())
    if in_range:
        chi = a[t0 - 1:] / (1 - tail).sqrt()
        ratio = chi / torch.cummin(chi, 0).values
        c0, c0_early = float(ratio.max()), float(ratio[:max(1, len(ratio) // 10)].max())
    else:
        c0 = c0_early = math.inf
    R = (a * (1 - th).clamp_min(0).sqrt()).cumsum(0) / (torch.arange(1, T + 1) * a)
    r_T, r_T10 = float(R[-1]), float(R[T // 10 - 1])
    clauses = [
        Clause("SC1", f"0 <= beta_t <= {float(b.max()):.6g} < 1", float(b.max()),
               bool((b >= 0).all()) and float(b.max()) < 1),
        Clause("SC2.range", f"0 < theta_t < 1 for t >= {t0} (min {float(tail.min()):.6g})",
               float(tail.min()), in_range),
        Clause("SC2.monotone", f"theta_t non-decreasing for t >= {t0} (largest drop {max_drop:.3g})",
               max_drop, max_drop <= _TOL),
        Clause("SC2.momentum", f"gamma = max beta_t^2 / theta_{t0} = {gamma:.6g} < 1", gamma, gamma < 1),
        Clause("SC3", f"C0 = max chi_t / min_(s<=t) chi_s = {c0:.6g} <= {C0_max:g} and not growing "
               f"over the last 90% of the horizon (first 10%: {c0_early:.6g})", c0,
               c0 <= C0_max and c0 <= 1.01 * c0_early),
        Clause("bound", f"R(T) = {r_T:.4g} < R(T/10) = {r_T10:.4g} (decreasing; heuristic)",
               r_T, r_T < r_T10),
    ]
    ok = all(c.passed for c in clauses)
    good = ((th > float(b.max()) ** 2) & (th > 0) & (th < 1)).nonzero()
    report = ConditionReport(ok=ok, clauses=clauses, min_t0=int(good[0]) + 1 if len(good) else None,
                             rate_proxy={T // 10: r_T10, T: r_T})
    report.explanation = _explain(report)
    return report


def classic_adam(beta1: float = 0.9, beta2: float = 0.999, s: float = 0.5) -> ConditionReport:
    """Adam with constant theta = beta2 (r = 0) and alpha_t = alpha t^-s, against the condition.

    SC1-SC3 hold (for beta1^2 < beta2 and s >= 0), but 1 - theta_t = 1 - beta2 never shrinks, so
    R(T) -> sqrt(1 - beta2)/(1 - s) and the bound stalls at a neighbourhood of radius
    O(sqrt(1 - beta2)): clause ``bound.theta`` fails.
    """
    report = check_sufficient_condition(s, 0.0, beta1, 1.0 - beta2)
    limit = math.sqrt(1.0 - beta2) / (1.0 - s) if s < 1 else math.inf
    report.explanation = (
        f"Classic Adam: theta_t = beta2 = {beta2:g} for all t (r = 0). {report.explanation} "
        f"The bound (C + C' sum_t alpha_t sqrt(1-theta_t)) / (T alpha_T) tends to C' * R(oo) with "
        f"R(oo) = sqrt(1-beta2)/(1-s) = {limit:.4g} > 0, not to 0: only a neighbourhood of "
        f"radius O(sqrt(1-beta2)) of a stationary point is guaranteed. With beta2 = 1/(1+C^2) "
        f"Reddi et al.'s problem puts that neighbourhood at the wrong end of [-1, 1]. Meeting the "
        f"condition needs theta_t -> 1 with 0 < r <= 2s < 2, e.g. s = 1/2, r = 1.")
    return report


def _min_t0(r: float, beta1: float, beta: float) -> Optional[int]:
    if beta <= 0 or r < 0:
        return None
    need = 1.0 - beta1 ** 2                         # beta t^-r < need <=> theta_t > beta1^2 (and > 0)
    if r == 0:
        return 1 if beta < need else None
    t = max(1, math.floor((beta / need) ** (1.0 / r)) + 1)
    while t > 1 and beta * (t - 1) ** (-r) < need:  # float guard at the boundary
        t -= 1
    return t


def _explain(report: ConditionReport) -> str:
    if report.ok:
        return "All clauses hold: the theorem's bound vanishes."
    text = "Fails: " + "; ".join(f"{c.name}: {c.formula}" for c in report.clauses if not c.passed) + "."
    if any(n in ("SC2.range", "SC2.momentum") for n in report.failed) and report.min_t0 is not None:
        text += (f" SC2 holds from t0 = {report.min_t0} on (whether the paper needs it from t = 1 "
                 f"is unsettled, spec §4.3).")
    return text


# --------------------------------------------------------------------------------------------
# Reddi, Kale, Kumar (ICLR 2018), Theorem 1: online linear problem on F = [-1, 1].


@dataclass
class CounterexampleRun:
    x: torch.Tensor            # x_1 .. x_{T+1} (after projection onto [-1, 1])
    avg_regret: torch.Tensor   # R_t / t, t = 1..T, R_t = sum_i f_i(x_i) - min_{x in F} sum_i f_i(x)

    @property
    def final(self) -> float:
        return float(self.x[-1])


def reddi_gradients(steps: int, C: float = 3.0, neg: float = 1.0, period: int = 3) -> torch.Tensor:
    """f_t'(x): C for t mod period == 1, -neg otherwise (t = 1..steps). Reddi Thm 1: 3, 1, 3
    (any C > 2); Reddi §5 / Zou et al.'s synthetic run: 1010, 10, 101.

    Unsettled: with 1010, 10, 101, x_1 = 0.5, beta1 = 0.9, alpha_t = 0.5/sqrt(t) and
    theta_t = 1 - (0.01 + 0.99 r)/t^r, our runs of 2e4 steps did not show the spec's [PAPER-R]
    claim that every r > 0 reaches -1: r = 0.25, 0.5, 0.75 sat near +1 and r = 1 was at 0.32,
    falling (the mean gradient is 0.1 against a per-period scale of 1010, so the drift is slow).
    The theorem allows this (its constants grow with the gradient bound); the demo and the tests
    use Theorem 1's constants, where the separation is immediate.
    """
    if period < 2:
        raise ValueError("reddi_gradients: period must be >= 2")
    t = torch.arange(1, steps + 1)
    return torch.where(t % period == 1, torch.tensor(float(C)), torch.tensor(-float(neg))).double()


def reddi_counterexample(optimizer_factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                         steps: int = 3000, *, C: float = 3.0, neg: float = 1.0, period: int = 3,
                         x0: float = 0.0) -> CounterexampleRun:
    """Run an optimizer on f_t(x) = C x (t mod period = 1), -neg x otherwise, projecting x onto
    [-1, 1] after each step. The optimum of sum_t f_t is x* = -1 when C > (period-1) * neg.

    ``x0 = 0`` (neutral start) is our choice; Reddi et al.'s proof may start elsewhere.
    """
    x = torch.nn.Parameter(torch.tensor([float(x0)], dtype=torch.float64))
    opt = optimizer_factory([x])
    grads = reddi_gradients(steps, C, neg, period)
    xs = torch.empty(steps + 1, dtype=torch.float64)
    xs[0] = x0
    for t in range(steps):
        x.grad = grads[t:t + 1].clone()
        opt.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)                    # Euclidean projection onto F (1-D: clipping)
            xs[t + 1] = x[0]
    regret = (grads * xs[:-1]).cumsum(0) + grads.cumsum(0).abs()   # min_{|x|<=1} G x = -|G|
    return CounterexampleRun(x=xs, avg_regret=regret / torch.arange(1, steps + 1))


def reddi_beta2(C: float = 3.0) -> float:
    """Reddi et al.'s Theorem 1 second-moment weight beta2 = 1/(1 + C^2) (0.1 for C = 3)."""
    return 1.0 / (1.0 + C * C)


def reddi_adam(C: float = 3.0, alpha: float = 0.5):
    """Factory: Reddi et al.'s Adam (beta1 = 0, beta2 = 1/(1+C^2), alpha_t = alpha/sqrt t, no bias
    correction) = GenericAdam with s = 1/2, r = 0, beta = 1 - beta2 = C^2/(1+C^2)."""
    beta = 1.0 - reddi_beta2(C)
    return lambda params: GenericAdam(params, lr=alpha, s=0.5, beta1=0.0, beta=beta, r=0.0)


def reddi_generic_adam(C: float = 3.0, alpha: float = 0.5, r: float = 1.0):
    """Factory: the same constants with theta_t = 1 - beta/t^r, r > 0 (meets the condition for
    0 < r <= 1 = 2s)."""
    beta = 1.0 - reddi_beta2(C)
    return lambda params: GenericAdam(params, lr=alpha, s=0.5, beta1=0.0, beta=beta, r=r)


# --------------------------------------------------------------------------------------------
# Chen, Shen, Zou, Liu (JMLR 2022): mini-batch Generic Adam, g_t = (1/b) sum_j grad f(x_t; xi_tj).


def minibatch_stationarity(batch_sizes: Sequence[int] = (1, 4, 16, 64), steps: int = 200, *,
                           dim: int = 10, runs: int = 32, noise: float = 3.0, seed: int = 0,
                           **opt_kwargs) -> dict[int, float]:
    """Mean over t = 1..steps (and ``runs`` independent runs) of ||grad F(x_t)||^2 for mini-batch
    Generic Adam on noisy linear regression.

    a ~ N(0, diag(lam)), lam from 1 to 0.1; y = a.w* + noise * xi; F(w) = E 0.5 (a.w - y)^2, so
    grad F(w) = diag(lam) (w - w*) exactly, while the optimizer sees the mini-batch mean of
    a (a.w - y). The runs are the rows of one (runs, dim) parameter: the optimizer is elementwise,
    so the rows are independent runs. Every batch size sees the same w*, x_1 and optimizer settings
    (default: GenericAdam defaults, s = 1/2, r = 1, with lr 1.0); only the gradient noise
    variance, noise^2/b, changes. Chen et al. prove a linear speed-up in b for their schedules
    ([ABS]; the exact schedule statements were not retrieved, spec §4.6): here the measure falls
    with b until the noise-free transient dominates.
    """
    gen = torch.Generator().manual_seed(seed)
    lam = torch.linspace(1.0, 0.1, dim, dtype=torch.float64)
    w_star = torch.randn(runs, dim, generator=gen, dtype=torch.float64)
    x1 = torch.zeros(runs, dim, dtype=torch.float64)
    kwargs = dict(lr=1.0)
    kwargs.update(opt_kwargs)
    out = {}
    for b in batch_sizes:
        w = torch.nn.Parameter(x1.clone())
        opt = GenericAdam([w], **kwargs)
        g_sq = torch.zeros((), dtype=torch.float64)
        for _ in range(steps):
            a = torch.randn(runs, b, dim, generator=gen, dtype=torch.float64) * lam.sqrt()
            xi = torch.randn(runs, b, generator=gen, dtype=torch.float64)
            y = (a * w_star[:, None]).sum(-1) + noise * xi
            with torch.no_grad():
                g_sq += ((lam * (w - w_star)) ** 2).sum(-1).mean()
                resid = (a * w[:, None]).sum(-1) - y                          # (runs, b)
                w.grad = (a * resid[..., None]).mean(1)                      # mini-batch gradient
            opt.step()
        out[b] = float(g_sq / steps)
    return out
