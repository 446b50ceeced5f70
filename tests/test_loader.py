"""The batch plan: deterministic, split across processes and micro-batches, resumable."""

import pytest
import torch

from ssl_suite.data.loader import BatchPlan, iterate_epoch


class _Mem:
    in_memory = True

    def __init__(self, n):
        self.images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
        self.labels = torch.arange(n)

    def __len__(self):
        return len(self.labels)


def test_plan_splits_global_batch_without_duplicates():
    plan = BatchPlan(num_samples=100, global_batch=24, seed=3, accum=2, world=3)
    assert plan.steps_per_epoch == 4 and plan.micro_batch == 4
    for step in range(plan.steps_per_epoch):
        g = plan.global_indices(1, step)
        parts = [torch.cat(plan.local_indices(1, step, r)) for r in range(3)]
        assert all(len(p) == 8 for p in parts)
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.sort(g).values)
    # an epoch visits distinct images; epochs differ; seeds are reproducible
    seen = torch.cat([plan.global_indices(1, s) for s in range(4)])
    assert len(set(seen.tolist())) == 96
    assert not torch.equal(plan.permutation(0), plan.permutation(1))
    assert torch.equal(plan.permutation(5), BatchPlan(100, 24, 3, 2, 3).permutation(5))


def test_plan_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="train.batch_size"):
        BatchPlan(100, 10, 0, accum=3, world=1)
    with pytest.raises(ValueError, match="larger than the dataset"):
        BatchPlan(10, 16, 0)


def test_iterate_epoch_resumes_mid_epoch_with_same_batches():
    ds = _Mem(50)
    plan = BatchPlan(50, 8, seed=0, accum=2, world=1)
    full = [[lab for _, lab in step] for step in iterate_epoch(ds, plan, 2, 0, 0)]
    tail = [[lab for _, lab in step] for step in iterate_epoch(ds, plan, 2, 3, 0)]
    assert len(full) == 6 and len(tail) == 3
    for a, b in zip(full[3:], tail):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    images, labels = next(iterate_epoch(ds, plan, 2, 0, 0))[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 2, 2)
    assert torch.equal(images[:, 0, 0, 0].long(), labels)
