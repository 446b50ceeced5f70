"""Entropy-SGD (Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun, Zecchina,
ICLR 2017, arXiv 1611.01838), with the eSGD conventions of Pittorino et al. (ICLR 2021).
Spec: ``shared/algorithms/flat_minima_lr_scaling_generic_adam.md`` sections 1 and 2.2. Official
code: ``ucla-vision/entropy-sgd`` (``entropyoptim.lua``, used for the paper's runs, and
``python/optim.py``).

Entropy-SGD descends the negative local entropy ``-F(x; gamma)``, ``F = log int exp(-f(x') -
gamma/2 ||x - x'||^2) dx'``, whose gradient is ``gamma (x - <x'>)`` (spec 1.1); ``<x'>`` is
estimated by L steps of SGLD started at x and an exponential average mu (paper Algorithm 1,
spec 1.2)::

    x' <- x ;  mu <- x ;  gamma = gamma_t
    for l = 1..L:                                      # closure() once per l, a FRESH minibatch
        dx' = grad f(x'; batch_l) [+ wd x'] - gamma (x - x')
        x'  = x' - sgld_lr dx' + sqrt(sgld_lr) noise N(0, I)
        mu  = (1 - alpha) mu + alpha x'
    x <- x - lr gamma (x - mu)                         # paper: gradient descent on -F
    t <- t + 1

Scoping (paper, code README; spec 1.2): ``gamma_t = gamma0 (1 + gamma1)^t`` with t the number of
outer updates already made (t = 0 at the first; the Lua code counts from 1, i.e. its gamma0 is
ours divided by 1 + gamma1), optionally capped at ``gamma_max`` (eSGD, Pittorino et al.).
``gamma_growth`` with ``total_steps`` sets ``gamma1 = gamma_growth^(1/total_steps) - 1`` so that
gamma grows by that total factor over the run (eSGD's ``gmax^(1/(epochs num_batches)) - 1``).

**Protocol: the closure is called L times per step** (``L`` = ``L``), once per SGLD step, with
the parameters holding x'. Each call must zero the gradients, draw and augment a **fresh
minibatch**, run forward and backward, and return the loss (the per-sample vector or a scalar).
:meth:`step` returns the first call's value, the loss at x (x' = x at l = 1); the official codes
spend an extra pass at x for that value, we do not (eSGD does not either). One outer step
therefore costs L forward/backward passes: count ``L x steps`` "effective" epochs (paper's accounting, spec 1.5).

Paper form (the defaults) and the official code as named options (spec 1.3-1.4):

* ``scale_by_gamma=True``: the paper's outer step ``lr gamma (x - mu)``. Both official codes use
  ``lr (x - mu)`` (``False``); eSGD's ``gscale=True`` is the paper form. The paper's CIFAR
  ``lr = 1`` is the code's (no-gamma) step: in paper form ``lr = 1/gamma0`` gives the same first
  step.
* ``alpha=0.75``: weight of the new sample x' in mu (paper). The codes keep 0.75 on the *old*
  mu (``beta1 = 0.75``), i.e. ``alpha=0.25``.
* ``noise_formula="paper"``: ``+ sqrt(sgld_lr) noise N``. ``"code"``: the codes add
  ``(noise / sqrt(0.5 sgld_lr)) N`` to dx', i.e. ``- sgld_lr noise / sqrt(0.5 sgld_lr) N`` to x'
  (std ``noise sqrt(2 sgld_lr)``).
* ``sgld_momentum=0`` (paper): the codes use Nesterov momentum 0.9 inside the SGLD loop
  (``sgld_nesterov=True``), its buffer reset at every outer step, on the data gradient only (the
  coupling and the noise are added after it). ``sgld_decay_in_momentum=True`` puts ``wd x'``
  into the buffer (Python code); ``False`` adds it after the momentum (Lua code).
* Weight decay (a group's ``weight_decay``) is an L2 term of f, so it enters dx' at x' (paper's
  experiments, both codes). ``outer_weight_decay=True`` also adds ``wd x`` to the outer direction
  (Python code and eSGD; it is added after the gamma factor, where eSGD multiplies it by gamma).
* Outer momentum (``momentum``, ``dampening``, ``nesterov``, torch.optim.SGD semantics, buffer
  starts as the first direction): none in the paper and the Lua code, Nesterov 0.9 in the Python
  code (whose buffer starts as the first gradient at x: not reproduced).
* The Python code's scoping never advances (``state['t']`` is not incremented): ``gamma1=0``.
  Presets: :data:`CODE_LUA` (the paper's runs) and :data:`CODE_PYTHON`.

Noise is drawn from a private generator seeded with ``noise_seed`` (identical on every process,
so DDP ranks stay in step); its state is in ``state_dict``. Defaults and their sources:
``L=20`` (README "usually 20"), ``gamma0=0.03, gamma1=1e-3`` (CIFAR-10, README/``train.lua``;
MNIST uses 1e-4, 1e-3), ``sgld_lr=0.1`` and ``noise=1e-4`` (code, paper), ``alpha=0.75`` (paper).

BatchNorm: the SGLD passes update running statistics at x', not x (neither code handles it);
re-estimate them at x before evaluation (:func:`ssl_suite.optim.replica_sgd.recompute_bn_stats`).
Memory: x and mu (scratch, not in ``state_dict``), the SGLD momentum buffer if used, the outer
momentum buffer if used. Parameters that get no gradient in an inner step stay put in that step;
those that get none in any inner step are not updated. If the closure raises, the parameters are
restored to x. All arithmetic is multi-tensor (``torch._foreach_*``; on the CPU torch runs them
tensor by tensor).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.optim import Optimizer

_KEY = "entropy_sgd"

#: The Lua code of the paper's experiments (``entropyoptim.lua`` + ``train.lua``); pass the
#: group's lr as the code's (e.g. 1 for CIFAR-10), and ``weight_decay``.
CODE_LUA = dict(scale_by_gamma=False, alpha=0.25, noise_formula="code", sgld_momentum=0.9,
                sgld_nesterov=True, sgld_decay_in_momentum=False, momentum=0.0)
#: ``python/optim.py`` (scoping inactive, outer Nesterov momentum and weight decay).
CODE_PYTHON = dict(scale_by_gamma=False, alpha=0.25, noise_formula="code", sgld_momentum=0.9,
                   sgld_nesterov=True, sgld_decay_in_momentum=True, momentum=0.9, nesterov=True,
                   outer_weight_decay=True, gamma1=0.0)


def scoped_gamma(gamma0: float, gamma1: float, k: int, gamma_max: Optional[float] = None,
                 schedule: str = "exp", updates: Optional[int] = None) -> float:
    """The coupling after k schedule updates: ``exp``: ``gamma0 (1 + gamma1)^k`` (Chaudhari et al.
    scoping; rSGD ``gsched='exp'``), ``lin``: ``gamma0 + gamma1 k`` (rSGD ``'lin'``), ``cosine``:
    ``gamma_max/2 (1 - cos(pi k / updates))`` (rSGD ``'cosine'``, absolute). Capped at
    ``gamma_max`` when given."""
    if schedule == "exp":
        g = gamma0 * (1.0 + gamma1) ** k
    elif schedule == "lin":
        g = gamma0 + gamma1 * k
    elif schedule == "cosine":
        if gamma_max is None or not updates:
            raise ValueError("cosine coupling schedule needs gamma_max and total_steps")
        g = 0.5 * gamma_max * (1.0 - math.cos(math.pi * min(k, updates) / updates))
    else:
        raise ValueError(f"coupling schedule {schedule!r}, expected exp, lin or cosine")
    return g if gamma_max is None else min(g, gamma_max)


def growth_rate(gamma_growth: float, updates: int, schedule: str = "exp",
                gamma0: float = 0.0) -> float:
    """gamma1 that multiplies gamma by ``gamma_growth`` over ``updates`` schedule updates:
    ``gamma_growth^(1/updates) - 1`` (exp; rSGD's ``grate``, eSGD's g1) or
    ``gamma0 (gamma_growth - 1) / updates`` (lin)."""
    if gamma_growth <= 0 or updates < 1:
        raise ValueError(f"gamma_growth={gamma_growth!r} needs > 0 and total_steps >= 1")
    if schedule == "exp":
        return gamma_growth ** (1.0 / updates) - 1.0
    if schedule == "lin":
        return gamma0 * (gamma_growth - 1.0) / updates
    raise ValueError(f"gamma_growth applies to the exp and lin schedules, not {schedule!r}")


class EntropySGD(Optimizer):
    """Entropy-SGD; see the module docstring. **Calls the closure L times per step.**

    Args:
        params: parameters or param groups (each group may set any per-group value below).
        lr: outer learning rate eta (follows LR schedulers).
        L: SGLD (inner) steps per outer step = closure calls per step.
        gamma0, gamma1, gamma_max: scope gamma_t = min(gamma0 (1+gamma1)^t, gamma_max).
        gamma_growth, total_steps: set gamma1 so that gamma grows by ``gamma_growth`` over
            ``total_steps`` outer steps (the factory passes ``total_steps``).
        sgld_lr: SGLD step size eta' (0.1, not scheduled, as in the code).
        noise: thermal noise epsilon (0 disables noise).
        alpha: weight of the new x' in the average mu (paper 0.75; code 0.25).
        momentum, dampening, nesterov: outer momentum (torch.optim.SGD semantics).
        weight_decay: L2 coefficient of f (in the SGLD gradient; see ``outer_weight_decay``).
        sgld_momentum, sgld_nesterov: momentum inside the SGLD loop (code: 0.9, Nesterov).
        scale_by_gamma: paper outer step ``lr gamma (x - mu)``; False: code ``lr (x - mu)``.
        noise_formula: ``"paper"`` (sqrt(eta') eps) or ``"code"`` (eps sqrt(2 eta')).
        outer_weight_decay: also add ``wd x`` to the outer direction (Python code, eSGD).
        sgld_decay_in_momentum: ``wd x'`` goes into the SGLD momentum buffer (Python code) or
            after it (Lua code).
        noise_seed: seed of the private noise generator.
    """

    requires_closure = True   # step() calls the closure itself (L inner steps)
    fresh_batches = True      # every closure call must draw a new batch
    recompute_bn_after_training = True   # BN statistics were gathered at x', not x (spec 1.4)

    def __init__(self, params, lr: float = 1.0, L: int = 20, gamma0: float = 0.03,
                 gamma1: float = 1e-3, gamma_max: Optional[float] = None, sgld_lr: float = 0.1,
                 noise: float = 1e-4, alpha: float = 0.75, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, *,
                 sgld_momentum: float = 0.0, sgld_nesterov: bool = True,
                 scale_by_gamma: bool = True, noise_formula: str = "paper",
                 outer_weight_decay: bool = False, sgld_decay_in_momentum: bool = True,
                 gamma_growth: Optional[float] = None, total_steps: Optional[int] = None,
                 noise_seed: int = 0):
        if gamma_growth is not None:
            if total_steps is None:
                raise ValueError("EntropySGD: gamma_growth needs total_steps")
            gamma1 = growth_rate(gamma_growth, int(total_steps))
        checks = [("lr", lr, lr >= 0), ("L", L, int(L) == L and L >= 1),
                  ("gamma0", gamma0, gamma0 >= 0), ("gamma1", gamma1, gamma1 > -1),
                  ("gamma_max", gamma_max, gamma_max is None or gamma_max >= 0),
                  ("sgld_lr", sgld_lr, sgld_lr > 0), ("noise", noise, noise >= 0),
                  ("alpha", alpha, 0 < alpha <= 1), ("momentum", momentum, 0 <= momentum < 1),
                  ("dampening", dampening, 0 <= dampening <= 1),
                  ("nesterov", nesterov, not nesterov or (momentum > 0 and dampening == 0)),
                  ("weight_decay", weight_decay, weight_decay >= 0),
                  ("sgld_momentum", sgld_momentum, 0 <= sgld_momentum < 1),
                  ("noise_formula", noise_formula, noise_formula in ("paper", "code"))]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"EntropySGD: invalid {name}={value!r}")
        defaults = dict(lr=lr, gamma0=gamma0, gamma1=gamma1, gamma_max=gamma_max,
                        sgld_lr=sgld_lr, noise=noise, alpha=alpha, momentum=momentum,
                        dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                        sgld_momentum=sgld_momentum, sgld_nesterov=sgld_nesterov)
        super().__init__(params, defaults)
        self.L = int(L)
        self.scale_by_gamma, self.noise_formula = bool(scale_by_gamma), noise_formula
        self.outer_weight_decay = bool(outer_weight_decay)
        self.sgld_decay_in_momentum = bool(sgld_decay_in_momentum)
        self.noise_seed = int(noise_seed)
        self._scratch: dict = {}
        self._gen: Optional[torch.Generator] = None
        self.state[_KEY] = {"t": 0}

    # ----------------------------------------------------------------------------------------
    @property
    def t(self) -> int:
        """Outer updates made so far."""
        return int(self.state[_KEY]["t"])

    def gamma(self, group: Optional[dict] = None) -> float:
        """gamma_t of ``group`` (default: the first) for the next step."""
        g = group if group is not None else self.param_groups[0]
        return scoped_gamma(g["gamma0"], g["gamma1"], self.t, g["gamma_max"])

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.noise_seed)
            rng = self.state[_KEY].get("rng")
            if rng is not None:
                self._gen.set_state(rng)
        return self._gen

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        glob = self.state.get(_KEY)
        if glob is None or "t" not in glob:
            raise ValueError("EntropySGD.load_state_dict: no 'entropy_sgd' entry")
        self.state[_KEY] = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                            for k, v in glob.items()}
        self._gen = None

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", {})
        self.__dict__.setdefault("_gen", None)

    def _buffers(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused scratch (x, mu) for ``p``: not optimizer state (reset at every step)."""
        bufs = self._scratch.get(p)
        if bufs is None or bufs[0].shape != p.shape or bufs[0].dtype != p.dtype:
            bufs = self._scratch[p] = (torch.empty_like(p), torch.empty_like(p))
        return bufs

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One outer step: the closure is called ``L`` times (fresh minibatch each), then
        ``x <- x - lr [gamma] (x - mu)``. Returns the first call's loss (at x)."""
        if closure is None:
            raise ValueError("EntropySGD.step needs a closure (called L times per step, a fresh "
                             "minibatch each: zero_grad, forward, backward, return the loss)")
        groups = [[p for p in g["params"]] for g in self.param_groups]
        anchors, mus = [], []
        for params in groups:
            bufs = [self._buffers(p) for p in params]
            anchors.append([b[0] for b in bufs])
            mus.append([b[1] for b in bufs])
            if params:
                torch._foreach_copy_(anchors[-1], params)
                torch._foreach_copy_(mus[-1], params)
        gammas = [self.gamma(g) for g in self.param_groups]
        touched: set[int] = set()
        sgld_bufs: dict[int, torch.Tensor] = {}
        first = None
        try:
            for ell in range(self.L):
                with torch.enable_grad():
                    out = closure()
                if ell == 0:
                    first = out
                for group, params, xs, ms, gamma in zip(self.param_groups, groups, anchors,
                                                        mus, gammas):
                    self._sgld_step(group, params, xs, ms, gamma, sgld_bufs, touched)
        except BaseException:
            for params, xs in zip(groups, anchors):
                if params:
                    torch._foreach_copy_(params, xs)
            raise
        for group, params, xs, ms, gamma in zip(self.param_groups, groups, anchors, mus, gammas):
            self._outer_step(group, params, xs, ms, gamma, touched)
        glob = {"t": self.t + 1}
        if self._gen is not None:
            glob["rng"] = self._gen.get_state()
        self.state[_KEY] = glob
        return first

    def _sgld_step(self, group, params, xs, ms, gamma, sgld_bufs, touched) -> None:
        """One SGLD step on x' (held in the parameters) and the average mu."""
        idx = [i for i, p in enumerate(params) if p.grad is not None]
        if not idx:
            # no gradient anywhere in this group: x' stays, mu still averages it
            if params:
                torch._foreach_lerp_(ms, params, group["alpha"])
            return
        ps = [params[i] for i in idx]
        if any(p.grad.is_sparse for p in ps):
            raise RuntimeError("EntropySGD does not support sparse gradients")
        touched.update(id(p) for p in ps)
        wd, m = group["weight_decay"], group["sgld_momentum"]
        d = [p.grad.detach().clone() for p in ps]
        if wd != 0 and self.sgld_decay_in_momentum:
            torch._foreach_add_(d, ps, alpha=wd)
        if m != 0:
            bufs = []
            for p, di in zip(ps, d):
                buf = sgld_bufs.get(id(p))
                if buf is None:
                    buf = sgld_bufs[id(p)] = di.clone()          # buffer reset every outer step
                else:
                    buf.mul_(m).add_(di)
                bufs.append(buf)
            if group["sgld_nesterov"]:
                torch._foreach_add_(d, bufs, alpha=m)
            else:
                d = [b.clone() for b in bufs]
        if wd != 0 and not self.sgld_decay_in_momentum:
            torch._foreach_add_(d, ps, alpha=wd)
        if gamma != 0:                                           # - gamma (x - x')
            torch._foreach_add_(d, torch._foreach_sub([xs[i] for i in idx], ps), alpha=-gamma)
        eta = group["sgld_lr"]
        torch._foreach_add_(ps, d, alpha=-eta)
        eps = group["noise"]
        if eps > 0:
            if self.noise_formula == "paper":
                scale = math.sqrt(eta) * eps
            else:
                scale = -eta * eps / math.sqrt(0.5 * eta)
            gen = self._generator(ps[0].device)
            for p in ps:
                z = torch.randn(p.shape, generator=gen, device=gen.device, dtype=p.dtype)
                p.add_(z.to(p.device), alpha=scale)
        torch._foreach_lerp_(ms, params, group["alpha"])        # mu <- (1-alpha) mu + alpha x'

    def _outer_step(self, group, params, xs, ms, gamma, touched) -> None:
        """x <- x - lr * momentum([gamma] (x - mu) [+ wd x])."""
        if params:
            torch._foreach_copy_(params, xs)
        idx = [i for i, p in enumerate(params) if id(p) in touched]
        if not idx:
            return
        ps = [params[i] for i in idx]
        d = torch._foreach_sub([xs[i] for i in idx], [ms[i] for i in idx])
        if self.scale_by_gamma:
            torch._foreach_mul_(d, gamma)
        if self.outer_weight_decay and group["weight_decay"] != 0:
            torch._foreach_add_(d, ps, alpha=group["weight_decay"])
        m, damp = group["momentum"], group["dampening"]
        if m != 0:
            bufs = []
            for p, di in zip(ps, d):
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = di.clone()
                else:
                    st["momentum_buffer"].mul_(m).add_(di, alpha=1 - damp)
                bufs.append(st["momentum_buffer"])
            if group["nesterov"]:
                torch._foreach_add_(d, bufs, alpha=m)
            else:
                d = bufs
        torch._foreach_add_(ps, d, alpha=-group["lr"])
