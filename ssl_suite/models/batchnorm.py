"""BatchNorm tools: recalibration of running statistics, SyncBatchNorm conversion.

After weight averaging (Replicated SGD's centre, Lookahead's slow weights, SWA), after Entropy-SGD
(whose SGLD passes ran at x', not x) and after a weight rescaling, the running statistics of the
BatchNorm layers no longer describe the network: :func:`recompute_bn_stats` re-estimates them on
a loader, as the reference codes' "dry pass" (``compute_bn_params`` of Entropy-SGD's code).
:func:`convert_sync_bn` is the conversion pretraining uses under DDP on GPUs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recompute_bn_stats", "convert_sync_bn"]


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Every ``BatchNorm*d`` of ``model`` as ``torch.nn.SyncBatchNorm`` (statistics over all
    processes; torch's SyncBatchNorm runs on CUDA only)."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Any],
                       forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` (e.g. the rSGD centre, or
    the Entropy-SGD weights x) as the plain average over ``batches``: reset, ``momentum=None``
    (torch's cumulative moving average), BatchNorm layers in train mode and every other module in
    eval mode (dropout off, as the Entropy-SGD code's dry pass), no grad. ``forward(model,
    batch)`` runs one batch (default: ``model(batch)``, or ``model(batch[0])`` for a tuple or
    list). Restores the modules' momenta and train/eval modes. Returns the number of batches."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    n = 0
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, mode in modes:
            m.training = mode
    return n
