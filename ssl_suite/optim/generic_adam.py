"""Generic Adam (Zou, Shen, Jie, Zhang, Liu, CVPR 2019, "A Sufficient Condition for Convergences of
Adam and RMSProp", arXiv 1811.09358, Algorithm 1; mini-batch form in Chen, Shen, Zou, Liu, JMLR
23(229), 2022). Spec: ``shared/algorithms/flat_minima_lr_scaling_generic_adam.md`` §4.

Per parameter tensor x with stochastic gradient g_t, elementwise, t = 1, 2, ... counted per tensor::

    (0) g_t     <- g_t + wd * x_t                         L2 in the gradient (not in the paper; 0 = off)
    (1) alpha_t  = alpha * t^(-s)                         base learning rate
    (2) beta_t   = beta1 * lambda^(t-1)                   first-moment weight (lambda = beta1_decay)
    (3) theta_t  = 1 - beta * t^(-r)                      second-moment weight
    (4) v_t      = theta_t * v_{t-1} + (1 - theta_t) * g_t^2,     v_0 = eps  (the paper's eps)
    (5) m_t      = beta_t * m_{t-1} + (1 - beta_t) * g_t,          m_0 = 0
    (6) x_{t+1}  = x_t - alpha_t * m_t / sqrt(v_t)

No bias correction in the paper's box. Special cases (spec §4.1):

- Adam without bias correction: ``s=0, r=0`` gives theta_t = 1 - beta = beta2 and alpha_t = alpha.
  Kingma & Ba's Adam = this plus ``bias_correction=True, eps_mode="denominator"`` (then the update
  equals ``torch.optim.Adam`` exactly, see below); Reddi et al.'s Adam is ``s=0.5, r=0``.
- RMSProp: ``beta1=0`` with ``r=0`` (theta = 1 - beta), or the paper's RMSProp with ``r>0``.
- AdaGrad / AdaEMA: ``s=0.5, r=1, beta=1`` gives v_t = (1/t) sum_i g_i^2 and alpha_t/sqrt(v_t) =
  alpha/sqrt(sum_i g_i^2) (AdaGrad for ``beta1=0``, AdaEMA for ``beta1>0``).
- AdamNC (Reddi et al.): ``r=1, beta=1`` and ``beta1_decay=lambda < 1``.
- Zou et al.'s experimental family: ``s=0.5, beta=c+(1-c)*r`` (c = 0.001 nets, 0.01 counterexample).

Naming. The constructor's names: ``beta1`` is the paper's momentum bound beta
(beta_t <= beta < 1 in SC1) and ``beta`` is the paper's coefficient theta in theta_t = 1 - theta/t^r
(spec §4.3). ``lr`` and ``alpha`` are the same number: the group stores only ``lr``; an LR
scheduler multiplies ``group["lr"]`` and the step uses ``alpha_t = group["lr"] * t^(-s)``, so the
scheduler's factor and the paper's t^(-s) compose multiplicatively. ``alpha=`` in the constructor
or in a param group is an alias that is written into ``lr``.

Sufficient condition (spec §4.3; checker: :func:`ssl_suite.analysis.check_sufficient_condition`).
For these polynomial schedules it reads 0 <= beta1 < 1, 0 < beta, beta1^2 < theta_1 and
0 < r <= 2s < 2; then min_t E||grad f(x_t)||^{4/3} -> 0 at rate O(T^{-r/2}), O(log T / T^{1-s}) or
O(T^{-(1-s)}) when s + r/2 is <, = or > 1. The defaults ``s=0.5, r=1, beta=0.1, beta1=0.9`` meet
every clause in its strict reading (theta_1 = 0.9 > beta1^2 = 0.81; chi_t = alpha_t/sqrt(1-theta_t)
is constant; s + r/2 = 1 gives O(log T/sqrt T), the best rate of the family). Classic Adam (r = 0)
fails: the bound stays at a neighbourhood of radius O(sqrt(beta)) = O(sqrt(1 - beta2)). An external
LR schedule multiplies alpha_t and so changes chi_t: warm-up breaks "almost non-increasing" and
cosine decay changes the rate; set ``s=0`` if a scheduler should own the decay (then r <= 2s
forces r = 0 and the guarantee is lost; say so in the experiment).

eps. The paper puts eps in v_0 (``eps_mode="v0"``, default); the third-party reproduction and
torch put it in the denominator, sqrt(v_t) + eps with v_0 = 0 (``eps_mode="denominator"``).
In "v0" mode, if theta_1 = 0 (``r>0, beta=1``) eps is lost at the first step and a coordinate whose
gradient has always been 0 has m = v = 0. A numerical guard clamps sqrt(v_t) from below at
sqrt(finfo.tiny) (1.1e-19 in float32): this changes nothing unless v_t underflows below the
smallest normal number, and then gives a zero update for m = 0 instead of NaN (for v_t < tiny,
|m_t| <~ sqrt(v_t) when beta1^2 < theta, so the clamped ratio stays bounded). Not in the paper.

Bias correction (``bias_correction=True``, not in the paper's box; spec §4.1 folds Adam's into
alpha_t): m_hat = m_t / (1 - prod_j beta_j), v_hat = v_t / (1 - prod_j theta_j) and the step is
alpha_t * m_hat / (sqrt(v_hat) + eps) in "denominator" mode (Kingma & Ba's placement of eps; with
s = r = 0 this is ``torch.optim.Adam``), alpha_t * m_hat / sqrt(v_hat) in "v0" mode. With
theta_1 = 0 the product is 0 and the correction is 1, as it should be.

State per tensor: ``step`` (int t), ``exp_avg`` (m), ``exp_avg_sq`` (v), and the running products
``beta1_prod`` = prod_j beta_j and ``theta_prod`` = prod_j theta_j (floats; used by bias
correction, kept always so a checkpoint continues exactly). The tensors of a group are bucketed
by step count, running products, dtype and device (normally one bucket per group); the per-step
scalars are computed once per bucket in Python floats. Code paths (no ``.item()``, no host sync),
as in :mod:`ssl_suite.optim.lars`:

* compiled (default on CPU from ``_compile.COMPILE_MIN_NUMEL`` (4M) parameters in the step, ``compile=True``
  anywhere): :func:`_generic_adam_loop` under ``torch.compile(fullgraph=True)``, compiled once
  per process (and parameter shapes); Inductor fuses each tensor's update into one pass over
  (x, g, m, v). The scalars go in as 0-dim tensors, so a new lr, t^-s or theta_t each step does
  not recompile. If compiling fails, one RuntimeWarning and the eager paths take over.
* foreach, eager (default otherwise): multi-tensor kernels, one set per bucket.
* ``foreach=False``: the same math one tensor at a time (for checking).

Unsettled (spec §4.3 ⚠, [PAPER-R]): whether the paper requires beta1^2 < theta_1 or only
beta1^2 < lim theta_t; the paper's own r = 1 experiment has theta_1 = 0. The checker takes a
``t0`` and reports the smallest t0 that works. The paper's text could not be read; the box is the
spec's [PAPER-R] recollection (high confidence on structure). The closure is called once per step.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from ._compile import CompiledLoop, wants_compile

EPS_MODES = ("v0", "denominator")



class GenericAdam(Optimizer):
    """Generic Adam of Zou et al. 2019 (Algorithm 1): alpha_t = alpha/t^s, theta_t = 1 - beta/t^r.

    Args:
        params: parameters or parameter groups.
        lr: alpha, the base learning rate (a scheduler multiplies it; alpha_t = lr * t^(-s)).
        s: exponent of the base learning rate, alpha_t = alpha * t^(-s); 0.5 in the paper.
        beta1: momentum weight beta_t (constant unless ``beta1_decay < 1``), 0 <= beta1 < 1.
        beta: coefficient of the second-moment schedule theta_t = 1 - beta * t^(-r), 0 < beta <= 1.
        r: exponent of that schedule, r >= 0 (r = 0: constant theta = 1 - beta, i.e. Adam's beta2).
        eps: the paper's v_0 (``eps_mode="v0"``) or the denominator term (``"denominator"``).
        weight_decay: L2 coefficient added to the gradient before (4)-(5) (coupled, as torch Adam).
        alpha: alias of ``lr``; give one of them.
        beta1_decay: lambda in beta_t = beta1 * lambda^(t-1) (AdamNC); 1 keeps beta_t = beta1.
        eps_mode: "v0" (paper) or "denominator" (torch / third-party code).
        bias_correction: divide m and v by the sums of their weights (Kingma & Ba); off in the paper.
        foreach: multi-tensor path (default) or one tensor at a time (False); eager paths only.
        compile: run the step through ``torch.compile``; None: on the CPU when the parameters
            with a gradient hold at least ``_compile.COMPILE_MIN_NUMEL`` (4M) elements; False: always eager.
            Not part of the state_dict.
    """

    def __init__(self, params, lr: Optional[float] = None, s: float = 0.5, beta1: float = 0.9,
                 beta: float = 0.1, r: float = 1.0, eps: float = 1e-8, weight_decay: float = 0.0,
                 *, alpha: Optional[float] = None, beta1_decay: float = 1.0, eps_mode: str = "v0",
                 bias_correction: bool = False, foreach: Optional[bool] = None,
                 compile: Optional[bool] = None):
        if lr is not None and alpha is not None and lr != alpha:
            raise ValueError(f"GenericAdam: lr={lr} and alpha={alpha} are the same number; give one")
        lr = alpha if lr is None else lr
        lr = 1e-3 if lr is None else lr
        defaults = dict(lr=lr, s=s, beta1=beta1, beta=beta, r=r, eps=eps, weight_decay=weight_decay,
                        beta1_decay=beta1_decay, eps_mode=eps_mode, bias_correction=bias_correction,
                        foreach=foreach)
        _validate(defaults)
        super().__init__(params, defaults)
        self.compile = compile

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("compile", None)

    def add_param_group(self, param_group: dict) -> None:
        if "alpha" in param_group:                       # alias: the group stores lr only
            alpha = param_group.pop("alpha")
            if "lr" in param_group and param_group["lr"] != alpha:
                raise ValueError("GenericAdam: a param group gives both lr and alpha")
            param_group["lr"] = alpha
        super().add_param_group(param_group)
        _validate(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One update (6) for every parameter with a gradient; ``closure`` is called once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, params, t, beta1_prod, theta_prod, scalars) per bucket
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GenericAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    v0 = group["eps"] if group["eps_mode"] == "v0" else 0.0
                    state["exp_avg_sq"] = torch.full_like(p, v0, memory_format=torch.preserve_format)
                    state["beta1_prod"] = 1.0
                    state["theta_prod"] = 1.0
                key = (state["step"], state["beta1_prod"], state["theta_prod"], p.dtype, p.device)
                buckets.setdefault(key, []).append(p)
            for (t_prev, b_prod, th_prod, _, _), params in buckets.items():
                t = t_prev + 1
                alpha_t = group["lr"] * t ** (-group["s"])                   # (1)
                beta_t = group["beta1"] * group["beta1_decay"] ** (t - 1)    # (2)
                theta_t = 1.0 - group["beta"] * t ** (-group["r"])           # (3)
                b_prod, th_prod = b_prod * beta_t, th_prod * theta_t
                step_size, v_scale = alpha_t, 1.0
                if group["bias_correction"]:
                    bc1, bc2 = 1.0 - b_prod, 1.0 - th_prod
                    step_size = alpha_t / bc1
                    if group["eps_mode"] == "denominator":
                        v_scale = 1.0 / math.sqrt(bc2)
                    else:
                        step_size *= math.sqrt(bc2)
                scalars = dict(beta_t=beta_t, theta_t=theta_t, step_size=step_size,
                               v_scale=v_scale, eps=group["eps"],
                               eps_in_denominator=group["eps_mode"] == "denominator",
                               weight_decay=group["weight_decay"])
                work.append((group, params, t, b_prod, th_prod, scalars))
        if work and not (self._wants_compile(work) and self._step_compiled(work)):
            self._step_eager(work)
        for _, params, t, b_prod, th_prod, _ in work:
            for p in params:
                state = self.state[p]
                state["step"], state["beta1_prod"], state["theta_prod"] = t, b_prod, th_prod
        return loss


    def _tensors(self, params) -> tuple:
        return ([p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params])

    def _wants_compile(self, work) -> bool:
        return wants_compile(self.compile, (p for _, ps, *_ in work for p in ps))

    def _step_compiled(self, work) -> bool:
        """True when the compiled loop did the step; False (after one warning) when compiling
        fails: this optimizer then stays eager."""
        if _COMPILED([(params, *self._tensors(params), _hyper(sc, params[0]),
                             sc["eps_in_denominator"], sc["weight_decay"] != 0)
                            for _, params, _, _, _, sc in work]):
            return True
        self.compile = False
        return False

    def _step_eager(self, work) -> None:
        for group, params, _, _, _, scalars in work:
            update = _foreach_update if group["foreach"] in (None, True) else _single_tensor_update
            _, exp_avgs, exp_avg_sqs = self._tensors(params)
            update(params, exp_avgs, exp_avg_sqs, **scalars)


def _hyper(sc: dict, ref: torch.Tensor) -> torch.Tensor:
    """The per-step scalars as one tensor (so that new values each step do not recompile)."""
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    return torch.tensor([sc["beta_t"], 1.0 - sc["beta_t"], sc["theta_t"], 1.0 - sc["theta_t"],
                         -sc["step_size"], sc["v_scale"], sc["eps"], sc["weight_decay"],
                         _sqrt_tiny(ref.dtype)], dtype=dtype, device=ref.device)


def _generic_adam_loop(work) -> None:
    """(0)-(6), one tensor at a time (compiled: one fused pass per tensor). ``work``: per bucket
    ``(params, grads, exp_avgs, exp_avg_sqs, hyper, eps_in_denominator, has_wd)`` with ``hyper``
    from :func:`_hyper`."""
    for params, grads, exp_avgs, exp_avg_sqs, hyper, eps_in_denominator, has_wd in work:
        beta_t, one_m_beta, theta_t, one_m_theta, neg_step, v_scale, eps, wd, tiny = hyper.unbind()
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            if has_wd:
                g = g + wd * p                                                         # (0)
            v.copy_(v * theta_t + one_m_theta * (g * g))                               # (4)
            m.copy_(m * beta_t + one_m_beta * g)                                       # (5)
            denom = v.sqrt()
            denom = denom * v_scale + eps if eps_in_denominator else denom.clamp_min(tiny)
            p.add_(neg_step * (m / denom))                                             # (6)


_COMPILED = CompiledLoop(_generic_adam_loop, "GenericAdam")


def _foreach_update(params, exp_avgs, exp_avg_sqs, *, beta_t, theta_t, step_size, v_scale, eps,
                    eps_in_denominator, weight_decay):
    grads = [p.grad for p in params]
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)                  # (0)
    torch._foreach_mul_(exp_avg_sqs, theta_t)                                          # (4)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - theta_t)
    torch._foreach_mul_(exp_avgs, beta_t)                                              # (5)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta_t)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps_in_denominator:
        if v_scale != 1.0:
            torch._foreach_mul_(denom, v_scale)
        torch._foreach_add_(denom, eps)
    else:
        torch._foreach_clamp_min_(denom, _sqrt_tiny(params[0].dtype))                 # guard
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)                 # (6)


def _single_tensor_update(params, exp_avgs, exp_avg_sqs, *, beta_t, theta_t, step_size, v_scale,
                          eps, eps_in_denominator, weight_decay):
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
        g = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
        v.mul_(theta_t).addcmul_(g, g, value=1.0 - theta_t)
        m.mul_(beta_t).add_(g, alpha=1.0 - beta_t)
        denom = v.sqrt()
        denom = denom.mul_(v_scale).add_(eps) if eps_in_denominator else denom.clamp_min_(
            _sqrt_tiny(p.dtype))
        p.addcdiv_(m, denom, value=-step_size)


def _sqrt_tiny(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).tiny)


def _validate(g: dict) -> None:
    bad = []
    if not g["lr"] >= 0:
        bad.append(f"lr (alpha) = {g['lr']} must be >= 0")
    if not g["s"] >= 0:
        bad.append(f"s = {g['s']} must be >= 0")
    if not 0 <= g["beta1"] < 1:
        bad.append(f"beta1 = {g['beta1']} must be in [0, 1)")
    if not 0 < g["beta1_decay"] <= 1:
        bad.append(f"beta1_decay = {g['beta1_decay']} must be in (0, 1]")
    if not 0 < g["beta"] <= 1:
        bad.append(f"beta = {g['beta']} must be in (0, 1] so that theta_t = 1 - beta/t^r is in [0, 1)")
    if not g["r"] >= 0:
        bad.append(f"r = {g['r']} must be >= 0 (theta_t would leave [0, 1))")
    if not g["eps"] >= 0:
        bad.append(f"eps = {g['eps']} must be >= 0")
    if not g["weight_decay"] >= 0:
        bad.append(f"weight_decay = {g['weight_decay']} must be >= 0")
    if g["eps_mode"] not in EPS_MODES:
        bad.append(f"eps_mode = {g['eps_mode']!r} must be one of {EPS_MODES}")
    if bad:
        raise ValueError("GenericAdam: " + "; ".join(bad))
