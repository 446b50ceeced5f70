"""Reading a pretraining run back: its config, its latest checkpoint, its encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import Config, load_config
from ..errors import CheckpointError
from ..models import build_byol
from . import checkpoint as ckpt


def run_config(run_dir: str | Path, overrides: Optional[list[str]] = None,
               flag: str = "--run") -> Config:
    """The resolved config a run saved in ``RUN_DIR/config.yaml``, with optional overrides
    (e.g. ``train.epochs`` to extend a run); ``flag`` names the option in the error."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{flag}: {run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(path, overrides)
    cfg.run_dir = str(run_dir)
    return cfg


def encoder_state(run_dir: str | Path, network: str = "online") -> tuple[dict[str, torch.Tensor], Path]:
    """Encoder weights (``encoder.`` prefix removed) of the run's latest checkpoint."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(f"--run: {run_dir} has no complete checkpoint")
    if network not in ("online", "target"):
        raise ValueError(f"network must be 'online' or 'target', got {network!r}")
    state = ckpt.load_checkpoint(latest)[network]
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return enc, latest


def load_encoder(run_dir: str | Path, random_init: bool = False,
                 network: str = "online") -> tuple[nn.Module, Config]:
    """The run's trained encoder, or (``random_init``) the same encoder at its initialisation.

    The random initialisation is the online encoder the run started from: the same seed and the
    same construction order as :func:`ssl_suite.engine.pretrain.pretrain` (before weight
    normalization's data-dependent init, which uses a batch, and before GradInit). Weight
    normalization, mean-only BN and SCL masks are folded into plain layers, so the encoder is a
    plain timm model (``encoder.scl_sparsity``: SCL's sparsity per layer); a GradMax run's
    encoder has the widths its checkpoint reached (full width once every growth happened).
    """
    cfg = run_config(run_dir)
    torch.manual_seed(cfg.seed)
    online, _ = build_byol(cfg.model)
    encoder = online.encoder
    growth = sparsity = None
    if cfg.growth.enabled:   # GradMax: built thin as the run began, then the checkpoint's widths
        from .phases import Growth
        growth = Growth.build(cfg.growth, online, 1)
    if cfg.sparsity.enabled:   # SCL: the masks are in the checkpoint; folded below
        from .phases import Sparsity
        sparsity = Sparsity(cfg.sparsity, online)
    if not random_init:
        state, latest = encoder_state(run_dir, network)
        if growth is not None:
            growth.fit_to_state(online, {f"encoder.{k}": v for k, v in state.items()})
        ckpt.load_module_state(encoder, state, f"{latest}/{network}.safetensors (encoder)")
    if sparsity is not None:
        # w = w_hat * step(m_hat) written into plain weights; the per-layer sparsity is kept
        from ..models.scl import fold_scl
        encoder.scl_sparsity = fold_scl(encoder)
    if cfg.model.weight_norm or cfg.model.mean_only_bn:
        # plain timm modules for evaluation and export: w = g v/||v|| folded into the weight,
        # mean-only BN as the BatchNorm that computes the same function in eval mode
        from ..models.weight_norm import fold_weight_norm, to_batchnorm
        to_batchnorm(fold_weight_norm(encoder))
    return encoder, cfg
