"""Shared tiny configurations for the engine tests."""

from contextlib import contextmanager

import pytest

from ssl_suite.config import build_config


def tiny_overrides(run_dir, **extra):
    """A BYOL run that takes seconds on a CPU: a narrow ResNet-18 (8-64 channels, CIFAR
    stem) on 16x16 digits."""
    base = {
        "run_dir": str(run_dir),
        "data.name": "digits", "data.image_size": 16,
        "augment.image_size": 16,
        "model.backbone": "resnet18", "model.cifar_stem": True,
        "model.backbone_kwargs": "{channels: [8, 16, 32, 64], stem_width: 8}",
        "model.proj_hidden_dim": 64, "model.proj_dim": 32, "model.pred_hidden_dim": 64,
        "optim.base_lr": 0.2, "optim.weight_decay": 1e-5,
        "schedule.warmup_epochs": 0.1,
        "train.epochs": 1, "train.max_steps": 4, "train.batch_size": 32,
        "train.log_every": 1, "train.checkpoint_every": 1000, "train.knn_every": 0,
        "train.knn_k": 20, "train.progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(run_dir, **extra):
    return build_config({}, tiny_overrides(run_dir, **extra))


class Killed(Exception):
    """Stands for a kill of the process right after a checkpoint was written."""


@contextmanager
def killed_after_first_checkpoint(monkeypatch):
    """Inside the block, the first checkpoint a run finishes writing ends the run (``Killed``),
    as a kill would right after the rename; the block expects that to happen."""
    from ssl_suite.engine import checkpoint as ckpt
    real_finish = ckpt.finish_save

    def finish_then_die(tmp, keep):
        real_finish(tmp, keep)
        raise Killed()
    monkeypatch.setattr(ckpt, "finish_save", finish_then_die)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.setattr(ckpt, "finish_save", real_finish)
