"""Replicated SGD (rSGD, "robust ensemble"; Pittorino, Lucibello, Feinauer, Perugini, Baldassi,
Demyanenko, Zecchina, "Entropic gradient descent algorithms and wide flat minima", ICLR 2021;
after Baldassi et al., PNAS 2016).
Spec: ``shared/algorithms/flat_minima_lr_scaling_generic_adam.md`` section 2.3. Reference: the Bocconi group's ``RobustNet`` / ``robust_dnn.py`` (spec section 0).

y replicas w^a of the network are coupled elastically to their barycentre (spec 2.3)::

    L_R({w^a}) = sum_a L(w^a) + gamma/2 sum_a ||w^a - w_bar||^2,   w_bar = (1/y) sum_a w^a

and every replica takes an SGD step on its own fresh minibatch B_a, with w_bar held fixed during
the step (the code detaches it; the gradient is the same since sum_a (w^a - w_bar) = 0)::

    d_a = grad L(w^a; B_a) + gamma_t (w^a - w_bar) [+ wd w^a]
    w^a <- w^a - lr * momentum_a(d_a)            (torch.optim.SGD momentum/dampening/nesterov)

The reference code writes the coupling as ``g (1/y) sum_a ||w^a - w_bar||^2`` on a loss averaged
over the y replicas and multiplies the lr by y; its per-replica force is therefore ``2g``:
**gamma here = 2 g there**. Its weight decay is also applied with the lr times y, i.e. it acts as
``y wd`` per replica: pass ``weight_decay = y wd_code`` to reproduce it. The explicit coupling is
stable for ``lr gamma < 2`` (without momentum); ``lr gamma = 1`` puts every replica on the centre
minus its own gradient step.

Coupling schedule (spec 2.3, applied every ``gamma_every`` steps, the code's per-epoch update is
``gamma_every`` = steps per epoch): ``k = t // gamma_every``; ``schedule="exp"``:
``gamma0 (1 + gamma1)^k`` (code ``gsched='exp'``); ``"lin"``: ``gamma0 + gamma1 k``;
``"cosine"``: ``gamma_max/2 (1 - cos(pi k / K))`` (absolute, as in the code); all capped at
``gamma_max``. ``gamma_growth`` (code ``gmax`` = 1e4) with ``total_steps`` sets gamma1 so that
gamma grows by that total factor over the run (code: ``grate = gmax^(1/epochs) - 1``); K =
``total_steps // gamma_every``. The code's automatic ``g0`` (loss / distance at epoch 0) is not
implemented: give ``gamma0``.

**Protocol and memory.** The optimizer is built from param groups like any other; its parameters
are the model's ``nn.Parameter`` objects. Between steps the model holds the **centre** w_bar (the
final model of the reference code), so evaluation, the BYOL target's EMA, checkpoints and linear
evaluation all see the centre. The optimizer keeps the y replicas in its state (``replicas``:
y tensors per parameter, in ``state_dict``), i.e. y extra parameter copies (the brief's "y - 1
replicas + the centre", since the model's own storage is the centre) and y momentum buffers.
:meth:`step` points each parameter at replica a's tensor (``p.data = w^a``, no copy), **calls the
closure once per replica per step** (y calls; each must zero the gradients, draw and augment a
**fresh minibatch**, forward, backward and return the loss), updates that replica, and finally
points the parameters back at the model's own storage and writes the replicas' mean into it.
:meth:`step` returns the y closure outputs concatenated (their mean is the replicas' mean loss).
The centre is recomputed from the replicas at the start of each step, so changes made to the
model's parameters between steps are overwritten (use :meth:`load_state_dict`).

Initialisation: the replicas start as copies of the parameters at the first step. The reference
code draws y independent initialisations; ``independent_init=True`` does this in :meth:`attach`
(``protocol.attach(optimizer, model)``), replica a >= 1 drawn by every submodule's
``reset_parameters()`` (buffers restored), replica 0 = the given weights.

BatchNorm buffers are shared by the replicas (kept simple): the model's running statistics are
updated by every replica's forward, so they average over the replicas' batches. The reference
code keeps one set per replica and averages them for the centre; for exact centre statistics call
:func:`recompute_bn_stats` on the model (which holds the centre) before evaluating.
:meth:`use_replica` temporarily puts one replica in the model (e.g. to evaluate it).

Defaults: ``replicas=3`` (code README and sharpness script), ``lr=0.1`` (code, before its x y),
constant coupling ``gamma0=2e-3`` (README ``g = 1e-3``, times 2), ``gamma1=0``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ..models.batchnorm import recompute_bn_stats
from .entropy_sgd import growth_rate, scoped_gamma
from .protocol import Handle

__all__ = ["ReplicaSGD", "recompute_bn_stats"]

_KEY = "replica_sgd"


class ReplicaSGD(Optimizer):
    """Replicated SGD; see the module docstring. **Calls the closure y times per step** (once
    per replica, a fresh minibatch each); the model holds the replicas' centre between steps.

    Args:
        params: parameters or param groups (each group may set lr, momentum, dampening,
            nesterov, weight_decay, gamma0, gamma1, gamma_max).
        lr: per-replica SGD learning rate (follows LR schedulers).
        replicas: y, the number of replicas.
        gamma0, gamma1, gamma_max, schedule, gamma_every: coupling schedule (module docstring).
        gamma_growth, total_steps: derive gamma1 from a total growth factor over the run.
        momentum, dampening, nesterov, weight_decay: per-replica SGD (torch.optim.SGD).
        independent_init: draw replicas 1..y-1 from ``reset_parameters()`` in :meth:`attach`.
    """

    requires_closure = True   # step() calls the closure itself (one per replica)
    recompute_bn_after_training = True   # the centre never ran forward: the engine re-estimates BN
    fresh_batches = True      # every closure call must draw a new batch
    supports_growth = False   # the replicas are copies of the parameters as they were

    def __init__(self, params, lr: float = 0.1, replicas: int = 3, gamma0: float = 2e-3,
                 gamma1: float = 0.0, gamma_max: Optional[float] = None, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, *,
                 schedule: str = "exp", gamma_every: int = 1,
                 gamma_growth: Optional[float] = None, total_steps: Optional[int] = None,
                 independent_init: bool = False):
        if schedule not in ("exp", "lin", "cosine"):
            raise ValueError(f"ReplicaSGD: schedule={schedule!r}, expected exp, lin or cosine")
        if int(gamma_every) != gamma_every or gamma_every < 1:
            raise ValueError(f"ReplicaSGD: invalid gamma_every={gamma_every!r}")
        updates = None if total_steps is None else max(1, int(total_steps) // int(gamma_every))
        if gamma_growth is not None:
            if updates is None:
                raise ValueError("ReplicaSGD: gamma_growth needs total_steps")
            gamma1 = growth_rate(gamma_growth, updates, schedule, gamma0)
        if schedule == "cosine" and (gamma_max is None or updates is None):
            raise ValueError("ReplicaSGD: schedule='cosine' needs gamma_max and total_steps")
        checks = [("lr", lr, lr >= 0), ("replicas", replicas, int(replicas) == replicas
                                        and replicas >= 1),
                  ("gamma0", gamma0, gamma0 >= 0), ("gamma1", gamma1, gamma1 >= 0),
                  ("gamma_max", gamma_max, gamma_max is None or gamma_max >= 0),
                  ("momentum", momentum, 0 <= momentum < 1),
                  ("dampening", dampening, 0 <= dampening <= 1),
                  ("nesterov", nesterov, not nesterov or (momentum > 0 and dampening == 0)),
                  ("weight_decay", weight_decay, weight_decay >= 0)]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"ReplicaSGD: invalid {name}={value!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, gamma0=gamma0, gamma1=gamma1,
                        gamma_max=gamma_max)
        super().__init__(params, defaults)
        self.replicas, self.schedule = int(replicas), schedule
        self.gamma_every, self.updates = int(gamma_every), updates
        self.independent_init = bool(independent_init)
        self.state[_KEY] = {"t": 0}

    # ----------------------------------------------------------------------------------------
    @property
    def t(self) -> int:
        """Steps made so far."""
        return int(self.state[_KEY]["t"])

    def gamma(self, group: Optional[dict] = None) -> float:
        """The coupling of ``group`` (default: the first) for the next step."""
        g = group if group is not None else self.param_groups[0]
        return scoped_gamma(g["gamma0"], g["gamma1"], self.t // self.gamma_every, g["gamma_max"],
                            self.schedule, self.updates)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _ensure_replicas(self) -> None:
        for p in self._params():
            st = self.state[p]
            if "replicas" not in st:
                st["replicas"] = [p.detach().clone(memory_format=torch.preserve_format)
                                  for _ in range(self.replicas)]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        glob = self.state.get(_KEY)
        if glob is None or "t" not in glob:
            raise ValueError("ReplicaSGD.load_state_dict: no 'replica_sgd' entry")
        self.state[_KEY] = dict(glob)
        for p in self._params():
            reps = self.state[p].get("replicas")
            if reps is not None and len(reps) != self.replicas:
                raise ValueError(f"ReplicaSGD.load_state_dict: {len(reps)} replicas saved, "
                                 f"this optimizer has {self.replicas}")

    def attach(self, model: nn.Module) -> Handle:
        """With ``independent_init``: replicas 1..y-1 get fresh weights from ``model``'s
        ``reset_parameters()`` (its buffers and the current weights are restored; replica 0 is
        the current weights). Nothing to detach: returns an empty handle."""
        if self.independent_init and not any("replicas" in self.state[p]
                                             for p in self._params()):
            params = self._params()
            keep = [p.detach().clone() for p in params]
            buffers = [(b, b.detach().clone()) for b in model.buffers()]
            owned = {id(p) for p in params}
            if not any(id(p) in owned for p in model.parameters()):
                raise ValueError("ReplicaSGD.attach: the model holds none of the optimizer's "
                                 "parameters")
            drawn = []
            with torch.no_grad():
                for _ in range(self.replicas - 1):
                    for mod in model.modules():
                        if hasattr(mod, "reset_parameters") and any(
                                id(q) in owned for q in mod.parameters(recurse=False)):
                            mod.reset_parameters()
                    drawn.append([p.detach().clone(memory_format=torch.preserve_format)
                                  for p in params])
                for p, k in zip(params, keep):
                    p.copy_(k)
                for b, k in buffers:
                    b.copy_(k)
            for i, p in enumerate(params):
                self.state[p]["replicas"] = [keep[i]] + [d[i] for d in drawn]
        return Handle()

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _write_centre(self, params: list[torch.Tensor]) -> None:
        """The model's own storage <- mean of the replicas."""
        for p in params:
            reps = self.state[p]["replicas"]
            p.copy_(reps[0])
            for r in reps[1:]:
                p.add_(r)
            if len(reps) > 1:
                p.div_(len(reps))

    def average_into_model(self) -> None:
        """Write the replicas' mean (the centre w_bar) into the model's parameters. Every step
        already ends with it; call it after editing replicas or the model by hand."""
        self._ensure_replicas()
        self._write_centre(self._params())

    @contextlib.contextmanager
    def use_replica(self, a: int):
        """``with opt.use_replica(a): evaluate(model)``: the model holds replica a inside."""
        if not 0 <= a < self.replicas:
            raise IndexError(f"replica {a} of {self.replicas}")
        self._ensure_replicas()
        params = self._params()
        homes = [p.data for p in params]
        try:
            for p in params:
                p.data = self.state[p]["replicas"][a]
            yield
        finally:
            for p, h in zip(params, homes):
                p.data = h

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step of every replica: the closure is called ``replicas`` times (fresh minibatch
        each) with the model holding replica a; then the model holds the new centre. Returns
        the closure outputs concatenated (tensors) or their mean (floats)."""
        if closure is None:
            raise ValueError("ReplicaSGD.step needs a closure (called once per replica per step, "
                             "a fresh minibatch each: zero_grad, forward, backward, return loss)")
        self._ensure_replicas()
        params = self._params()
        self._write_centre(params)                     # w_bar of this step, in the model storage
        homes = [p.data for p in params]
        centre = dict(zip(map(id, params), homes))
        gammas = [self.gamma(g) for g in self.param_groups]
        outs = []
        try:
            for a in range(self.replicas):
                for p in params:
                    p.data = self.state[p]["replicas"][a]
                with torch.enable_grad():
                    outs.append(closure())
                for group, gamma in zip(self.param_groups, gammas):
                    self._replica_step(group, a, gamma, centre)
        finally:
            for p, h in zip(params, homes):
                p.data = h
        self._write_centre(params)
        self.state[_KEY] = {"t": self.t + 1}
        if all(isinstance(o, torch.Tensor) for o in outs):
            return torch.cat([o.detach().reshape(-1) for o in outs])
        if all(o is not None for o in outs):
            return sum(float(o) for o in outs) / len(outs)
        return None

    def _replica_step(self, group: dict, a: int, gamma: float, centre: dict) -> None:
        """w^a <- w^a - lr momentum(grad + gamma (w^a - w_bar) + wd w^a)."""
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        if any(p.grad.is_sparse for p in ps):
            raise RuntimeError("ReplicaSGD does not support sparse gradients")
        ws = [self.state[p]["replicas"][a] for p in ps]
        d = torch._foreach_sub(ws, [centre[id(p)] for p in ps])
        torch._foreach_mul_(d, gamma)
        torch._foreach_add_(d, [p.grad for p in ps])
        if group["weight_decay"] != 0:
            torch._foreach_add_(d, ws, alpha=group["weight_decay"])
        m, damp = group["momentum"], group["dampening"]
        if m != 0:
            bufs = []
            for p, di in zip(ps, d):
                st = self.state[p]
                lst = st.setdefault("momentum_buffer", [None] * self.replicas)
                if lst[a] is None:
                    lst[a] = di.clone()
                else:
                    lst[a].mul_(m).add_(di, alpha=1 - damp)
                bufs.append(lst[a])
            if group["nesterov"]:
                torch._foreach_add_(d, bufs, alpha=m)
            else:
                d = bufs
        torch._foreach_add_(ws, d, alpha=-group["lr"])
