"""Optimizer library part 2 in the engines: NSGD, KOALA-V/M, MBF and SVI by name from the
pretraining, linear-evaluation and fine-tuning configs, through timm's registry."""

import pytest
import torch
from timm.optim import create_optimizer_v2, list_optimizers
from torch import nn

from ssl_suite.engine.eval_common import eval_config, topk_correct, train_classifier
from ssl_suite.engine.finetune import finetune
from ssl_suite.engine.linear_eval import _feature_batches, linear_eval
from ssl_suite.engine.pretrain import pretrain
from ssl_suite.engine.runs import load_encoder
from ssl_suite.optim import KOALAM, KOALAV, MBF, NSGD, SVI

from helpers import killed_after_first_checkpoint, tiny_config

PART2 = {"nsgd": NSGD, "koalav": KOALAV, "koalam": KOALAM, "mbf": MBF, "svi": SVI}


def test_part2_names_are_in_timms_registry():
    names = set(list_optimizers())
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for name, cls in PART2.items():
        assert name in names
        assert type(create_optimizer_v2(net, name, lr=0.01)) is cls


@pytest.mark.parametrize("name", ["nsgd", "koalav", "koalam", "mbf", "svi_sgd"])
def test_pretraining_runs_with_each_part2_optimizer(tmp_path, name):
    """A 3-step BYOL run per optimizer: finite loss, weights moved, and no hook left on the model."""
    run = tmp_path / "run"
    res = pretrain(tiny_config(run, **{"train.max_steps": 3, "optim.name": name,
                                       "optim.base_lr": 0.05}))
    assert torch.isfinite(torch.tensor(res.final_loss))
    trained, _ = load_encoder(run)
    init, _ = load_encoder(run, random_init=True)
    assert not torch.equal(trained.conv1.weight, init.conv1.weight)
    online = res.online
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   for m in online.modules()), name


@pytest.mark.parametrize("name,lr", [("nsgd", 0.5), ("koalav", 1.0), ("koalam", 1.0),
                                     ("mbf", 0.05), ("svi", 0.5)])
def test_linear_head_trains_with_each_part2_optimizer(name, lr):
    """The evaluation loop (attach + closure with per-sample losses) drives every optimizer to
    separate four Gaussian clusters."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    labels = torch.arange(4).repeat_interleave(100)
    feats = centres[labels] + 0.5 * torch.randn(400, 16, generator=g)
    torch.manual_seed(0)
    head = nn.Linear(16, 4)
    train_classifier(head, _feature_batches(feats, labels, 64, 0), 400 // 64, 10, lr, 0.9, True,
                     0.0, optimizer=name)
    top1, = topk_correct(head(feats), labels, ks=(1,))
    assert top1 / 400 >= 0.95, (name, top1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("part2") / "run"
    pretrain(tiny_config(run, **{"train.max_steps": 2}))
    return run


def _cfg(run_dir, *extra):
    return eval_config(str(run_dir), None, ["progress=false", "linear.epochs=2",
                                            "linear.batch_size=128", "finetune.epochs=1",
                                            "finetune.batch_size=32", *extra])


@pytest.mark.parametrize("name", ["koalam", "mbf"])
def test_linear_eval_config_names_the_optimizer(run_dir, name):
    cfg, run_cfg = _cfg(run_dir, f"linear.optimizer={name}", "linear.lrs=[0.05]")
    assert cfg.linear.optimizer == name
    res = linear_eval(str(run_dir), cfg, run_cfg)
    assert 0.0 < res["top1"] <= res["top5"] <= 1.0


@pytest.mark.parametrize("name", ["nsgd", "svi_momentum", "koalav", "mbf"])
def test_finetune_config_names_the_optimizer(run_dir, name):
    cfg, run_cfg = _cfg(run_dir, f"finetune.optimizer={name}", "finetune.lrs=[0.02]",
                        "data.label_fraction=0.1")
    assert cfg.finetune.optimizer == name
    res = finetune(str(run_dir), cfg, run_cfg)
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0


def test_unknown_eval_optimizer_is_a_one_line_error(run_dir):
    from ssl_suite.optim import OptimizerError
    cfg, run_cfg = _cfg(run_dir, "linear.optimizer=nosuchopt", "linear.lrs=[0.05]")
    with pytest.raises(OptimizerError, match="nosuchopt"):
        linear_eval(str(run_dir), cfg, run_cfg)


def test_koalam_on_its_c_kernels_resumes_bit_for_bit(tmp_path, monkeypatch):
    """KOALA-M with its predict buffer (the weights' storage swapped every step) in BYOL: a run
    killed right after its checkpoint at step 3 and resumed (no buffer in the checkpoint: x + v
    recomputed) ends with the online and target weights of the run that was not interrupted."""
    from safetensors.torch import load_file

    from ssl_suite.engine import checkpoint as ckpt
    from ssl_suite.engine import pretrain as pretrain_mod
    from ssl_suite.optim import koala
    if koala._native_kernels() is None:
        pytest.skip(f"KOALA C kernels unavailable: {koala._NATIVE.get('error')}")
    extra = {"train.max_steps": 6, "optim.name": "koalam", "optim.base_lr": 0.05,
             "optim.kwargs": {"native": True}}
    swaps, real = [], koala.KOALA._move_ahead

    def counting(self, params):
        before = [p.data_ptr() for p in params]
        real(self, params)
        swaps.append(before != [p.data_ptr() for p in params])
    monkeypatch.setattr(koala.KOALA, "_move_ahead", counting)
    pretrain(tiny_config(tmp_path / "full", **extra))
    assert swaps == [True] * 5                      # steps 2-6 swapped the buffer in
    with killed_after_first_checkpoint(monkeypatch):
        pretrain(tiny_config(tmp_path / "killed", **extra, **{"train.checkpoint_every": 3}))
    res = pretrain(pretrain_mod.resume_config(str(tmp_path / "killed")),
                   resume_dir=str(tmp_path / "killed"))
    assert res.step == 6
    for name in ("online.safetensors", "target.safetensors"):
        a = load_file(str(ckpt.latest_checkpoint(tmp_path / "full") / name))
        b = load_file(str(ckpt.latest_checkpoint(tmp_path / "killed") / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
