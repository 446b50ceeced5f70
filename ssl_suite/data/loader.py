"""Deterministic, resumable batch plan shared by all processes.

For epoch ``e`` every process draws the same permutation of the dataset from a generator seeded
with ``(seed, e)``. Optimizer step ``s`` of the epoch consumes the global batch
``perm[s*B : (s+1)*B]`` (the last partial batch is dropped). That global batch is cut into
``accum`` micro-batches, and each micro-batch into ``world`` equal slices, one per process: the
global batch is split, never duplicated, and a run resumed at ``(epoch, step)`` sees exactly the
images an uninterrupted run would have seen.

In-memory datasets (one uint8 tensor) are indexed directly; others are decoded by DataLoader
workers fed with the same index lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from einops import rearrange
from torch.utils.data import DataLoader


@dataclass
class BatchPlan:
    """Which indices each process reads for each optimizer step."""

    num_samples: int
    global_batch: int
    seed: int
    accum: int = 1
    world: int = 1

    def __post_init__(self) -> None:
        if self.global_batch % (self.accum * self.world):
            raise ValueError(
                f"train.batch_size: {self.global_batch} is not divisible by grad_accum_steps x "
                f"processes = {self.accum} x {self.world}")
        if self.num_samples < self.global_batch:
            raise ValueError(f"train.batch_size: {self.global_batch} is larger than the dataset "
                             f"({self.num_samples} images)")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def micro_batch(self) -> int:
        """Images per process per micro-batch."""
        return self.global_batch // (self.accum * self.world)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def global_indices(self, epoch: int, step: int, perm: torch.Tensor | None = None) -> torch.Tensor:
        perm = self.permutation(epoch) if perm is None else perm
        return perm[step * self.global_batch:(step + 1) * self.global_batch]

    def local_indices(self, epoch: int, step: int, rank: int,
                      perm: torch.Tensor | None = None) -> list[torch.Tensor]:
        """This process's micro-batches for one optimizer step (a list of ``accum`` tensors)."""
        idx = rearrange(self.global_indices(epoch, step, perm), "(a w b) -> a w b",
                        a=self.accum, w=self.world)
        return list(idx[:, rank].unbind(0))


class _StepSampler:
    """Yields this rank's micro-batch index lists for steps ``start..end`` of one epoch."""

    def __init__(self, plan: BatchPlan, epoch: int, start: int, end: int, rank: int):
        self.plan, self.epoch, self.start, self.end, self.rank = plan, epoch, start, end, rank

    def __iter__(self):
        perm = self.plan.permutation(self.epoch)
        for s in range(self.start, self.end):
            for micro in self.plan.local_indices(self.epoch, s, self.rank, perm):
                yield micro.tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * self.plan.accum


def iterate_epoch(dataset, plan: BatchPlan, epoch: int, start_step: int, rank: int,
                  num_workers: int = 0, pin_memory: bool = False,
                  end_step: int | None = None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Yield, for each optimizer step from ``start_step``, this process's ``accum`` micro-batches
    as ``(images uint8 (b,3,H,W), labels int64 (b,))`` pairs."""
    end = plan.steps_per_epoch if end_step is None else min(end_step, plan.steps_per_epoch)
    if getattr(dataset, "in_memory", False):
        perm = plan.permutation(epoch)
        labels = dataset.labels
        for s in range(start_step, end):
            out = []
            for idx in plan.local_indices(epoch, s, rank, perm):
                lab = labels[idx] if labels is not None else torch.full((len(idx),), -1)
                out.append((dataset.images[idx], lab))
            yield out
        return
    loader = DataLoader(dataset, batch_sampler=_StepSampler(plan, epoch, start_step, end, rank),
                        num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=False)
    it = iter(loader)
    for _ in range(start_step, end):
        out = []
        for _ in range(plan.accum):
            images, labels = next(it)
            out.append((images, torch.as_tensor(labels)))
        yield out


def extra_batch(dataset, plan: BatchPlan, step: int, call: int,
                rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's micro-batches of a *fresh* global batch for the ``call``-th closure call
    (``call >= 1``) of optimizer step ``step``: for optimizers whose inner loop needs a new batch
    on every closure call (Entropy-SGD's SGLD steps, each replica of Replicated SGD).

    The global batch is ``B`` indices drawn uniformly (with replacement: no O(N) permutation per
    call) from a generator seeded with ``(seed, step, call)``, the same on every process, then cut
    into micro-batches and process slices exactly like a planned batch, so a resumed run draws
    the same extra batches and the processes never duplicate work."""
    g = torch.Generator().manual_seed((plan.seed * 1_000_003 + step) * 1_009 + call)
    idx = torch.randint(plan.num_samples, (plan.global_batch,), generator=g)
    idx = rearrange(idx, "(a w b) -> a w b", a=plan.accum, w=plan.world)[:, rank]
    return [take(dataset, micro) for micro in idx.unbind(0)]


def take(dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (n,3,H,W), labels (n,))`` at the indices ``idx`` of a dataset."""
    if getattr(dataset, "in_memory", False):
        labels = dataset.labels
        lab = labels[idx] if labels is not None else torch.full((len(idx),), -1)
        return dataset.images[idx], lab
    items = [dataset[int(i)] for i in idx]
    return torch.stack([im for im, _ in items]), torch.as_tensor([lab for _, lab in items])


def iterate_eval(dataset, batch_size: int, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential batches over a labelled dataset (for kNN and evaluation)."""
    n = len(dataset)
    if getattr(dataset, "in_memory", False):
        for i in range(0, n, batch_size):
            lab = dataset.labels[i:i + batch_size] if dataset.labels is not None else \
                torch.full((min(batch_size, n - i),), -1)
            yield dataset.images[i:i + batch_size], lab
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, labels in loader:
        yield images, torch.as_tensor(labels)
