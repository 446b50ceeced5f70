"""Small supervised tasks for the optimizer comparison scripts (seconds to minutes on a CPU).

The data is scikit-learn's 8x8 digits (1797 images, shipped with the package, no download),
split 80/20 with a fixed seed and standardised with the training mean/std. Models are small enough
that a few hundred steps take seconds. Every loop follows :mod:`ssl_suite.optim.protocol`:
``attach`` once, ``step(closure)`` where the closure runs :func:`~ssl_suite.optim.protocol.backward`
on the mean loss and returns the per-sample loss vector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import protocol


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits(flat: bool = False, seed: int = 0, test_fraction: float = 0.2) -> Split:
    """Digits as float tensors: ``[N, 1, 8, 8]`` (or ``[N, 64]`` with ``flat``), standardised."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    if flat:
        x = x.flatten(1)
    return Split(x[train], y[train], x[test], y[test])


def small_cnn(width: int = 16, batch_norm: bool = True, num_classes: int = 10,
              in_channels: int = 1) -> nn.Sequential:
    """conv3x3(w)-[BN]-ReLU, conv3x3(2w, stride 2)-[BN]-ReLU, conv3x3(2w)-[BN]-ReLU, GAP, fc."""
    def block(cin, cout, stride):
        layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        return layers
    return nn.Sequential(*block(in_channels, width, 1), *block(width, 2 * width, 2),
                         *block(2 * width, 2 * width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, num_classes))


def small_mlp(in_dim: int = 64, hidden: int = 64, depth: int = 2, num_classes: int = 10,
              activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """``depth`` hidden Linear-activation layers, then a linear output layer."""
    layers, d = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), activation()]
        d = hidden
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


@dataclass
class Curves:
    """What :func:`train` records: one entry per evaluation point."""

    step: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    diverged: bool = False

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else float("nan")

    @property
    def final_loss(self) -> float:
        return self.train_loss[-1] if self.train_loss else float("nan")


def cross_entropy_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def batch_stream(data: Split, batch_size: int,
                 seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) training minibatches, drawn without replacement per epoch from a seeded
    generator (the last incomplete batch of an epoch is dropped)."""
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield data.x_train[idx], data.y_train[idx]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Split, steps: int,
          batch_size: int = 64, seed: int = 0, eval_every: int = 25,
          seconds: Optional[float] = None,
          loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_losses,
          scheduler=None, progress: bool = False) -> Curves:
    """Train ``model`` with ``optimizer`` for ``steps`` steps (or until ``seconds`` of training
    time, evaluation excluded); returns the curves. Batches are drawn without replacement per
    epoch from a seeded generator, so two optimizers see the same batches. A non-finite loss stops
    the run and marks it ``diverged``."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    order, pos = torch.randperm(n, generator=g), 0
    curves = Curves()
    handle = protocol.attach(optimizer, model)
    model.train()
    elapsed, running, count = 0.0, 0.0, 0
    bar = tqdm(total=steps, disable=not progress, leave=False, desc=type(optimizer).__name__)
    try:
        for step in range(1, steps + 1):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            x, y = data.x_train[idx], data.y_train[idx]

            def closure():
                optimizer.zero_grad(set_to_none=True)
                losses = loss_fn(model, x, y)
                protocol.backward(optimizer, losses.mean())
                return losses.detach()

            t0 = time.perf_counter()
            out = optimizer.step(closure)
            if scheduler is not None:
                scheduler.step()
            elapsed += time.perf_counter() - t0
            loss = protocol.as_scalar(out)
            bar.update(1)
            if loss is None or not torch.isfinite(torch.tensor(loss)):
                curves.diverged = True
                curves.step.append(step)
                curves.seconds.append(elapsed)
                curves.train_loss.append(float("nan"))
                curves.test_acc.append(accuracy(model, data.x_test, data.y_test))
                break
            running += loss
            count += 1
            last = step == steps or (seconds is not None and elapsed >= seconds)
            if step % eval_every == 0 or last:
                curves.step.append(step)
                curves.seconds.append(elapsed)
                curves.train_loss.append(running / count)
                curves.test_acc.append(accuracy(model, data.x_test, data.y_test))
                running, count = 0.0, 0
            if last:
                break
    finally:
        bar.close()
        handle.remove()
    return curves


def plot_curves(results: dict[str, Curves], out: str, title: str = "",
                x_axes: tuple[str, ...] = ("step", "seconds")) -> None:
    """Train loss and test accuracy of each run against step and/or wall-clock, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(x_axes), figsize=(5.5 * len(x_axes), 7), squeeze=False)
    for col, xname in enumerate(x_axes):
        for name, c in results.items():
            xs = getattr(c, xname)
            axes[0][col].plot(xs, c.train_loss, label=name)
            axes[1][col].plot(xs, c.test_acc, label=name)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("train loss (mean since last point)")
        axes[1][col].set_ylabel("test accuracy")
        for row in (0, 1):
            axes[row][col].set_xlabel("step" if xname == "step" else "training seconds")
            axes[row][col].grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
