"""End-to-end pretraining on the digits data: a short run, kill-and-resume, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

import ssl_suite.engine.pretrain as pretrain_mod
from ssl_suite.cli import main
from ssl_suite.engine import checkpoint as ckpt
from ssl_suite.engine.pretrain import pretrain

from helpers import killed_after_first_checkpoint, tiny_config, tiny_overrides


def _states(run_dir):
    last = ckpt.latest_checkpoint(run_dir)
    return (load_file(str(last / "online.safetensors")), load_file(str(last / "target.safetensors")),
            torch.load(last / "state.pt", weights_only=True))


def test_short_run_writes_metrics_checkpoint_and_knn(tmp_path):
    res = pretrain(tiny_config(tmp_path / "run", **{"train.max_steps": 3}))
    assert res.step == 3 and res.final_loss is not None and 0.0 <= res.final_loss <= 8.0
    assert 0.0 < res.knn_init <= 1.0 and 0.0 < res.knn_final <= 1.0
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    assert {"lr", "tau", "images_per_s"} <= set(recs[1])
    assert recs[0] == {"step": 0, "epoch": 0, "knn_top1": res.knn_init, "wall_s": 0.0}
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    online, target, state = _states(tmp_path / "run")
    assert state["step"] == 3 and "optimizer" in state and "scheduler" in state
    # the target moved towards the online network but is not equal to it
    assert not torch.equal(online["encoder.conv1.weight"], target["encoder.conv1.weight"])


@pytest.mark.parametrize("optim", ["lars", "lookahead_lars"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch, optim):
    n = 3  # with lookahead_lars (k=2) the kill falls mid-cycle
    extra = {"optim.name": optim, "optim.lookahead_k": 2}
    full = tiny_config(tmp_path / "full", **{"train.max_steps": 2 * n, **extra})
    pretrain(full)

    killed = tiny_config(tmp_path / "killed", **{"train.max_steps": 2 * n,
                                                 "train.checkpoint_every": n, **extra})
    with killed_after_first_checkpoint(monkeypatch):
        pretrain(killed)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "killed")] == [f"step_{n:08d}"]
    # the killed run logged up to step n; resume continues from the checkpoint
    res = pretrain(pretrain_mod.resume_config(str(tmp_path / "killed")),
                   resume_dir=str(tmp_path / "killed"))
    assert res.step == 2 * n
    a_on, a_tg, a_st = _states(tmp_path / "full")
    b_on, b_tg, b_st = _states(tmp_path / "killed")
    for k in a_on:
        assert torch.equal(a_on[k], b_on[k]), k
    for k in a_tg:
        assert torch.equal(a_tg[k], b_tg[k]), k
    for i, s in a_st["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b_st["optimizer"]["state"][i]["momentum_buffer"])
    if optim.startswith("lookahead"):
        slow_a, slow_b = a_st["optimizer"]["lookahead"], b_st["optimizer"]["lookahead"]
        assert slow_a["la_step"] == slow_b["la_step"]
        for i, s in slow_a["state"].items():
            assert torch.equal(s["slow_param"], slow_b["state"][i]["slow_param"])
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 2 * n + 1))  # no duplicated lines after the resume


def _run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_key_and_wrong_type_are_one_line(tmp_path, capsys):
    code, err = _run_cli(["pretrain", "train.epoch=3"], capsys)
    assert code == 2 and "train.epoch: unknown key" in err and len(err.splitlines()) == 1
    code, err = _run_cli(["pretrain", "train.batch_size=big"], capsys)
    assert code == 2 and err == "ssl-suite: error: train.batch_size: expected an integer, got 'big'"
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  momentum: 2.0\n")
    code, err = _run_cli(["pretrain", "--config", str(bad)], capsys)
    assert code == 2 and "optim.momentum: 2.0 is above the maximum 1.0" in err


def test_missing_data_root_is_one_line(tmp_path, capsys):
    code, err = _run_cli(["pretrain", f"run_dir={tmp_path}/r", "data.name=cifar10",
                          f"data.root={tmp_path}/nope"], capsys)
    assert code == 2 and "data.root" in err and len(err.splitlines()) == 1


def test_corrupt_image_stops_with_path_or_is_skipped(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (20, 18), (i * 20, 40 if c == "a" else 200, 90)).save(root / c / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not an image at all")
    common = tiny_overrides(tmp_path / "r1", **{"data.name": "imagefolder", "data.root": str(root),
                                                "data.num_workers": 0, "train.batch_size": 8,
                                                "train.max_steps": 3, "data.holdout_fraction": 0.2})
    code, err = _run_cli(["pretrain", *common, "data.on_corrupt=error"], capsys)
    assert code == 2 and "broken.png" in err and len(err.splitlines()) == 1
    code, _ = _run_cli(["pretrain", *common, f"run_dir={tmp_path}/r2", "data.on_corrupt=skip"], capsys)
    assert code == 0 and ckpt.latest_checkpoint(tmp_path / "r2") is not None


def test_corrupt_checkpoint_is_one_line_and_kept(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(tiny_config(run, **{"train.max_steps": 2}))
    last = ckpt.latest_checkpoint(run)
    data = (last / "online.safetensors").read_bytes()
    (last / "online.safetensors").write_bytes(data[: len(data) // 3])
    code, err = _run_cli(["pretrain", "--resume", str(run)], capsys)
    assert code == 2 and "online.safetensors is corrupt" in err and len(err.splitlines()) == 1
    assert (last / "online.safetensors").stat().st_size == len(data) // 3  # nothing deleted
    (last / "state.pt").write_bytes(b"garbage")
    (last / "online.safetensors").write_bytes(data)
    code, err = _run_cli(["pretrain", "--resume", str(run)], capsys)
    assert code == 2 and "state.pt is corrupt" in err


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(tiny_config(run, **{"train.max_steps": 1}))
    code, err = _run_cli(["pretrain", *tiny_overrides(run)], capsys)
    assert code == 2 and "already holds checkpoints" in err
    assert ckpt.latest_checkpoint(run).name == "step_00000001"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    real_loss = pretrain_mod.byol_loss

    def loss_goes_nan(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        return out * float("nan") if calls["n"] > 2 else out
    monkeypatch.setattr(pretrain_mod, "byol_loss", loss_goes_nan)
    code, err = _run_cli(["pretrain", *tiny_overrides(run, **{"train.max_steps": 6,
                                                              "train.checkpoint_every": 2})], capsys)
    assert code == 3 and "loss became nan by step 3" in err and "step_00000002" in err
    assert len(err.splitlines()) == 1
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]
    online = load_file(str(ckpt.latest_checkpoint(run) / "online.safetensors"))
    assert all(torch.isfinite(v).all() for v in online.values())


def test_grad_checkpointing_gives_the_same_step(tmp_path):
    """timm's set_grad_checkpointing trades compute for memory, not results (parameters; BN
    running statistics are updated again by the recomputed forward)."""
    a = pretrain(tiny_config(tmp_path / "a", **{"train.max_steps": 2}))
    b = pretrain(tiny_config(tmp_path / "b", **{"train.max_steps": 2, "train.grad_checkpointing": True}))
    for (k, va), vb in zip(a.online.named_parameters(), b.online.parameters()):
        assert torch.allclose(va, vb, atol=1e-5), k


def test_bf16_autocast_run_trains(tmp_path):
    res = pretrain(tiny_config(tmp_path / "bf16", **{"train.max_steps": 3, "train.precision": "bf16"}))
    assert res.final_loss is not None and 0.0 <= res.final_loss <= 8.0
    assert all(p.dtype == torch.float32 for p in res.online.parameters())  # master weights stay fp32


def test_fp16_without_cuda_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    code, err = _run_cli(["pretrain", *tiny_overrides(tmp_path / "r"), "train.precision=fp16"], capsys)
    assert code == 2 and "train.precision: fp16 needs a CUDA device" in err


def test_python_dash_m_entry_point():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "ssl_suite", "pretrain", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--resume RUN_DIR" in out.stdout


def test_unknown_tracker_is_one_line(tmp_path, capsys):
    code, err = _run_cli(["pretrain", *tiny_overrides(tmp_path / "r"), "train.trackers=[nonsense]"], capsys)
    assert code == 2 and err.startswith("ssl-suite: error: train.trackers: Unsupported logging")


@pytest.mark.parametrize("name", ["lars", "lamb", "sgd", "adamw", "radam", "lookahead_lars",
                                  "generic_adam", "timmlars", "amsgrad"])
def test_byol_runs_with_each_optimizer(tmp_path, name):
    lr = {"lars": 0.2, "timmlars": 0.2, "sgd": 0.05, "lookahead_lars": 0.2}.get(name, 1e-3)
    res = pretrain(tiny_config(tmp_path / name, **{"optim.name": name, "optim.base_lr": lr,
                                                   "train.max_steps": 3, "train.knn_every": -1}))
    assert res.final_loss is not None and 0.0 <= res.final_loss <= 8.0


def test_fresh_batch_optimizers_get_a_new_batch_on_every_closure_call(tmp_path, monkeypatch):
    """An optimizer with ``fresh_batches = True`` that calls the closure 3 times per step sees the
    planned batch first, then two other batches; a plain optimizer calling it twice sees the same
    batch twice (LBFGS-style line searches need that)."""
    import ssl_suite.optim.factory as factory

    seen = []
    real_augment = pretrain_mod.BYOLAugment

    class Spy(real_augment):
        def forward(self, images):
            seen.append(images.clone())
            return super().forward(images)
    monkeypatch.setattr(pretrain_mod, "BYOLAugment", Spy)

    for fresh, calls in ((True, 3), (False, 2)):
        class Multi(torch.optim.SGD):
            fresh_batches = fresh

            def step(self, closure=None):
                for _ in range(calls):
                    closure()
                return super().step()
        real_create = factory.create_optimizer
        monkeypatch.setattr(pretrain_mod, "create_optimizer",
                            lambda mods, cfg, *a, **k: Multi(real_create(mods, cfg, *a, **k).param_groups))
        seen.clear()
        pretrain(tiny_config(tmp_path / f"run{fresh}", **{"train.max_steps": 2, "optim.name": "momentum"}))
        assert len(seen) == 2 * calls
        first, *rest = seen[:calls]
        if fresh:
            assert all(not torch.equal(first, r) for r in rest) and not torch.equal(rest[0], rest[1])
        else:
            assert all(torch.equal(first, r) for r in rest)


def test_auto_precision_follows_the_hardware(monkeypatch, caplog):
    monkeypatch.setattr(pretrain_mod, "native_bf16", lambda: True)
    assert pretrain_mod.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(pretrain_mod, "native_bf16", lambda: False)
    assert pretrain_mod.resolve_precision("auto") == "no"
    assert pretrain_mod.resolve_precision("no") == "no"
    if not torch.cuda.is_available():
        with caplog.at_level("WARNING", logger="ssl_suite"):
            assert pretrain_mod.resolve_precision("bf16") == "bf16"
        assert "emulated" in caplog.text
