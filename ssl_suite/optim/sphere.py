"""SphereSGD: projected SGD on the unit sphere with a fixed effective learning rate.

Kodryan, Lobacheva, Nakhodnov & Vetrov, "Training Scale-Invariant Neural Networks on the Sphere Can
Happen in Three Regimes", NeurIPS 2022 (code ``tipt0p/three_regimes_on_the_sphere`` @ 17877fc,
``train.py --fix_elr``, ``training_utils.fix_si_pnorm``; spec ``shared/algorithms/
init_prune_norm_largebatch.md`` Sec. 5).

For scale-invariant (SI) parameters, ``L(c w) = L(w)`` for ``c > 0``, so only the direction
``w_hat = w / ||w||`` matters, ``grad L(w)`` is orthogonal to ``w`` and
``grad L(w_hat) = ||w|| grad L(w)`` (paper Sec. 2). SGD on ``w`` with learning rate ``lr`` moves
``w_hat`` like SGD on the sphere with the *effective* learning rate ``ELR = lr / ||w||^2``, which
drifts as ``||w||`` changes. Fixing the ELR means training on the sphere directly (paper Sec. 3,
Riemannian SGD with the projection retraction); per block ``w`` (see ``sphere``), with
``eta = lr`` the ELR::

    w_hat = w / ||w||,   g_hat = ||w|| grad L(w)                 gradient at the point of the sphere
    v     = g_hat - <g_hat, w_hat> w_hat                           project onto the tangent space
    w_hat' = (w_hat - eta v) / ||w_hat - eta v||                   step, retract by normalisation
    w     <- r w_hat'                                              radius r (1, or the initial norm)

so ``angle(w, w')`` satisfies ``tan angle = eta ||v||`` (``momentum=0``). The reference code does
the same thing in weight coordinates: plain SGD with ``lr_code = ELR * rho0^2`` then
``w <- w rho0 / ||w||`` (``radius="init"`` reproduces its radius, ``project=False`` its
un-projected step; for an SI loss the gradient is already tangent, so both agree up to rounding).

``sphere`` (the block that lives on one sphere):

* ``"joint"`` (paper, ``--fix_elr``/``fix_si_pnorm``, default): all SI parameters of a param group
  form one vector on one sphere; the ELR is ``lr / ||w_SI||^2`` of the concatenation.
* ``"tensor"``: every SI tensor on its own sphere (every tensor runs at ELR ``lr``).
* ``"unit"``: every output filter ``w[j]`` on its own sphere (the code's ``--fix_all_elr`` has a
  common radius; here every filter has ``r``), i.e. :class:`~ssl_suite.optim.wrs.WeightRescaling`
  with ``per="unit"`` fused into the step.

Momentum (``momentum > 0``): the code warns "fixing ELR with momentum is ambiguous" and the paper
uses none. Here [RECON]: the buffer holds tangent vectors; before each use it is re-projected onto
the current tangent space (vector transport by projection), ``buf <- momentum * P(buf) +
(1 - dampening) v``, the step direction is ``buf`` (or ``v + momentum * buf`` with Nesterov).
``weight_decay`` only acts on the non-SI parameters: on an SI block it is radial and the
projection removes it.

Which parameters are SI: the group key ``scale_invariant`` (True/False) when given; otherwise every
parameter with ``ndim >= 2``, refined by :meth:`SphereSGD.attach` (called by
:func:`ssl_suite.optim.protocol.attach`) to the weights that
:func:`~ssl_suite.analysis.scale_invariance.scale_invariant_params` finds by module order.
:func:`sphere_param_groups` builds explicit groups from a traced detection. Non-SI parameters
(biases, BN affine, a classifier) take a plain ``torch.optim.SGD`` step with ``noninv_lr`` (None:
the group's ``lr``; 0 freezes them, as the paper's ``noninvlr = 0``), the group's momentum and
weight decay.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.optim.sgd import sgd as torch_sgd

from .protocol import Handle

__all__ = ["SphereSGD", "sphere_param_groups"]

_SPHERES = ("joint", "tensor", "unit")


def _block_shape(p: torch.Tensor, sphere: str) -> tuple[int, ...]:
    return (p.shape[0],) + (1,) * (p.ndim - 1) if sphere == "unit" and p.ndim > 1 else ()


def _block_sum(t: torch.Tensor, sphere: str) -> torch.Tensor:
    """Sum of ``t`` over each block, shaped to broadcast (0-d, or ``[out, 1, ...]`` per filter)."""
    if sphere == "unit" and t.ndim > 1:
        return t.reshape(t.shape[0], -1).sum(1).view(_block_shape(t, sphere))
    return t.sum()


class SphereSGD(torch.optim.Optimizer):
    """Projected SGD on the sphere with a fixed effective learning rate ``lr`` (module doc).

    Args: ``lr``: the ELR; ``momentum``, ``dampening``, ``nesterov``: as ``torch.optim.SGD``
    (tangent-space buffer, module doc); ``sphere``: ``"joint"`` | ``"tensor"`` | ``"unit"``;
    ``radius``: the sphere's radius in weight space (a float, or ``"init"`` for the norm each block
    has at its first step, the code's ``rho0``); ``project``: project the gradient onto the tangent
    space (False: the code's plain step before the renormalisation); ``noninv_lr``: lr of the
    non-SI parameters (None: ``lr``); ``weight_decay``: L2 on the non-SI parameters;
    ``scale_invariant``: group-level SI flag (None: auto, module doc); ``foreach``: the
    multi-tensor path (None: on when every tensor is on one device)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, sphere: str = "joint",
                 radius: Union[float, str] = 1.0, project: bool = True,
                 noninv_lr: Optional[float] = None, weight_decay: float = 0.0,
                 scale_invariant: Optional[bool] = None, foreach: Optional[bool] = None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if sphere not in _SPHERES:
            raise ValueError(f"sphere must be one of {_SPHERES}, got {sphere!r}")
        if not (radius == "init" or (isinstance(radius, (int, float)) and radius > 0)):
            raise ValueError(f"radius must be > 0 or 'init', got {radius!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        sphere=sphere, radius=radius, project=project, noninv_lr=noninv_lr,
                        weight_decay=weight_decay, scale_invariant=scale_invariant,
                        foreach=foreach)
        super().__init__(params, defaults)
        self._auto_si: dict[int, bool] = {}

    # -- which parameters are SI -------------------------------------------------------------
    def is_scale_invariant(self, p: torch.Tensor, group: dict) -> bool:
        flag = group.get("scale_invariant")
        if flag is not None:
            return bool(flag)
        return self._auto_si.get(id(p), p.ndim >= 2)

    def attach(self, model: nn.Module) -> Handle:
        """Mark as SI, in groups without an explicit ``scale_invariant``, exactly the weights
        that module-order detection finds in ``model``; installs no hooks."""
        from ..analysis.scale_invariance import scale_invariant_params
        params = dict(model.named_parameters())
        si = {id(params[n]) for n in scale_invariant_params(model)}
        for group in self.param_groups:
            if group.get("scale_invariant") is None:
                for p in group["params"]:
                    self._auto_si[id(p)] = id(p) in si
        return Handle()

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step; ``closure`` (zero-grad, forward, backward) is called once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            si, other = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SphereSGD does not support sparse gradients")
                (si if self.is_scale_invariant(p, group) else other).append(p)
            if si:
                self._sphere_step(group, si)
            if other:
                self._plain_step(group, other)
        return loss

    def _block_norms(self, ps: list[torch.Tensor], sphere: str) -> list[torch.Tensor]:
        if sphere == "unit":
            return [_block_sum(p * p, sphere).sqrt() for p in ps]
        norms = torch._foreach_norm(ps)
        if sphere == "tensor":
            return list(norms)
        joint = torch.stack([n.to(ps[0].device) for n in norms]).square().sum().sqrt()
        return [joint.to(p.device) for p in ps]

    def _block_dots(self, a: list[torch.Tensor], b: list[torch.Tensor],
                    sphere: str) -> list[torch.Tensor]:
        prods = torch._foreach_mul(a, b)
        dots = [_block_sum(t, sphere) for t in prods]
        if sphere == "joint":
            total = torch.stack([d.to(a[0].device) for d in dots]).sum()
            dots = [total.to(t.device) for t in a]
        return dots

    def _sphere_step(self, group: dict, ps: list[torch.Tensor]) -> None:
        sphere, eta, mu = group["sphere"], group["lr"], group["momentum"]
        damp, nesterov = group["dampening"], group["nesterov"]
        grads = [p.grad for p in ps]
        norms = self._block_norms(ps, sphere)
        if not bool(torch.stack([n.min().to(ps[0].device) for n in norms]).min() > 0):
            raise ValueError("SphereSGD: a scale-invariant block has zero norm; it has no "
                             "direction on the sphere")
        # w_hat = w / ||w||;  g_hat = ||w|| g;  v = g_hat - <g_hat, w_hat> w_hat
        u = torch._foreach_div(ps, norms)
        v = torch._foreach_mul(grads, norms)
        if group["project"]:
            radial = self._block_dots(v, u, sphere)
            torch._foreach_sub_(v, torch._foreach_mul(u, radial))
        if mu != 0:
            fresh = ["momentum_buffer" not in self.state[p] for p in ps]
            for p, vi, f in zip(ps, v, fresh):
                if f:   # the first step copies the direction, as torch.optim.SGD
                    self.state[p]["momentum_buffer"] = vi.clone()
            bufs = [self.state[p]["momentum_buffer"] for p in ps]
            if not all(fresh):
                if group["project"]:   # transport: project the buffer onto the new tangent space
                    torch._foreach_sub_(bufs, torch._foreach_mul(
                        u, self._block_dots(bufs, u, sphere)))
                old = [b for b, f in zip(bufs, fresh) if not f]
                torch._foreach_mul_(old, mu)
                torch._foreach_add_(old, [vi for vi, f in zip(v, fresh) if not f],
                                    alpha=1 - damp)
            v = torch._foreach_add(v, bufs, alpha=mu) if nesterov else bufs
        # w_hat' = normalize(w_hat - eta v);  w = r w_hat'
        torch._foreach_add_(u, v, alpha=-eta)
        new_norms = self._block_norms(u, sphere)
        radii = self._radii(group, ps, norms, sphere)
        torch._foreach_mul_(u, [r / n for r, n in zip(radii, new_norms)])
        torch._foreach_copy_(ps, u)

    def _radii(self, group: dict, ps: list[torch.Tensor], norms: list[torch.Tensor],
               sphere: str) -> list[Any]:
        if group["radius"] != "init":
            return [float(group["radius"])] * len(ps)
        out = []
        for p, n in zip(ps, norms):
            state = self.state[p]
            if "radius" not in state:
                state["radius"] = n.detach().clone()
            out.append(state["radius"])
        return out

    def _plain_step(self, group: dict, ps: list[torch.Tensor]) -> None:
        lr = group["noninv_lr"] if group["noninv_lr"] is not None else group["lr"]
        if lr == 0:
            return
        bufs = [self.state[p].get("momentum_buffer") for p in ps]
        torch_sgd(ps, [p.grad for p in ps], bufs, foreach=group["foreach"],
                  weight_decay=group["weight_decay"], momentum=group["momentum"], lr=lr,
                  dampening=group["dampening"], nesterov=group["nesterov"], maximize=False)
        if group["momentum"] != 0:
            for p, b in zip(ps, bufs):
                self.state[p]["momentum_buffer"] = b


def sphere_param_groups(model: nn.Module, example_input_fn: Optional[Callable[[], Any]] = None,
                        noninv_lr: Optional[float] = None, weight_decay: float = 0.0) -> list[dict]:
    """Two param groups for :class:`SphereSGD` from a structural detection (traced through
    ``example_input_fn()`` when given): the trainable SI weights (``scale_invariant=True``) and the
    other trainable parameters (``scale_invariant=False``, ``noninv_lr``, ``weight_decay``)."""
    from ..analysis.scale_invariance import scale_invariant_params
    si = set(scale_invariant_params(model, example_input_fn))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in si], "scale_invariant": True}]
    rest = [p for n, p in named if n not in si]
    if rest:
        groups.append({"params": rest, "scale_invariant": False, "noninv_lr": noninv_lr,
                       "weight_decay": weight_decay})
    return groups
