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

The update is written once over lists of tensors with ``torch._foreach_*`` calls, so a step is a
handful of multi-tensor kernels whatever the number of layers.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling, trust ratio on ``||g + wd w||`` (BYOL reference).

    Args:
        params: parameters or parameter groups; a group may set ``lars_adapt=False``.
        lr: learning rate (the schedule multiplies it).
        momentum: beta, 0.9 in BYOL.
        weight_decay: decoupled-from-nothing L2 term added to the gradient before the trust ratio.
        trust_coeff: eta, 1e-3 in BYOL.
        lars_adapt: default for groups that do not say.
    """

    def __init__(self, params, lr: float = 0.2, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coeff: float = 1e-3, lars_adapt: bool = True, foreach: Optional[bool] = None):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coeff <= 0:
            raise ValueError(f"LARS: invalid hyper-parameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} trust_coeff={trust_coeff}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coeff=trust_coeff, lars_adapt=lars_adapt, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One update; ``closure`` (zero-grad, forward, backward, return loss) is called once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, adapt = group["weight_decay"], group["lars_adapt"]
            if wd != 0:
                updates = torch._foreach_add(grads, params, alpha=wd)
            else:
                updates = [g.clone() for g in grads] if adapt else list(grads)
            if adapt:
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(updates))
                ok = (w_norm > 0) & (u_norm > 0)
                trust = torch.where(ok, group["trust_coeff"] * w_norm / u_norm.clamp_min(1e-30),
                                    torch.ones_like(w_norm))
                torch._foreach_mul_(updates, list(trust.to(updates[0].dtype).unbind()))
            bufs = []
            for p, u in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss
