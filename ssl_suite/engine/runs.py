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


def shape_as_trained(cfg: Config, online: nn.Module, target: Optional[nn.Module] = None,
                     online_state: Optional[dict] = None, target_state: Optional[dict] = None):
    """Give freshly built networks the structure the run trained: GradMax pairs at the widths
    of the given state dicts (built thin, then padded), SCL masks. Returns the SCL handle or
    None."""
    from .phases import Growth, Sparsity
    twins = [target] if target is not None else []
    if cfg.growth.enabled:
        growth = Growth.build(cfg.growth, online, 1, twins=twins)
        for net, state in ((online, online_state), (target, target_state)):
            if net is not None and state is not None:
                growth.fit_to_state(net, state)
    return Sparsity(cfg.sparsity, online, twins=twins) if cfg.sparsity.enabled else None


def load_networks(run_dir: str | Path):
    """``(cfg, online, target, state, checkpoint)``: the run's online and target networks as
    they are in its latest checkpoint (on the CPU), for analyses of a trained run."""
    from dataclasses import replace
    cfg = run_config(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(f"--run: {run_dir} has no complete checkpoint")
    loaded = ckpt.load_checkpoint(latest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        online, target = build_byol(replace(cfg.model, pretrained=False))
    shape_as_trained(cfg, online, target, loaded["online"], loaded["target"])
    ckpt.load_module_state(online, loaded["online"], f"{latest}/online.safetensors")
    ckpt.load_module_state(target, loaded["target"], f"{latest}/target.safetensors")
    return cfg, online, target, loaded["state"], latest


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
    # GradMax: built thin as the run began, then the checkpoint's widths; SCL: the masks (the
    # checkpoint holds them; they are folded below)
    state = latest = None
    if not random_init:
        state, latest = encoder_state(run_dir, network)
    sparsity = shape_as_trained(cfg, online, online_state=None if state is None else
                                {f"encoder.{k}": v for k, v in state.items()})
    if state is not None:
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
