"""Per-step learning-rate schedules (multipliers of the peak LR at optimizer step k).

* ``warmup_cosine`` is the BYOL reference ``schedules.learning_schedule`` (Grill et al. 2020,
  App. J): linear warmup from 0 over the warmup steps, ``lr_k = lr * k / W``, then cosine decay
  ``lr_k = lr * 0.5 (1 + cos(pi (k - W) / (K - W)))`` to 0 at K (``final_frac`` raises the floor).
* ``warmup_step``: after warmup, multiplied by ``gamma`` at each milestone step.
* ``warmup_restarts``: SGDR (Loshchilov & Hutter, ICLR 2017): cosine from 1 to ``final_frac``
  over a cycle of T_0 steps, restarted with cycles T_i = T_0 * T_mult^i.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_frac: float = 0.0) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based, the step about to run)."""
    if step < warmup_steps:
        return step / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay, 1.0)
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_step(step: int, warmup_steps: int, milestones: list[int], gamma: float) -> float:
    if step < warmup_steps:
        return step / warmup_steps
    return gamma ** sum(step >= m for m in milestones)


def warmup_restarts(step: int, warmup_steps: int, first_cycle: int, mult: float,
                    final_frac: float = 0.0) -> float:
    if step < warmup_steps:
        return step / warmup_steps
    t, cycle = step - warmup_steps, float(max(first_cycle, 1))
    while t >= cycle:
        t -= cycle
        cycle *= mult
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * t / cycle))


def build_scheduler(optimizer: Optimizer, cfg, steps_per_epoch: int, total_steps: int) -> LambdaLR:
    """The LambdaLR for a :class:`ssl_suite.config.ScheduleConfig` (stepped per optimizer step)."""
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps)
    if cfg.name == "step":
        milestones = [int(round(m * steps_per_epoch)) for m in cfg.milestones]
        fn = partial(warmup_step, warmup_steps=warmup, milestones=milestones, gamma=cfg.gamma)
    elif cfg.name == "restarts":
        fn = partial(warmup_restarts, warmup_steps=warmup,
                     first_cycle=int(round(cfg.restart_epochs * steps_per_epoch)),
                     mult=cfg.restart_mult, final_frac=cfg.final_lr_frac)
    else:
        fn = partial(warmup_cosine, warmup_steps=warmup, total_steps=total_steps,
                     final_frac=cfg.final_lr_frac)
    return LambdaLR(optimizer, fn)


def warmup_cosine_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                            final_frac: float = 0.0) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step; state_dict holds the step count."""
    return LambdaLR(optimizer, partial(warmup_cosine, warmup_steps=warmup_steps,
                                       total_steps=total_steps, final_frac=final_frac))
