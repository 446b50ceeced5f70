"""Per-step learning-rate schedules.

``warmup_cosine`` is the BYOL reference ``schedules.learning_schedule`` (Grill et al. 2020,
App. J): linear warmup from 0 over the warmup steps, ``lr_k = lr * k / W``, then cosine decay
``lr_k = lr * 0.5 (1 + cos(pi (k - W) / (K - W)))`` to 0 at K (``final_frac`` raises the floor).
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


def warmup_cosine_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                            final_frac: float = 0.0) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step; state_dict holds the step count."""
    return LambdaLR(optimizer, partial(warmup_cosine, warmup_steps=warmup_steps,
                                       total_steps=total_steps, final_frac=final_frac))
