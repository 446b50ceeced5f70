"""Entropy-SGD and Replicated SGD in the BYOL loop: by name from the config, every closure call
on a fresh augmented batch, BatchNorm statistics recomputed for the final model."""

import pytest
import torch

import ssl_suite.optim.replica_sgd as rsgd_mod
from ssl_suite.engine.pretrain import pretrain
from ssl_suite.optim import EntropySGD, ReplicaSGD, create_optimizer
from ssl_suite.config import OptimConfig

from helpers import tiny_config


def test_names_build_the_classes():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    for name, cls in (("entropysgd", EntropySGD), ("replicasgd", ReplicaSGD)):
        assert type(create_optimizer({"m": net}, OptimConfig(name=name), 256)) is cls


@pytest.mark.parametrize("name,kwargs,calls", [("entropysgd", "{L: 3}", 3),
                                               ("replicasgd", "{replicas: 2}", 2),
                                               ("momentum", "{}", 1)])
def test_pretraining_closure_calls_and_bn_recompute(tmp_path, monkeypatch, name, kwargs, calls):
    spied = []
    real = rsgd_mod.recompute_bn_stats

    def spy(model, batches, forward=None):
        n = real(model, batches, forward)
        spied.append((n, {k: v.clone() for k, v in model.state_dict().items() if "running" in k}))
        return n
    monkeypatch.setattr(rsgd_mod, "recompute_bn_stats", spy)
    import ssl_suite.engine.pretrain as pre
    seen = []
    real_byol_loss = pre.byol_loss

    def counting_loss(*a, **k):
        seen.append(1)
        return real_byol_loss(*a, **k)
    monkeypatch.setattr(pre, "byol_loss", counting_loss)
    res = pretrain(tiny_config(tmp_path / "run", **{
        "train.max_steps": 2, "optim.name": name, "optim.base_lr": 0.05, "optim.kwargs": kwargs,
        "train.bn_recompute_batches": 3}))
    assert torch.isfinite(torch.tensor(res.final_loss))
    assert len(seen) == 2 * calls                          # closure calls per step x steps
    if name == "momentum":
        assert not spied
        return
    (n, stats), = spied
    assert n == 3                                          # bn_recompute_batches, accum 1
    saved = res.online.state_dict()
    for k, v in stats.items():                             # the recomputed statistics are kept
        assert torch.equal(saved[k], v), k


def test_lanczos_schedule_sets_lr_and_momentum_from_the_spectrum(tmp_path):
    """schedule.name=lanczos: after the warm start every group's LR and momentum are Polyak's
    heavy-ball values 4/(sqrt L + sqrt mu)^2 and ((sqrt L - sqrt mu)/(sqrt L + sqrt mu))^2 of the
    logged estimate, re-estimated every `every` steps; the LR is the base LR before."""
    import json
    import math
    pretrain(tiny_config(tmp_path / "run", **{
        "train.max_steps": 4, "optim.name": "momentum", "optim.base_lr": 0.05,
        "optim.lr_scaling": "none", "schedule.name": "lanczos", "schedule.warmup_epochs": 0.0,
        "schedule.lanczos_every_epochs": 0.05, "schedule.lanczos_steps": 5,
        "schedule.lanczos_images": 16}))
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in x]
    assert len(lrs) == 4 and all(math.isfinite(v) and v > 0 for v in lrs)
    assert lrs[0] != 0.05                                  # learned at step 0 (no warm start)
    from ssl_suite.engine import checkpoint as ckpt
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))["state"]
    hist = state["scheduler"]["history"]
    assert [h[0] for h in hist] == [0, 2, 4][:len(hist)] and len(hist) >= 2   # every 2 steps
    t, lr, mom, lam, mu = hist[-1]
    assert lr == pytest.approx(4 / (math.sqrt(lam) + math.sqrt(mu)) ** 2)
    assert mom == pytest.approx(((math.sqrt(lam) - math.sqrt(mu)) / (math.sqrt(lam) + math.sqrt(mu))) ** 2)
    assert state["optimizer"]["param_groups"][0]["momentum"] == pytest.approx(mom)
    assert lrs[-1] == pytest.approx(lr)
