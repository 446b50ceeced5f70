"""``ssl_suite.plots``: PNG curves from synthetic ``metrics.jsonl`` files."""

import json

import pytest

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

from ssl_suite.errors import SSLSuiteError  # noqa: E402
from ssl_suite.plots import main_plot, plot_compare, plot_run  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, knn=True, torn=True, steps=40):
    run_dir.mkdir(parents=True)
    lines = [{"step": 0, "epoch": 0, "knn_top1": 0.3}] if knn else []
    for step in range(1, steps + 1):
        loss = None if step == 7 else 4.0 * 0.9 ** step
        lines.append({"step": step, "epoch": step / 10, "loss": loss, "lr": 0.1 * step / steps,
                      "tau": 0.99 + 0.01 * step / steps, "images_per_s": 100.0})
        if knn and step % 20 == 0:
            lines.append({"step": step, "epoch": step / 10, "knn_top1": 0.3 + step / 100})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if torn:
        text += '{"step": 41, "epoch": 4.1, "lo'
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def _check_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= 400 and height >= 300


def test_plot_run_default_path(tmp_path):
    run = _write_run(tmp_path / "run_a")
    out = plot_run(run)
    assert out == run / "curves.png"
    _check_png(out)


def test_plot_run_explicit_out_and_no_knn(tmp_path):
    run = _write_run(tmp_path / "run_b", knn=False, torn=False)
    out = plot_run(str(run), tmp_path / "sub" / "b.png")
    _check_png(out)


def test_plot_run_only_knn_lines(tmp_path):
    run = tmp_path / "knn_only"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "epoch": 0, "knn_top1": 0.1}\n')
    _check_png(plot_run(run))


def test_plot_compare_two_runs_same_basename(tmp_path):
    a = _write_run(tmp_path / "x" / "run")
    b = _write_run(tmp_path / "y" / "run", knn=False, steps=25)
    out = plot_compare([a, b], tmp_path / "cmp.png")
    assert out == tmp_path / "cmp.png"
    _check_png(out)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["cmp.png"]


@pytest.mark.parametrize("content", [None, "", '{"step": 3, "lo'])
def test_bad_run_dir_is_one_line_error(tmp_path, content):
    run = tmp_path / "bad_run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(SSLSuiteError) as err:
        plot_run(run)
    assert "\n" not in str(err.value)
    assert str(run) in str(err.value)
    assert not (run / "curves.png").exists()


def test_compare_with_a_missing_run_names_it(tmp_path):
    good = _write_run(tmp_path / "good")
    with pytest.raises(SSLSuiteError, match="missing"):
        plot_compare([good, tmp_path / "missing"], tmp_path / "cmp.png")


def test_main_plot(tmp_path, monkeypatch, capsys):
    a = _write_run(tmp_path / "a")
    b = _write_run(tmp_path / "b")
    assert main_plot([str(a)]) == 0
    assert capsys.readouterr().out.strip() == str(a / "curves.png")
    monkeypatch.chdir(tmp_path)
    assert main_plot([str(a), str(b)]) == 0
    assert capsys.readouterr().out.strip() == "compare.png"
    _check_png(tmp_path / "compare.png")
