"""Evaluation heads: linear evaluation, semi-supervised fine-tuning, kNN job, results.csv."""

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_suite.cli import main
from ssl_suite.config import EvalConfig
from ssl_suite.engine.eval_common import eval_config, topk_correct, train_classifier
from ssl_suite.engine.finetune import finetune, labelled_subset
from ssl_suite.engine.linear_eval import _feature_batches, linear_eval
from ssl_suite.engine.pretrain import pretrain
from ssl_suite.engine.runs import load_encoder

from helpers import tiny_config

EVAL_CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                      if p.name.startswith(("linear_", "semisup_", "eval_")))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    pretrain(tiny_config(run, **{"train.max_steps": 3}))
    return run


def test_linear_classifier_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    labels = torch.arange(4).repeat_interleave(100)
    feats = centres[labels] + 0.5 * torch.randn(400, 16, generator=g)
    head = nn.Linear(16, 4)
    train_classifier(head, _feature_batches(feats, labels, 64, 0), 400 // 64, 20, 0.1, 0.9, True, 0.0)
    top1, top5 = topk_correct(head(feats), labels, ks=(1, 5))
    assert top1 / 400 >= 0.99 and top5 == 400


def test_topk_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.5], [0.2, 0.3, 0.1]])
    assert topk_correct(logits, torch.tensor([1, 2, 2]), ks=(1, 2)) == [1, 2]


def test_labelled_subset_is_balanced_and_deterministic():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500)]
    a = labelled_subset(labels, 0.1, seed=3)
    assert len(a) == 50 and torch.bincount(labels[a], minlength=10).tolist() == [5] * 10
    assert torch.equal(a, labelled_subset(labels, 0.1, seed=3))
    assert not torch.equal(a, labelled_subset(labels, 0.1, seed=4))
    one_pct = labelled_subset(labels, 0.01, seed=0)         # 5 images < 10 classes: one per class
    assert torch.bincount(labels[one_pct], minlength=10).tolist() == [1] * 10


def _cfg(run_dir, *extra):
    return eval_config(str(run_dir), None, ["progress=false", "linear.epochs=3",
                                            "linear.batch_size=128", "linear.lrs=[0.1, 0.05]",
                                            "finetune.epochs=2", "finetune.batch_size=32",
                                            "finetune.lrs=[0.05]", "knn.k=20", *extra])


@pytest.mark.parametrize("mode", ["cached", "augmented"])
def test_linear_eval_keeps_encoder_frozen(run_dir, mode, monkeypatch):
    """Encoder weights and BN running statistics are unchanged by linear evaluation."""
    import ssl_suite.engine.linear_eval as le
    seen = {}
    real = le.load_encoder

    def spy(*a, **k):
        enc, cfg = real(*a, **k)
        seen["enc"], seen["before"] = enc, {n: t.clone() for n, t in enc.state_dict().items()}
        return enc, cfg
    monkeypatch.setattr(le, "load_encoder", spy)
    cfg, run_cfg = _cfg(run_dir, f"linear.mode={mode}")
    res = linear_eval(str(run_dir), cfg, run_cfg)
    assert 0.0 < res["top1"] <= 1.0 and res["top1"] <= res["top5"] and res["lr"] in (0.1, 0.05)
    after = seen["enc"].state_dict()
    assert any("running_mean" in n for n in after)
    for n, t in seen["before"].items():
        assert torch.equal(t, after[n]), n
    assert not any(p.requires_grad for p in seen["enc"].parameters())


def test_finetune_and_knn_write_results(run_dir, capsys):
    cfg, run_cfg = _cfg(run_dir, "data.label_fraction=0.1")
    res = finetune(str(run_dir), cfg, run_cfg)
    # 1437 train images, 144 held out for the LR choice, 10% of the remaining 1293 labelled
    assert res["labelled"] == 129
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0
    assert main(["knn", "--run", str(run_dir), "progress=false", "knn.k=20"]) == 0
    out = capsys.readouterr().out
    assert "knn on the digits test split: top-1" in out
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert {r["job"] for r in rows} >= {"finetune", "knn"}
    assert set(rows[0]) == {"job", "dataset", "backbone", "epochs", "protocol", "metric", "value", "run_dir"}
    knn_row = next(r for r in rows if r["job"] == "knn")
    assert knn_row["dataset"] == "digits" and knn_row["backbone"] == "resnet18_cifar"


def test_random_init_is_the_encoder_the_run_started_from(run_dir):
    """kNN of --random-init equals the step-0 kNN the pretraining run logged."""
    import json
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    cfg, run_cfg = _cfg(run_dir)
    from ssl_suite.engine.knn import knn_job
    res = knn_job(str(run_dir), cfg, run_cfg, random_init=True)
    assert res["top1"] == pytest.approx(first["knn_top1"], abs=1e-6)
    trained, _ = load_encoder(run_dir)
    init, _ = load_encoder(run_dir, random_init=True)
    assert not torch.equal(trained.conv1.weight, init.conv1.weight)


def test_eval_config_bad_key_is_one_line(run_dir, capsys):
    assert main(["linear-eval", "--run", str(run_dir), "linear.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "linear.lr: unknown key" in err and len(err.splitlines()) == 1
    assert main(["knn", "--run", str(run_dir / "nope")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=[p.name for p in EVAL_CONFIGS])
def test_shipped_eval_configs_load(path, run_dir):
    cfg, _ = eval_config(str(run_dir), str(path), ["data.root=/data"])
    assert isinstance(cfg, EvalConfig) and cfg.linear.lrs and cfg.finetune.lrs
