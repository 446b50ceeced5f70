"""BYOL: online network, EMA target, symmetric normalised-MSE loss, cosine tau schedule.

Grill et al. 2020, "Bootstrap Your Own Latent" (arXiv 2006.07733 v3):

* online network = encoder f_theta -> projector g_theta -> predictor q_theta (§3.3);
* target network = encoder f_xi -> projector g_xi, an exponential moving average of the online
  encoder+projector parameters, xi <- tau xi + (1 - tau) theta (§3.1, eq. 1 of Alg. 1), updated
  once per optimizer step with tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (§3.3);
* loss L = ||q_bar - z_bar'||^2 = 2 - 2 <q, z'> / (||q|| ||z'||) (eq. 2), symmetrised by *summing*
  the two view orders and averaged over the batch only (eq. 3 and the reference
  ``byol_experiment.py::loss_fn``), so a sample's loss lies in [0, 8].

The target is never wrapped by DDP and never receives gradients; its batch-norm layers run on
batch statistics (train mode) like the reference, and only its parameters are averaged.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import create_backbone
from .heads import MLPHead


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)`` (BYOL eq. 2), in float32.

    Normalisation follows the reference ``l2_normalize``: ``x * rsqrt(max(sum x^2, 1e-12))``.
    """
    p = F.normalize(p.float(), dim=-1, eps=1e-6)
    z = F.normalize(z.float(), dim=-1, eps=1e-6)
    return (p - z).pow(2).sum(dim=-1)


def byol_loss(q1: torch.Tensor, q2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
              reduction: str = "mean") -> torch.Tensor:
    """Symmetric BYOL loss: mean over the batch of ``L(q1, sg(z2)) + L(q2, sg(z1))`` (eq. 3).

    ``q_v`` are online predictions of view v, ``z_v`` target projections of view v. The two view
    terms are summed, not averaged (App. F.5: biases and BN parameters, which LARS does not adapt,
    are sensitive to a multiplicative loss factor). ``reduction="none"`` gives the per-image loss
    vector (what the training closure returns, see :mod:`ssl_suite.optim.protocol`).
    """
    per_image = regression_loss(q1, z2.detach()) + regression_loss(q2, z1.detach())
    if reduction == "none":
        return per_image
    if reduction != "mean":
        raise ValueError(f"byol_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    return per_image.mean()


def tau_schedule(step: int, total_steps: int, tau_base: float) -> float:
    """``tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` with k clamped to K (§3.3)."""
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """``xi <- tau xi + (1 - tau) theta`` for all tensors in one multi-tensor (foreach) call."""
    torch._foreach_lerp_(list(target), list(online), 1.0 - tau)


class OnlineNetwork(nn.Module):
    """Encoder -> projector -> predictor. ``forward(v1, v2)`` runs both views (one DDP forward).

    Each view is a separate pass so batch-norm statistics are per view, as in the reference.
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.projector, self.predictor = encoder, projector, predictor

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.encoder(x)))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor | None = None):
        if v2 is None:
            return self.predict(v1)
        return self.predict(v1), self.predict(v2)


class TargetNetwork(nn.Module):
    """Encoder -> projector with no gradients; kept in train mode (batch statistics)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))

    def ema_pairs(self, online: OnlineNetwork) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Matching (target, online) parameter lists for :func:`ema_update_`."""
        tgt = list(self.encoder.parameters()) + list(self.projector.parameters())
        src = list(online.encoder.parameters()) + list(online.projector.parameters())
        if len(tgt) != len(src) or any(a.shape != b.shape for a, b in zip(tgt, src)):
            raise RuntimeError("target and online networks have different parameter shapes")
        return tgt, src


def build_byol(cfg) -> tuple[OnlineNetwork, TargetNetwork]:
    """Online and target networks from a :class:`ssl_suite.config.ModelConfig`.

    ``cfg.weight_norm`` / ``cfg.mean_only_bn`` reparametrise both networks the same way
    (:mod:`ssl_suite.models.weight_norm`; the data-dependent init runs in the pretraining loop).
    ``cfg.target_init='independent'`` draws the target's initial weights from the RNG separately,
    as the reference code does (``_make_initial_state``); ``'copy'`` copies the online weights
    (solo-learn, lightly, byol-pytorch). The paper reports no significant difference.
    """
    def make_encoder() -> nn.Module:
        return create_backbone(cfg.backbone, cifar_stem=cfg.cifar_stem, pretrained=cfg.pretrained,
                               **cfg.backbone_kwargs)

    encoder = make_encoder()
    dim = encoder.num_features
    projector = MLPHead(dim, cfg.proj_hidden_dim, cfg.proj_dim)
    predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
    online = OnlineNetwork(encoder, projector, predictor)
    if cfg.target_init == "copy" or cfg.pretrained:
        target = TargetNetwork(copy.deepcopy(encoder), copy.deepcopy(projector))
    else:
        target = TargetNetwork(make_encoder(), MLPHead(dim, cfg.proj_hidden_dim, cfg.proj_dim))
    if getattr(cfg, "mean_only_bn", False) or getattr(cfg, "weight_norm", False):
        from .weight_norm import apply_weight_norm, mean_only_batchnorm
        for net in (online, target):   # the same parametrisation: EMA pairs match by position
            if cfg.mean_only_bn:
                mean_only_batchnorm(net)
            if cfg.weight_norm:
                apply_weight_norm(net)
    return online, target

