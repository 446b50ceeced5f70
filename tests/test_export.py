"""Encoder export: safetensors + sidecar, loading in timm, CIFAR-stem timm names, no unpickling."""

import json
import logging
import pathlib
import pickle
import shutil

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ssl_suite
from helpers import tiny_config
from ssl_suite.engine.checkpoint import latest_checkpoint, load_checkpoint
from ssl_suite.engine.runs import load_encoder
from ssl_suite.errors import CheckpointError
from ssl_suite.export import (FORMAT_VERSION, ExportError, export_encoder, load_backbone,
                              main_export, sidecar_path, timm_name_for)
from ssl_suite.models.backbone import create_backbone

TINY = dict(channels=[8, 16, 32, 64], stem_width=8)
# One optimizer step; a small kNN memory bank keeps the two kNN passes of pretrain() short.
FAST = {"train.max_steps": 1, "data.knn_train_limit": 50}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions: one thread is faster, and much faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(_one_thread, tmp_path_factory):
    """Two finished tiny runs: CIFAR stem and the standard 7x7/2 + max-pool stem."""
    from ssl_suite.engine.pretrain import pretrain

    root = tmp_path_factory.mktemp("export_runs")
    for name, stem in (("cifar", True), ("std", False)):
        pretrain(tiny_config(root / name, **{**FAST, "model.cifar_stem": stem}))
    return {"cifar": root / "cifar", "std": root / "std"}


def _features(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ---------------------------------------------------------------------------------------------
# CIFAR-stem timm names


def test_cifar_names_registered_on_import():
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        assert timm.is_model(f"{arch}_cifar")
    # No URL / hub id: pretrained=True without a file cannot download anything.
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("resnet18_cifar", pretrained=True, num_classes=0)


@pytest.mark.parametrize("arch,kwargs", [("resnet18", {}), ("resnet18", TINY),
                                         ("resnet50", TINY)])
def test_cifar_name_matches_create_backbone(arch, kwargs):
    torch.manual_seed(3)
    ours = timm.create_model(f"{arch}_cifar", num_classes=0, **kwargs)
    torch.manual_seed(3)
    ref = create_backbone(arch, cifar_stem=True, **kwargs)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.equal(a[k], b[k]) for k in a)  # same construction, same RNG draws
    conv = ours.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(ours.maxpool, torch.nn.Identity)
    assert ours.num_features == ref.num_features
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_features(ours, x), _features(ref, x))


def test_cifar_name_feature_info_and_features_only():
    model = timm.create_model("resnet18_cifar", features_only=True, **TINY)
    assert model.feature_info.reduction() == [1, 1, 2, 4, 8]
    feats = model(torch.zeros(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [32, 32, 16, 8, 4]


# ---------------------------------------------------------------------------------------------
# Export and loading


@pytest.mark.parametrize("kind", ["cifar", "std"])
def test_export_loads_in_timm_with_identical_features(runs, kind, tmp_path, caplog):
    run = runs[kind]
    out = export_encoder(run, tmp_path / "encoder.safetensors")
    assert out == tmp_path / "encoder.safetensors" and sidecar_path(out).is_file()
    side = json.loads(sidecar_path(out).read_text())
    name = "resnet18_cifar" if kind == "cifar" else "resnet18"
    assert side["timm_name"] == name and side["timm_kwargs"] == TINY

    encoder, _ = load_encoder(run)
    x = torch.randn(4, 3, 16, 16)
    ref = _features(encoder, x)
    assert ref.shape == (4, 64) and ref.std() > 0

    # Exactly the keys of timm's num_classes=0 model, nothing else (no fc.*).
    plain = timm.create_model(name, num_classes=0, **TINY)
    tensors = load_file(str(out))
    assert set(tensors) == set(plain.state_dict())  # safetensors stores keys sorted
    assert not any(k.startswith("fc.") for k in tensors)

    # What users type: only the file in the overlay. timm loads with strict=False here (model
    # num_classes 0 != config's), so check nothing was reported missing/unexpected and that
    # every tensor came from the file.
    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model(name, num_classes=0, **TINY, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(out)))
    assert "Loading pretrained weights from file" in caplog.text
    assert "Missing keys" not in caplog.text and "Unexpected keys" not in caplog.text
    state = model.state_dict()
    assert set(state) == set(tensors) and all(torch.equal(state[k], tensors[k]) for k in state)
    assert (_features(model, x) - ref).abs().max().item() < 1e-6

    # With num_classes=0 in the overlay, timm's own load is strict=True.
    strict = timm.create_model(name, num_classes=0, **TINY, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out), num_classes=0))
    assert (_features(strict, x) - ref).abs().max().item() < 1e-6

    # ssl_suite.load_backbone: same features, eval mode.
    loaded = ssl_suite.load_backbone(out)
    assert not loaded.training
    with torch.no_grad():
        assert (loaded(x) - ref).abs().max().item() < 1e-6


