"""LARS in the BYOL reference form (You et al. 2017; Grill et al. 2020, App. J).

The reference (``byol/utils/optimizers.py``) chains, per parameter tensor w with gradient g::

    u = g + wd * w                                   (only where the filter admits w)
    u = eta * ||w|| / ||u|| * u                      (trust ratio; 1 if ||w|| or ||u|| is 0)
    m = beta * m + u
    w = w - lr * m

The trust ratio uses the norm of the update *including* weight decay, ``||g + wd w||``. timm,
solo-learn and lightly use ``||g|| + wd ||w||`` instead (NVIDIA LARC style); for BYOL we follow
the reference. Parameter groups with ``lars_adapt=False`` (biases and normalisation parameters,
see :func:`ssl_suite.optim.factory.param_groups`) get neither weight decay nor adaptation: plain
momentum SGD, as ``exclude_bias_and_norm`` does in the reference.

The update is memory-bound, so the code paths differ only in how many times they stream the
tensors (``scripts/bench_optim_step.py`` measures them against fused AdamW and timm's LARS):

* compiled (default on CPU from 1M parameters, ``compile=True`` anywhere): :func:`_lars_loop`
  under ``torch.compile``; Inductor fuses a tensor's update into one read of (w, g) for the norms
  and one pass over (g, w, m). Compiled once per process and parameter shapes (~30 s on a CPU,
  seconds once Inductor's on-disk cache has it); if compiling fails the eager paths take over.
* per tensor, eager (CPU default): the same loop run eagerly, one tensor at a time, so that
  w, g, m stay in cache between its few ops; u goes to a reused scratch buffer (a fresh large
  CPU allocation per tensor costs page faults).
* foreach, eager (CUDA and other devices): a handful of multi-tensor kernels, no copy of g.

None calls ``.item()``: trust ratios stay on the device.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._compile import CompiledLoop, wants_compile



def _trust_ratio(w_norm: Tensor, u_norm: Tensor, eta) -> Tensor:
    """eta * ||w|| / ||u||, and 1 where ||w|| or ||u|| is 0 (0-dim or stacked norms)."""
    ok = (w_norm > 0) & (u_norm > 0)
    return torch.where(ok, eta * w_norm / u_norm.clamp_min(1e-30), torch.ones_like(w_norm))


def _lars_loop(work, scratch: Optional[dict] = None) -> None:
    """The update, one tensor at a time. ``work``: ``(params, grads, bufs, hyper, adapt, has_wd)``
    per group, ``hyper = tensor([lr, wd, beta, eta])`` (tensors, so that a new lr each step does
    not recompile). ``scratch`` (eager only): a flat buffer per (device, dtype), as large as the
    largest tensor, that receives u instead of a fresh allocation per tensor."""
    for params, grads, bufs, hyper, adapt, has_wd in work:
        lr, wd, beta, eta = hyper.unbind()
        for w, g, m in zip(params, grads, bufs):
            u = g
            if has_wd:
                out = None if scratch is None else scratch[w.device, w.dtype][:w.numel()].view_as(w)
                u = torch.addcmul(g, w, wd, out=out)                      # g + wd w
            m.mul_(beta)
            if adapt:
                trust = _trust_ratio(torch.linalg.vector_norm(w), torch.linalg.vector_norm(u), eta)
                m.addcmul_(u, trust)                                      # beta m + trust u
            else:
                m.add_(u)
            w.addcmul_(m, lr, value=-1)                                   # w - lr m


def _lars_foreach(params, grads, bufs, *, lr: float, wd: float, beta: float, eta: float,
                  adapt: bool) -> None:
    """The same update as multi-tensor kernels (few launches on a GPU)."""
    updates = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
    torch._foreach_mul_(bufs, beta)
    if adapt:
        norms = torch._foreach_norm(list(params) + list(updates))  # one call for ||w|| and ||u||
        n = len(params)
        trust = _trust_ratio(torch.stack(norms[:n]), torch.stack(norms[n:]), eta)
        torch._foreach_addcmul_(bufs, updates, list(trust.to(params[0].dtype).unbind()))
    else:
        torch._foreach_add_(bufs, updates)
    torch._foreach_add_(params, bufs, alpha=-lr)


_COMPILED = CompiledLoop(_lars_loop, "LARS")


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling, trust ratio on ``||g + wd w||`` (BYOL reference).

    Args:
        params: parameters or parameter groups; a group may set ``lars_adapt=False``.
        lr: learning rate (the schedule multiplies it).
        momentum: beta, 0.9 in BYOL.
        weight_decay: decoupled-from-nothing L2 term added to the gradient before the trust ratio.
        trust_coeff: eta, 1e-3 in BYOL.
        lars_adapt: default for groups that do not say.
        foreach: eager multi-tensor kernels; None: on every device but the CPU, where one tensor
            at a time is faster (it stays in cache).
        compile: run the step through ``torch.compile``; None: on the CPU when the parameters
            hold at least ``_compile.COMPILE_MIN_NUMEL`` (4M) elements. Not part of the state_dict.
    """

    def __init__(self, params, lr: float = 0.2, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coeff: float = 1e-3, lars_adapt: bool = True, foreach: Optional[bool] = None,
                 compile: Optional[bool] = None):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coeff <= 0:
            raise ValueError(f"LARS: invalid hyper-parameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} trust_coeff={trust_coeff}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coeff=trust_coeff, lars_adapt=lars_adapt, foreach=foreach)
        super().__init__(params, defaults)
        self.compile = compile
        self._scratch: dict = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("compile", None)
        self.__dict__.setdefault("_scratch", {})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One update; ``closure`` (zero-grad, forward, backward, return loss) is called once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                bufs = [self._momentum_buffer(p) for p in params]
                work.append((group, params, [p.grad for p in params], bufs))
        if work and not (self._wants_compile(work) and self._step_compiled(work)):
            self._step_eager(work)
        return loss

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    @staticmethod
    def _hyper(group: dict, ref: Tensor) -> Tensor:
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        return torch.tensor([group["lr"], group["weight_decay"], group["momentum"],
                             group["trust_coeff"]], dtype=dtype, device=ref.device)

    @staticmethod
    def _args(group: dict, params, grads, bufs, hyper: Tensor) -> tuple:
        return params, grads, bufs, hyper, bool(group["lars_adapt"]), group["weight_decay"] != 0

    def _wants_compile(self, work) -> bool:
        return wants_compile(self.compile, (p for _, ps, *_ in work for p in ps))

    def _step_compiled(self, work) -> bool:
        """True when the compiled loop did the step; False (after one warning) when compiling
        fails: this optimizer then stays eager."""
        if _COMPILED([self._args(g, ps, gs, bs, self._hyper(g, ps[0]))
                            for g, ps, gs, bs in work]):
            return True
        self.compile = False
        return False

    def _step_eager(self, work) -> None:
        for group, params, grads, bufs in work:
            foreach = group["foreach"]
            if foreach is None:
                foreach = params[0].device.type != "cpu"
            if foreach:
                _lars_foreach(params, grads, bufs, lr=group["lr"], wd=group["weight_decay"],
                              beta=group["momentum"], eta=group["trust_coeff"],
                              adapt=group["lars_adapt"])
            else:
                _lars_loop([self._args(group, params, grads, bufs, self._hyper(group, params[0]))],
                           self._scratch_for(params) if group["weight_decay"] != 0 else None)

    def _scratch_for(self, params) -> dict:
        for p in params:
            key = (p.device, p.dtype)
            if key not in self._scratch or self._scratch[key].numel() < p.numel():
                self._scratch[key] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        return self._scratch
