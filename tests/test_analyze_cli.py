"""``ssl-suite analyze hessian|flatness --run RUN``: files written, numbers printed, bad input is
one line."""

import json

import pytest

from ssl_suite.cli import main
from ssl_suite.engine.pretrain import pretrain

from helpers import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("analyze") / "run"
    pretrain(tiny_config(run, **{"train.max_steps": 2}))
    return run


def test_analyze_hessian_writes_spectrum(run_dir, capsys):
    assert main(["analyze", "hessian", "--run", str(run_dir), "--batch-size", "8",
                 "--num-batches", "2", "--lanczos-steps", "4", "--probes", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "analysis" / "hessian.json").read_text())
    assert f"full batch {summary['full']['lambda_max']:.4g}" in out
    assert summary["mini"]["lambda_max"] > 0
    assert (run_dir / "analysis" / "hessian.png").stat().st_size > 0
    assert (run_dir / "analysis" / "hessian.csv").read_text().startswith("hessian,images")


def test_analyze_flatness_writes_curve(run_dir, capsys, tmp_path):
    assert main(["analyze", "flatness", "--run", str(run_dir), "--batch-size", "32",
                 "--num-batches", "1", "--samples", "2", "--sigmas", "0", "0.05",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "byol_loss increase by sigma: 0: +0" in out
    rows = (tmp_path / "flatness.csv").read_text().splitlines()
    assert len(rows) >= 3 and (tmp_path / "flatness.png").is_file()


def test_analyze_bad_input_is_one_line(run_dir, tmp_path, capsys):
    assert main(["analyze", "hessian", "--run", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssl-suite: error:") and len(err.splitlines()) == 1
    assert main(["analyze", "flatness", "--run", str(run_dir), "--samples", "0",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "samples" in err and len(err.splitlines()) == 1
