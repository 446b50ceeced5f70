"""``ssl-suite compare``: two algorithms (and one that diverges) for a few steps: the table's
columns and rows, the plot, one failure that does not stop the others, a rerun that skips
finished runs, and a rerun that continues a half-finished comparison (evaluation only; pretraining
from its last checkpoint) instead of starting over."""

import csv
import json
import shutil

import pytest
import yaml

from ssl_suite.cli import main
from ssl_suite.engine.compare import CSV_COLUMNS, RESULT_FILE, mean_curve

from helpers import tiny_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_compare(tmp_path, algorithms, **extra):
    (tmp_path / "base.yaml").write_text("seed: 0\n")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(
        {"linear": {"mode": "cached", "lrs": [0.1], "epochs": 3, "batch_size": 256}}))
    pre = [o for o in tiny_overrides("unused", **{"train.checkpoint_every": 2})
           if not o.startswith("run_dir=")]
    spec = {"out_dir": str(tmp_path / "out"), "seeds": [0],
            "pretrain": {"config": "base.yaml", "overrides": pre},   # relative to this file
            "eval": {"config": str(tmp_path / "eval.yaml")},
            "algorithms": algorithms, **extra}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _rows(out):
    with (out / "compare.csv").open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, {r["algorithm"]: r for r in reader}


