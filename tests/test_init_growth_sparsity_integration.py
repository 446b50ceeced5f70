"""GradInit, GradMax and SCL in the engines: from the pretraining and fine-tuning configs,
through the phases of ssl_suite/engine/phases.py (issue 8)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ssl_suite.config import ConfigError
from ssl_suite.engine import checkpoint as ckpt
from ssl_suite.engine import pretrain as pretrain_mod
from ssl_suite.engine.eval_common import eval_config
from ssl_suite.engine.finetune import finetune
from ssl_suite.engine.phases import Growth
from ssl_suite.engine.pretrain import pretrain
from ssl_suite.export import export_encoder, load_backbone
from ssl_suite.models import build_byol
from ssl_suite.models.gradmax import ReLU1

from helpers import killed_after_first_checkpoint, tiny_config

SPE = 1437 // 32   # optimizer steps per epoch of the tiny config (digits, batch 32)


def _states(run):
    last = ckpt.latest_checkpoint(run)
    return (load_file(str(last / "online.safetensors")), load_file(str(last / "target.safetensors")),
            torch.load(last / "state.pt", weights_only=True))


# ---- GradInit ---------------------------------------------------------------------------------

def test_gradinit_phase_folds_the_learned_scales_into_online_and_target(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"init.gradinit.enabled": "true",
                                           "init.gradinit.steps": 3,
                                           "init.gradinit.scale_lr": 0.05})
    torch.manual_seed(cfg.seed)
    online, target = build_byol(cfg.model)
    on0 = {k: v.clone() for k, v in online.state_dict().items()}
    tg0 = {k: v.clone() for k, v in target.state_dict().items()}
    from ssl_suite.data import build_data
    from ssl_suite.engine.pretrain import _gradinit, make_accelerator
    data = build_data(cfg.data, show_progress=False)
    out = tmp_path / "gradinit.json"
    _gradinit(online, target, cfg, data, 32, make_accelerator("no"), out)
    logged = json.loads(out.read_text())
    scales = logged["scales"]
    assert logged["optimizer"] == "sgd" and len(logged["history"]) == 3
    assert any(abs(m - 1) > 1e-3 for m in scales.values())       # it learned something
    assert all(m >= 0.01 - 1e-12 for n, m in scales.items() if not n.endswith("bias"))
    on1, tg1 = online.state_dict(), target.state_dict()
    for name, m in scales.items():   # folded: theta_i <- m_i theta_i^0, the target alike
        assert torch.allclose(on1[name], on0[name] * m, rtol=1e-6, atol=0), name
        if name in tg1:
            assert torch.allclose(tg1[name], tg0[name] * m, rtol=1e-6, atol=0), name


def test_pretraining_with_gradinit_writes_the_scale_log_and_trains(tmp_path):
    res = pretrain(tiny_config(tmp_path / "run", **{"init.gradinit.enabled": "true",
                                                    "init.gradinit.steps": 2,
                                                    "train.max_steps": 2}))
    assert torch.isfinite(torch.tensor(res.final_loss))
    scales = json.loads((tmp_path / "run" / "gradinit.json").read_text())["scales"]
    assert "encoder.conv1.weight" in scales and "projector.0.weight" in scales


# ---- GradMax ----------------------------------------------------------------------------------

def test_growth_keeps_online_and_target_outputs_and_the_optimizer_state(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"growth.enabled": "true", "growth.start_fraction": 0.5,
                                           "growth.n_growths": 2,
                                           "growth.pairs": "[blocks, projector, predictor]"})
    torch.manual_seed(0)
    online, target = build_byol(cfg.model)
    growth = Growth.build(cfg.growth, online, SPE, twins=[target])
    assert any(isinstance(m, ReLU1) for m in online.modules())
    assert online.encoder.layer1[0].conv1.out_channels == 4          # 8 * 0.5
    assert target.projector[0].out_features == 32                    # 64 * 0.5
    opt = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 16, 16)
    from ssl_suite.models import byol_loss

    def closure():
        online.zero_grad()
        byol_loss(*online(x, x.flip(-1)), target(x), target(x.flip(-1))).backward()
    closure()
    opt.step()
    old_mom = {id(p): opt.state[p]["momentum_buffer"].clone() for p in online.parameters()}
    old_shapes = {n: p.shape for n, p in online.named_parameters()}
    for bn in [m for net in (online, target) for m in net.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]:
        bn.momentum = 0.0   # running statistics stay put, so eval-mode outputs are comparable
    for m in (online, target):
        m.eval()
    with torch.no_grad():
        before = online(x), target(x)
        for m in (online, target):
            m.train()
        before_train = online(x), target(x)
    step = growth.events[0]
    widths = growth.grow(step, closure, opt)
    assert widths["encoder.layer1.0.conv1"] == 6 and widths["projector.0"] == 48
    with torch.no_grad():
        after_train = online(x), target(x)
        for m in (online, target):
            m.eval()
        after = online(x), target(x)
    for a, b in zip(before + before_train, after + after_train):
        assert (a - b).abs().max().item() < 1e-6
    # optimizer: new tensors swapped in, state grown: old entries kept, new entries zero
    params = list(online.parameters())
    assert [p for g in opt.param_groups for p in g["params"]] == params
    grown_w = online.encoder.layer1[0].conv1.weight
    buf = opt.state[grown_w]["momentum_buffer"]
    assert buf.shape == grown_w.shape and buf[4:].abs().sum() == 0
    old = [v for k, v in old_mom.items() if v.shape == old_shapes["encoder.layer1.0.conv1.weight"]]
    assert any(torch.equal(buf[:4], v) for v in old)
    tgt, src = target.ema_pairs(online)   # the EMA pairs still match
    assert len(tgt) == len(src)


def test_growth_resume_after_growth_equals_uninterrupted(tmp_path, monkeypatch):
    extra = {"growth.enabled": "true", "growth.n_growths": 2, "growth.start_fraction": 0.5,
             "growth.start_epoch": 2 / SPE, "growth.every_epochs": 2 / SPE,
             "train.max_steps": 6, "optim.name": "lookahead_lars", "optim.lookahead_k": 2}
    pretrain(tiny_config(tmp_path / "full", **extra))
    with killed_after_first_checkpoint(monkeypatch):   # at step 3, one growth done
        pretrain(tiny_config(tmp_path / "killed", **extra, **{"train.checkpoint_every": 3}))
    res = pretrain(pretrain_mod.resume_config(str(tmp_path / "killed")),
                   resume_dir=str(tmp_path / "killed"))
    assert res.step == 6
    a_on, a_tg, a_st = _states(tmp_path / "full")
    b_on, b_tg, b_st = _states(tmp_path / "killed")
    assert a_on["encoder.layer1.0.conv1.weight"].shape[0] == 8      # back to full width
    for a, b in ((a_on, b_on), (a_tg, b_tg)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for i, s in a_st["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b_st["optimizer"]["state"][i]["momentum_buffer"])
    lines = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "growth_widths" in r] == [2, 4]
    # grown to full width, the encoder exports to plain timm
    out = export_encoder(tmp_path / "full", tmp_path / "enc.safetensors")
    assert load_backbone(out).layer1[0].conv1.out_channels == 8


def test_growth_refuses_optimizers_whose_state_cannot_follow(tmp_path):
    with pytest.raises(ConfigError, match="growth.enabled: optimizer mbf"):
        pretrain(tiny_config(tmp_path / "run", **{"growth.enabled": "true", "optim.name": "mbf"}))


# ---- SCL ----------------------------------------------------------------------------------------

def test_scl_pretraining_logs_sparsity_and_exports_masked_dense_weights(tmp_path):
    run = tmp_path / "run"
    res = pretrain(tiny_config(run, **{"sparsity.enabled": "true", "sparsity.weight": 0.5,
                                       "sparsity.mask_lr": 0.4, "sparsity.exclude": "[encoder.conv1]",
                                       "train.max_steps": 3}))
    assert torch.isfinite(torch.tensor(res.final_loss))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sp = [r["sparsity"] for r in recs if "sparsity" in r]
    assert len(sp) == 3 and sp[2] > sp[1] > sp[0] >= 0    # pruning pressure (LR warms up)
    report = json.loads((run / "sparsity.json").read_text())
    assert "encoder.layer1.0.conv1" in report["layers"] and "encoder.conv1" not in report["layers"]
    online, _, _ = _states(run)
    w_hat = online["encoder.layer1.0.conv1.parametrizations.weight.original"]
    mask = online["encoder.layer1.0.conv1.parametrizations.weight.0.m_hat"] > 0
    out = export_encoder(run, tmp_path / "enc.safetensors")
    exported = load_file(str(out))
    assert torch.equal(exported["layer1.0.conv1.weight"], w_hat * mask)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["sparsity"]["global"] > 0 and "layer1.0.conv1" in side["sparsity"]["layers"]
    enc = load_backbone(out)                     # plain timm, strict
    assert not hasattr(enc.layer1[0].conv1, "parametrizations")


def test_reparametrisations_that_cannot_combine_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="sparsity.enabled with model.weight_norm"):
        pretrain(tiny_config(tmp_path / "a", **{"sparsity.enabled": "true",
                                                "model.weight_norm": "true"}))
    with pytest.raises(ConfigError, match="sparsity.modules: 'trunk'"):
        pretrain(tiny_config(tmp_path / "b", **{"sparsity.enabled": "true",
                                                "sparsity.modules": "[trunk]"}))
    with pytest.raises(ConfigError, match="growth.pairs: no module named 'encoder.nope'"):
        pretrain(tiny_config(tmp_path / "c", **{"growth.enabled": "true",
                                                "growth.pairs": "['encoder.nope,encoder.fc']"}))


# ---- fine-tuning ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("phases") / "run"
    pretrain(tiny_config(run, **{"train.max_steps": 2}))
    return run


def test_finetune_config_reaches_gradinit_growth_and_scl(run_dir):
    base = ["progress=false", "finetune.epochs=2", "finetune.batch_size=32", "finetune.lrs=[0.05]",
            "data.label_fraction=0.1"]
    cfg, run_cfg = eval_config(str(run_dir), None, base + [
        "finetune.sparsity.enabled=true", "finetune.sparsity.modules=[encoder]",
        "finetune.sparsity.weight=0.5", "finetune.sparsity.mask_lr=0.5",
        "finetune.init.gradinit.enabled=true", "finetune.init.gradinit.steps=2"])
    res = finetune(str(run_dir), cfg, run_cfg)
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0 and res["sparsity"]["global"] > 0
    rows = (run_dir / "results.csv").read_text()
    assert "sparsity" in rows

    cfg, run_cfg = eval_config(str(run_dir), None, base + [
        "finetune.growth.enabled=true", "finetune.growth.start_fraction=0.5",
        "finetune.growth.n_growths=1", "finetune.growth.start_epoch=0.25",
        "finetune.growth.pairs=[blocks]"])
    res = finetune(str(run_dir), cfg, run_cfg)
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0
