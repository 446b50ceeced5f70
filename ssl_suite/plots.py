"""Training curves from a run directory's ``metrics.jsonl`` (``ssl-suite plot RUN [RUN ...]``).

Needs the optional extra ``plots`` (matplotlib). Figures are drawn on the Agg canvas directly, so
nothing here touches pyplot or the process-wide matplotlib backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import median
from typing import Any

from .engine.metrics import read_metrics
from .errors import SSLSuiteError

Series = tuple[list[float], list[float]]


def _figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SSLSuiteError("plots need matplotlib: pip install 'ssl_suite[plots]'") from None
    fig = Figure(figsize=figsize, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _metrics_path(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    return path if path.name == "metrics.jsonl" and path.is_file() else path / "metrics.jsonl"


def load_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of ``RUN_DIR/metrics.jsonl`` (a path to the file itself is accepted too)."""
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise SSLSuiteError(f"no metrics.jsonl in {run_dir}")
    try:
        records = [r for r in read_metrics(path)
                   if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]
    except (OSError, UnicodeDecodeError) as e:
        raise SSLSuiteError(f"cannot read {path}: {type(e).__name__}") from None
    if not records:
        raise SSLSuiteError(f"no metrics records in {path}")
    return records


def _series(records: list[dict[str, Any]], key: str, positive: bool = False) -> Series:
    """(steps, values) of ``key`` sorted by step; nulls/non-finite dropped, last write per step wins."""
    by_step: dict[float, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _no_data(ax: Any, series: Series) -> bool:
    if series[0]:
        return False
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    return True


def _log_if_wide(ax: Any, values: list[float]) -> None:
    pos = [v for v in values if v > 0]
    if pos and len(pos) == len(values) and max(pos) / min(pos) > 10:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _knn_axis(ax: Any) -> None:
    from matplotlib.ticker import PercentFormatter
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_ylabel("kNN top-1")


def _run_name(run_dir: str | Path) -> str:
    return _metrics_path(run_dir).resolve().parent.name


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss, kNN top-1, learning rate and 1 - tau against step, and (runs with ``train.log_elr``)
    the effective LR and angular update; PNG path (default RUN_DIR/curves.png)."""
    records = load_run(run_dir)
    has_elr = any("elr_median" in r for r in records)   # train.log_elr=true
    fig = _figure((11, 10.5 if has_elr else 7))
    axes = fig.subplots(3 if has_elr else 2, 2, sharex=True)
    (ax_loss, ax_knn), (ax_lr, ax_tau) = axes[:2]
    fig.suptitle(_run_name(run_dir), fontweight="bold")

    loss = _series(records, "loss")
    if not _no_data(ax_loss, loss):
        ax_loss.plot(*loss, lw=1.2)
        _log_if_wide(ax_loss, loss[1])
        bad = [r["step"] for r in records if "loss" in r and r["loss"] is None]
        for i, s in enumerate(bad):
            ax_loss.axvline(s, color="red", ls=":", lw=1, label="non-finite loss" if i == 0 else None)
        if bad:
            ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_ylabel("BYOL loss")

    knn = _series(records, "knn_top1")
    if not _no_data(ax_knn, knn):
        ax_knn.plot(*knn, marker="o", ms=5, lw=1.2, color="tab:green")
        if knn[0][0] == 0:
            ax_knn.annotate("random init", (0, knn[1][0]), xytext=(8, -4),
                            textcoords="offset points", fontsize=8, va="top")
        if len(knn[0]) > 1 or knn[0][0] != 0:
            ax_knn.annotate(f"{knn[1][-1]:.1%}", (knn[0][-1], knn[1][-1]), xytext=(-4, -8),
                            textcoords="offset points", fontsize=8, ha="right", va="top")
        ax_knn.margins(y=0.12)
    _knn_axis(ax_knn)

    lr = _series(records, "lr")
    if not _no_data(ax_lr, lr):
        ax_lr.plot(*lr, lw=1.2, color="tab:orange")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.set_ylabel("learning rate")

    tau = _series(records, "tau")
    one_minus = ([s for s, t in zip(*tau) if t < 1], [1 - t for t in tau[1] if t < 1])
    if not _no_data(ax_tau, one_minus):
        ax_tau.plot(*one_minus, lw=1.2, color="tab:purple")
        ax_tau.set_yscale("log")
    ax_tau.set_ylabel("1 − τ  (target EMA, log)")

    if has_elr:   # effective LR lr/|w|^2 and angular update of the scale-invariant weights
        ax_elr, ax_ang = axes[2]
        for key, label in (("elr_median", "lr/‖w‖² (median over tensors)"),
                           ("elr_measured_median", "measured from the angle (median)"),
                           ("elr_joint", "lr/‖w‖², all invariant weights jointly")):
            ser = _series(records, key, positive=True)
            if ser[0]:
                ax_elr.plot(*ser, lw=1.2, label=label)
        ax_elr.set_yscale("log")
        ax_elr.set_ylabel("effective learning rate")
        ax_elr.legend(fontsize=8)
        for key, label in (("angle_median", "median over tensors"), ("angle_joint", "joint")):
            ser = _series(records, key, positive=True)
            if ser[0]:
                ax_ang.plot(*ser, lw=1.2, label=label)
        ax_ang.set_yscale("log")
        ax_ang.set_ylabel("angular update per step (rad)")
        ax_ang.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    pairs = [(r["step"], r["epoch"]) for r in records
             if isinstance(r.get("epoch"), (int, float)) and r["epoch"] > 0 and r["step"] > 0]
    if pairs:
        spe = median(s / e for s, e in pairs)
        for ax in axes[0]:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
            top.set_xlabel("epoch")

    out = Path(out) if out is not None else _metrics_path(run_dir).parent / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_compare(run_dirs: list, out: str | Path) -> Path:
    """Loss and kNN top-1 against step for several runs on one figure (one colour per run)."""
    if not run_dirs:
        raise SSLSuiteError("plot_compare needs at least one run directory")
    runs = [(Path(d), load_run(d)) for d in run_dirs]
    names = [_run_name(d) for d, _ in runs]
    names = [f"{_metrics_path(d).resolve().parent.parent.name}/{n}" if names.count(n) > 1 else n
             for (d, _), n in zip(runs, names)]
    fig = _figure((12, 5))
    ax_loss, ax_knn = fig.subplots(1, 2, sharex=True)
    all_loss: list[float] = []
    any_knn = False
    for i, ((_, records), name) in enumerate(zip(runs, names)):
        colour = f"C{i % 10}"
        loss, knn = _series(records, "loss"), _series(records, "knn_top1")
        all_loss += loss[1]
        any_knn |= bool(knn[0])
        ax_loss.plot(*loss, lw=1.2, color=colour, label=name)
        ax_knn.plot(*knn, marker="o", ms=4, lw=1.2, color=colour, label=name)
    if not _no_data(ax_loss, ([0] if all_loss else [], all_loss)):
        _log_if_wide(ax_loss, all_loss)
    if not any_knn:
        _no_data(ax_knn, ([], []))
    ax_loss.set_ylabel("BYOL loss")
    _knn_axis(ax_knn)
    for ax in (ax_loss, ax_knn):
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def main_plot(runs: list[str], out: str | None = None) -> int:
    """``ssl-suite plot RUN [RUN ...] [--out FILE]``: one run -> curves, several -> comparison."""
    if not runs:
        raise SSLSuiteError("plot needs at least one run directory")
    if len(runs) == 1:
        print(plot_run(runs[0], out))
    else:
        print(plot_compare(runs, out or "compare.png"))
    return 0