def test_sidecar_and_header_fields(runs, tmp_path):
    run = runs["cifar"]
    out = export_encoder(run, tmp_path / "sub" / "enc.safetensors")
    assert sidecar_path(out) == tmp_path / "sub" / "enc.json"
    side = json.loads((tmp_path / "sub" / "enc.json").read_text())
    ckpt = latest_checkpoint(run)
    assert side["timm_name"] == "resnet18_cifar"
    assert side["timm_kwargs"] == TINY
    assert side["cifar_stem"] is True
    assert side["num_features"] == 64
    assert side["network"] == "online"
    assert side["source"] == {"run_dir": str(run.resolve()), "checkpoint": str(ckpt.resolve()),
                              "step": 1}
    assert side["config"]["model"]["backbone"] == "resnet18"
    assert side["config"]["model"]["backbone_kwargs"] == TINY
    assert side["config"]["train"]["max_steps"] == 1
    assert side["ssl_suite_version"] == ssl_suite.__version__
    assert side["timm_version"] == timm.__version__
    assert "git_commit" in side
    assert side["git_commit"] is None or len(side["git_commit"]) == 40
    assert side["format_version"] == FORMAT_VERSION
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["timm_name"] == "resnet18_cifar"
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["timm_kwargs"]) == TINY


def test_target_network_and_load_without_sidecar(runs, tmp_path):
    run = runs["cifar"]
    out = export_encoder(run, tmp_path / "target.safetensors", network="target")
    assert json.loads(sidecar_path(out).read_text())["network"] == "target"
    sidecar_path(out).unlink()  # rebuilt from the safetensors header alone
    loaded = load_backbone(out)
    encoder, _ = load_encoder(run, network="target")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (loaded(x) - _features(encoder, x)).abs().max().item() < 1e-6


def test_main_export_prints_both_paths(runs, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main_export(str(runs["std"]), str(out)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert str(out) in lines[0] and str(tmp_path / "e.json") in lines[1]


def test_export_errors(runs, tmp_path):
    with pytest.raises(ExportError, match=r"\.safetensors"):
        export_encoder(runs["std"], tmp_path / "encoder.pt")
    with pytest.raises(ExportError, match="resnet26"):
        timm_name_for("resnet26", True)
    assert timm_name_for("resnet18.a1_in1k", False) == "resnet18"
    assert timm_name_for("resnet50", True) == "resnet50_cifar"
    with pytest.raises(CheckpointError, match="not a run directory"):
        export_encoder(tmp_path, tmp_path / "x.safetensors")


def test_load_backbone_rejects_mismatched_weights(runs, tmp_path):
    out = export_encoder(runs["cifar"], tmp_path / "encoder.safetensors")
    tensors = load_file(str(out))
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(out), metadata=meta)
    with pytest.raises(CheckpointError, match="does not match"):
        load_backbone(out)
    # timm's own strict load (num_classes=0 in the overlay) refuses it too.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        timm.create_model("resnet18_cifar", num_classes=0, **TINY, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(out), num_classes=0))


# ---------------------------------------------------------------------------------------------
# Never unpickle


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _write_payload(path, marker, how):
    if how == "pickle":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:
        torch.save({"state": _Payload(marker)}, path)


def test_payload_is_live(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload does run when unpickled
    assert live.exists()


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_load_backbone_refuses_pickle(runs, tmp_path, how):
    marker = tmp_path / "pwned"
    out = export_encoder(runs["cifar"], tmp_path / "encoder.safetensors")  # valid sidecar stays
    _write_payload(out, marker, how)
    with pytest.raises(CheckpointError) as err:
        load_backbone(out)
    msg = str(err.value)
    assert "\n" not in msg and str(out) in msg and "not a safetensors file" in msg
    assert not marker.exists()


@pytest.mark.parametrize("name", ["state.pt", "rng_rank0.pt", "online.safetensors"])
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_load_checkpoint_refuses_pickle(runs, tmp_path, name, how):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "step_00000001"
    shutil.copytree(latest_checkpoint(runs["cifar"]), ckpt)
    assert (ckpt / name).is_file()
    _write_payload(ckpt / name, marker, how)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert "\n" not in str(err.value) and name in str(err.value)
    assert not marker.exists()
