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


def test_extra_batch_is_fresh_deterministic_and_split_over_processes():
    from ssl_suite.data.loader import extra_batch

    class Data:
        in_memory = True
        images = torch.arange(100).view(100, 1, 1, 1).expand(100, 3, 2, 2).to(torch.uint8)
        labels = torch.arange(100) % 10

    plan = [BatchPlan(100, 16, seed=3, accum=2, world=2)] * 2
    a = [extra_batch(Data, plan[r], step=5, call=1, rank=r) for r in range(2)]
    again = extra_batch(Data, plan[0], step=5, call=1, rank=0)
    other = extra_batch(Data, plan[0], step=5, call=2, rank=0)
    assert len(a[0]) == 2 and all(im.shape == (4, 3, 2, 2) for im, _ in a[0])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a[0], again))        # resumable
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a[0], other))    # a new batch per call
    ids = [im[:, 0, 0, 0].long() for r in range(2) for im, _ in a[r]]
    for im, lab in a[0] + a[1]:                                              # labels follow images
        assert torch.equal(lab, im[:, 0, 0, 0].long() % 10)
    # the two processes' slices of one micro-batch are the two halves of the same global draw
    g = torch.Generator().manual_seed((3 * 1_000_003 + 5) * 1_009 + 1)
    drawn = torch.randint(100, (16,), generator=g).view(2, 2, 4)
    assert torch.equal(torch.stack(ids[:2]), drawn[:, 0]) and torch.equal(torch.stack(ids[2:]), drawn[:, 1])