def test_compare_table_plot_failure_skip_and_resume(tmp_path, capsys):
    cfg = _write_compare(tmp_path, [
        {"name": "lars"},
        {"name": "adamw", "overrides": ["optim.name=adamw", "optim.base_lr=1e-3",
                                        "optim.lr_scaling=sqrt"]},
        {"name": "diverges", "overrides": ["optim.name=sgd", "optim.base_lr=1e30",
                                           "optim.lr_scaling=none"]},
    ])
    out = tmp_path / "out"
    # the diverging run is recorded as failed, the others finish; exit status 1
    assert main(["compare", "--config", str(cfg), "--no-progress"]) == 1
    printed = capsys.readouterr().out

    header, rows = _rows(out)
    assert header == CSV_COLUMNS
    assert list(rows) == ["lars", "adamw", "diverges"]
    for name in ("lars", "adamw"):
        r = rows[name]
        assert (r["status"], r["n_seeds"], r["n_done"], r["error"]) == ("ok", "1", "1", "")
        assert 0 < float(r["final_loss_mean"]) < 8        # two views, each 2 - 2 cos in [0, 4]
        assert 0 <= float(r["knn_top1_mean"]) <= 1 and 0 <= float(r["linear_top1_mean"]) <= 1
        assert float(r["wall_s_mean"]) > 0 and float(r["steps_per_s_mean"]) > 0
        assert float(r["peak_mem_mb_mean"]) > 50           # a process with torch in it
        assert r["final_loss_std"] == ""                   # one seed: no standard deviation
        res = json.loads((out / name / "seed0" / RESULT_FILE).read_text())
        assert res["status"] == "done" and res["pretrain"]["steps"] == 4
        assert float(r["linear_top1_mean"]) == pytest.approx(res["linear"]["top1"])
        # an ordinary run directory: its results.csv has the linear evaluation row
        assert "linear-eval" in (out / name / "seed0" / "results.csv").read_text()
    assert rows["adamw"]["overrides"].startswith("optim.name=adamw")
    bad = rows["diverges"]
    assert bad["status"] == "failed" and "loss became nan" in bad["error"]
    assert bad["linear_top1_mean"] == "" and bad["n_done"] == "0"

    md = (out / "compare.md").read_text()
    lines = md.splitlines()
    assert lines[0] == ("| algorithm | status | seeds | final loss | kNN top-1 | linear top-1 | "
                        "wall-clock (s) | peak memory (MB) | steps/s |")
    assert lines[2].startswith("| lars | ok | 1/1 | ") and lines[3].startswith("| adamw | ok |")
    assert lines[4].startswith("| diverges | failed | 0/1 | –")
    assert "- diverges: loss became nan" in md and md in printed
    assert (out / "compare.png").read_bytes()[:8] == PNG_SIGNATURE

    # rerun: nothing runs again (the failed run is not retried either), the files stay as they are
    lars_run, adamw_run = out / "lars" / "seed0", out / "adamw" / "seed0"
    before = {p: p.read_bytes() for p in (lars_run / "metrics.jsonl", adamw_run / "metrics.jsonl",
                                          lars_run / RESULT_FILE)}
    ckpts = sorted(p.name for p in (adamw_run / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"]
    assert main(["compare", "--config", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "lars/seed0: skipped (done)" in err and "adamw/seed0: skipped (done)" in err
    assert "diverges/seed0: skipped (failed)" in err
    assert all(p.read_bytes() == b for p, b in before.items())

    # half-finished: lars pretrained but not evaluated; adamw killed after its step-2 checkpoint
    res = json.loads((lars_run / RESULT_FILE).read_text())
    res["status"] = "pretrained"
    del res["linear"]
    (lars_run / RESULT_FILE).write_text(json.dumps(res))
    (adamw_run / RESULT_FILE).unlink()
    shutil.rmtree(adamw_run / "checkpoints" / "step_00000004")
    adamw_lines = (adamw_run / "metrics.jsonl").read_text().splitlines()
    assert main(["compare", "--config", str(cfg), "--only", "lars", "adamw",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "lars/seed0: linear eval only" in err
    assert "adamw/seed0: resuming pretraining" in err
    assert (lars_run / "metrics.jsonl").read_bytes() == before[lars_run / "metrics.jsonl"]
    assert "resumed" in (adamw_run / "compare.log").read_text()
    after = (adamw_run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in after]
    assert steps[-1] == 4 and steps.count(1) == 1       # continued, not appended from step 0
    assert after[:3] == adamw_lines[:3]                 # kNN at init, steps 1, 2: from the kill
    _, rows = _rows(out)
    assert list(rows) == ["lars", "adamw"]              # --only: the table of those two
    assert all(r["status"] == "ok" for r in rows.values())


def test_compare_bad_input_is_one_line_before_any_run(tmp_path, capsys):
    cases = [
        ({"algorithms": [{"name": "a", "overides": []}]}, "algorithms[0].overides: unknown key"),
        ({"algorithms": [{"name": "a"}], "seed": [0]}, "seed: unknown key"),
        ({"algorithms": [{"name": "a"}, {"name": "b", "overrides": ["optim.nme=adamw"]}]},
         "algorithms[b]: optim.nme: unknown key"),
        ({"algorithms": [{"name": "a", "overrides": ["optim.name=adamw",
                                                     "optim.kwargs={betaz: 1}"]}]},
         "algorithms[a]: optim.kwargs: adamw does not take betaz"),
        ({"algorithms": [{"name": "a"}, {"name": "a"}]}, "algorithms[1].name: 'a' appears twice"),
        ({"algorithms": [{"name": "a/b"}]}, "algorithms[0].name: 'a/b' must be"),
        ({"algorithms": [{"name": "a"}], "seeds": []}, "seeds: give at least one seed"),
    ]
    for spec, message in cases:
        algorithms = spec.pop("algorithms")
        cfg = _write_compare(tmp_path, algorithms, **spec)
        assert main(["compare", "--config", str(cfg), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ssl-suite: error: ")
        assert message in err, (message, err)
        assert not (tmp_path / "out").exists()          # nothing ran
    cfg = _write_compare(tmp_path, [{"name": "a"}])
    assert main(["compare", "--config", str(cfg), "--only", "zz", "--no-progress"]) == 2
    assert "--only: 'zz' is not an algorithm" in capsys.readouterr().err


def test_mean_curve_averages_the_common_steps():
    a = {1: (1.0, 4.0), 2: (2.0, 3.0), 3: (3.0, 2.0)}
    b = {1: (3.0, 2.0), 2: (4.0, 1.0)}
    assert mean_curve([a, b]) == ([1, 2], [2.0, 3.0], [3.0, 2.0])
    assert mean_curve([a, {}]) == ([1, 2, 3], [1.0, 2.0, 3.0], [4.0, 3.0, 2.0])


@pytest.mark.parametrize("name", ["compare_quick.yaml", "compare_cifar10.yaml"])
def test_shipped_compare_configs_validate_and_cover_the_library(name):
    """Every run of the shipped comparisons has a valid config (checked as the command checks
    them before the first run), and the quick one names every optimizer of ours and every
    normalization / initialization / growth / sparsity switch of the library."""
    from pathlib import Path

    from ssl_suite.engine.compare import load_compare_config, plan_runs
    from ssl_suite.optim.factory import resolve_name

    path = Path(__file__).parent.parent / "configs" / name
    cc = load_compare_config(path)
    specs = plan_runs(cc, ["data.root=/data"] if "cifar" in name else [])
    assert len(specs) == len(cc.algorithms) * len(cc.seeds)
    optims = {resolve_name(s.cfg.optim.name)[0] for s in specs}
    ours = {"byollars", "genericadam", "nsgd", "koalav", "koalam", "mbf", "svi", "entropysgd",
            "replicasgd", "spheresgd", "plainsgd", "amsgrad"}
    timm_std = {"sgd", "momentum", "adagrad", "adadelta", "rmsprop", "adam", "adamax", "nadam",
                "adamw", "sgdw", "radam", "lamb"}
    assert ours | timm_std <= optims, sorted((ours | timm_std) - optims)
    assert any(resolve_name(s.cfg.optim.name)[1] for s in specs)            # lookahead_
    switches = [lambda c: c.model.weight_norm, lambda c: c.model.mean_only_bn,
                lambda c: c.optim.wrs, lambda c: c.schedule.name == "lanczos",
                lambda c: c.init.gradinit.enabled, lambda c: c.growth.enabled,
                lambda c: c.sparsity.enabled]
    assert all(any(f(s.cfg) for s in specs) for f in switches)
