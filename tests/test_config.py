"""Config: typed loading, presets, overrides, one-line errors; every shipped config loads."""

from pathlib import Path

import pytest

from ssl_suite.config import ConfigError, build_config, load_config, parse_override, to_dict

EVAL_PREFIXES = ("linear_", "semisup_", "eval_")
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                 if not p.name.startswith(EVAL_PREFIXES + ("compare_",)))
# evaluation configs: test_eval.py; comparison configs: test_compare.py


def test_defaults_are_the_paper_views():
    cfg = build_config({}, ["augment.image_size=224"])
    v1, v2 = cfg.augment.view1, cfg.augment.view2
    assert (v1.blur_prob, v2.blur_prob, v1.solarize_prob, v2.solarize_prob) == (1.0, 0.1, 0.0, 0.2)
    assert v1.crop_scale == (0.08, 1.0) and v1.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (v1.flip_prob, v1.jitter_prob, v1.grayscale_prob) == (0.5, 0.8, 0.2)


def test_preset_32_turns_blur_off_but_user_keys_win():
    cfg = build_config({}, ["augment.image_size=32"])
    assert cfg.augment.view1.blur_prob == 0.0 and cfg.augment.view2.blur_prob == 0.0
    assert cfg.augment.view2.solarize_prob == 0.2          # the rest of T' is kept
    cfg = build_config({}, ["augment.image_size=32", "augment.view1.blur_prob=1.0"])
    assert cfg.augment.view1.blur_prob == 1.0 and cfg.augment.view2.blur_prob == 0.0
    cfg = build_config({}, ["augment.image_size=32", "augment.preset=none"])
    assert cfg.augment.view1.blur_prob == 1.0


def test_override_parsing_and_types():
    assert parse_override("optim.kwargs={nesterov: true}") == (["optim", "kwargs"], {"nesterov": True})
    cfg = build_config({"optim": {"weight_decay": "1e-5"}}, ["train.trackers=[tensorboard]"])
    assert cfg.optim.weight_decay == 1e-5 and cfg.train.trackers == ["tensorboard"]
    assert to_dict(cfg)["augment"]["view1"]["crop_scale"] == [0.08, 1.0]


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "train.epoch: unknown key"),
    ("model.backbone=3", "model.backbone: expected a string, got 3"),
    ("train.sync_bn=yes please", "train.sync_bn: expected true or false"),
    ("augment.view2.flip_prob=1.5", "augment.view2.flip_prob: 1.5 is above the maximum 1.0"),
    ("augment.view1.crop_scale=[0.5]", "augment.view1.crop_scale: expected 2 values, got 1"),
    ("train.batch_size=30", "train.batch_size: 30 is not divisible by train.grad_accum_steps=4"),
    ("data.name=stl10", "data.root: required for data.name='stl10'"),
    ("train", "train: overrides are written key=value"),
    ("train.epochs.x=1", "train.epochs: expected an integer"),
])
def test_bad_values_name_the_key(override, message):
    extra = ["train.grad_accum_steps=4"] if "divisible" in message else []
    with pytest.raises(ConfigError) as err:
        build_config({}, extra + [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path, ["data.root=/data"] if "quickstart" not in path.name else [])
    assert cfg.train.batch_size % cfg.train.grad_accum_steps == 0
    if "imagenet" in path.name:  # the paper's numbers
        assert (cfg.train.batch_size, cfg.optim.base_lr, cfg.optim.weight_decay,
                cfg.byol.tau_base, cfg.train.epochs) == (4096, 0.2, 1.5e-6, 0.996, 1000)
        assert cfg.augment.view1.blur_prob == 1.0 and cfg.augment.view2.solarize_prob == 0.2
