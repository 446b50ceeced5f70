"""What the evaluation jobs share: their config, the labelled splits, classifier training with
SGD-Nesterov + cosine (or any optimizer of the library), top-k accuracy, and the ``results.csv``
table of a run."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import ViewAugment, eval_transform
from ..config import (Config, ConfigError, EvalConfig, ViewConfig, build_config, read_yaml,
                      to_dict)
from ..data import build_data, holdout_indices
from .runs import run_config

log = logging.getLogger("ssl_suite")

RESULT_COLUMNS = ["job", "dataset", "backbone", "epochs", "protocol", "metric", "value", "run_dir"]


def eval_config(run_dir: str, path: Optional[str], overrides: Optional[list[str]]) -> tuple[EvalConfig, Config]:
    """(:func:`eval_config_for` the run saved in ``run_dir``, that run's config)."""
    run_cfg = run_config(run_dir)
    return eval_config_for(run_cfg, path, overrides), run_cfg


def eval_config_for(run_cfg: Config, path: Optional[str],
                    overrides: Optional[list[str]]) -> EvalConfig:
    """The evaluation config of a run: its ``data`` section and seed, then the YAML file's keys
    (its ``data`` keys update the run's), then ``key=value`` overrides."""
    raw: dict = {"data": to_dict(run_cfg.data), "seed": run_cfg.seed}
    if path is not None:
        loaded = read_yaml(path)
        for key, value in loaded.items():
            if key == "data" and isinstance(value, dict):
                raw["data"] = {**raw["data"], **value}
            else:
                raw[key] = value
    return build_config(raw, overrides, cls=EvalConfig)


@dataclass
class EvalData:
    """Labelled splits at the run's resolution: fit/val for LR selection, train, test."""

    train: object
    test: object
    fit: object
    val: object
    num_classes: int
    transform: Callable[[torch.Tensor], torch.Tensor]
    mean: tuple
    std: tuple
    image_size: int


def eval_data(cfg: EvalConfig, run_cfg: Config, val_fraction: float, progress: bool) -> EvalData:
    data = build_data(cfg.data, show_progress=progress)
    if data.knn_train is None or data.knn_test is None or data.num_classes < 2:
        raise ConfigError(f"data.name: {cfg.data.name} has no labelled train/test split to "
                          "evaluate on")
    train, test = data.knn_train, data.knn_test
    fit_idx, val_idx = holdout_indices(train.labels, val_fraction, seed=cfg.seed)
    mean = run_cfg.augment.mean or data.mean
    std = run_cfg.augment.std or data.std
    size = run_cfg.augment.image_size
    tf = partial(eval_transform, image_size=size, mean=mean, std=std)
    return EvalData(train, test, train.subset(fit_idx), train.subset(val_idx), data.num_classes,
                    tf, mean, std, size)


def crop_flip_view(crop_scale: tuple[float, float], image_size: int) -> ViewAugment:
    """Random resized crop + horizontal flip only: the training augmentation of the protocols."""
    view = ViewConfig(crop_scale=crop_scale, flip_prob=0.5, jitter_prob=0.0, grayscale_prob=0.0,
                      blur_prob=0.0, solarize_prob=0.0)
    return ViewAugment(view, image_size)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :k].any(1).sum()) for k in ks]


def cosine_sgd(params, lr: float, momentum: float, nesterov: bool, weight_decay: float,
               total_steps: int):
    """SGD (Nesterov momentum, as the paper) with a per-step cosine decay to 0."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                          weight_decay=weight_decay)
    return opt, _cosine(opt, total_steps)


def _cosine(opt, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total_steps) / max(total_steps, 1))))


def eval_optimizer(model: nn.Module, name: str, lr: float, momentum: float, nesterov: bool,
                   weight_decay: float, total_steps: int, kwargs: Optional[dict] = None,
                   batch_size: int = 256, extra_groups: Optional[list[dict]] = None):
    """(optimizer, cosine scheduler) for an evaluation head.

    ``name="sgd"`` is the paper's protocol (:func:`cosine_sgd`). Any other name goes through the
    optimizer factory (timm's registry plus ours, ``lookahead_``/``svi_`` prefixes), with ``lr`` as
    the absolute learning rate (no batch scaling), biases and norm parameters excluded from weight
    decay, and ``total_steps`` passed to optimizers that take it (SVI's warm start).
    ``extra_groups`` (SCL's mask variables) keep their own LR and no weight decay."""
    extra_groups = extra_groups or []
    if name == "sgd" and not kwargs:
        own = {id(p) for g in extra_groups for p in g["params"]}
        groups = [{"params": [p for p in model.parameters() if id(p) not in own]}]
        groups += [{k: v for k, v in g.items() if k != "lars_adapt"} for g in extra_groups]
        return cosine_sgd(groups, lr, momentum, nesterov, weight_decay, total_steps)
    from ..config import OptimConfig
    from ..optim import create_optimizer
    cfg = OptimConfig(name=name, base_lr=lr, lr_scaling="none", weight_decay=weight_decay,
                      momentum=momentum, kwargs=dict(kwargs or {}))
    opt = create_optimizer({"model": model}, cfg, batch_size, total_steps=total_steps,
                           extra_groups=extra_groups)
    return opt, _cosine(opt, total_steps)


def train_classifier(head: nn.Module, batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]],
                     steps_per_epoch: int, epochs: int, lr: float, momentum: float, nesterov: bool,
                     weight_decay: float, params=None, progress=None, optimizer: str = "sgd",
                     optimizer_kwargs: Optional[dict] = None) -> nn.Module:
    """Cross-entropy training; ``batches(epoch)`` yields (inputs, labels) for one epoch.

    Follows :mod:`ssl_suite.optim.protocol` (attach, ``step(closure)`` with per-sample losses), so
    every optimizer of the library can train the head."""
    from ..optim import protocol
    if params is not None:
        opt, sched = cosine_sgd(params, lr, momentum, nesterov, weight_decay,
                                steps_per_epoch * epochs)
    else:
        opt, sched = eval_optimizer(head, optimizer, lr, momentum, nesterov, weight_decay,
                                    steps_per_epoch * epochs, optimizer_kwargs)
    with protocol.attach(opt, head):
        for epoch in range(epochs):
            for x, y in batches(epoch):
                def closure():
                    opt.zero_grad(set_to_none=True)
                    losses = F.cross_entropy(head(x).float(), y, reduction="none")
                    protocol.backward(opt, losses.mean())
                    return losses.detach()
                opt.step(closure)
                sched.step()
            if progress is not None:
                progress.update(1)
    return head


def append_results(run_dir: str | Path, rows: list[dict]) -> Path:
    """Append rows (``RESULT_COLUMNS``) to ``RUN_DIR/results.csv``, writing the header once."""
    path = Path(run_dir) / "results.csv"
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in RESULT_COLUMNS})
    return path


def result_rows(job: str, run_cfg: Config, cfg: EvalConfig, protocol: str,
                metrics: dict[str, float], run_dir: str) -> list[dict]:
    backbone = run_cfg.model.backbone + ("_cifar" if run_cfg.model.cifar_stem else "")
    return [{"job": job, "dataset": cfg.data.name, "backbone": backbone,
             "epochs": run_cfg.train.epochs, "protocol": protocol, "metric": k,
             "value": f"{v:.6f}", "run_dir": str(run_dir)} for k, v in metrics.items()]
