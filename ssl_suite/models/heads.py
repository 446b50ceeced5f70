"""Projector / predictor MLPs of BYOL (Grill et al. 2020, §3.3).

Both are ``Linear(d, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out)``; the output is not
batch-normalised. The last linear layer has no bias, as in the reference code
(``byol/utils/networks.py::MLP``: ``hk.Linear(output_size, with_bias=False)``).
"""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """BYOL projection / prediction head: Linear -> BN -> ReLU -> Linear (no bias)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
