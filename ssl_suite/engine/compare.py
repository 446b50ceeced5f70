"""``ssl-suite compare --config configs/compare_quick.yaml``: the same BYOL pretraining with a list
of algorithms (and seeds), the same linear evaluation of each, one table and one plot.

A comparison file names a base pretraining config, an evaluation config, the seeds, an output
folder and the algorithms, each a label and the dotted overrides that make it::

    out_dir: runs/compare_quick
    seeds: [0]
    pretrain: {config: configs/quickstart.yaml, overrides: [train.epochs=6]}
    eval: {config: configs/eval_quickstart.yaml, overrides: []}
    algorithms:
      - {name: lars}
      - {name: adamw, overrides: [optim.name=adamw, optim.base_lr=1e-3, optim.lr_scaling=sqrt]}

Every (algorithm, seed) run is an ordinary run directory, ``OUT_DIR/<name>/seed<k>/``
(``ssl-suite plot``, ``linear-eval``, ``knn`` work on it), whose config is the base file, then
``pretrain.overrides``, then the algorithm's overrides, then the command line's, then
``run_dir``, ``seed`` and ``train.progress=false``. Every run is validated before the first one
starts, so a typo in the last algorithm costs nothing.

Each run's pretraining and linear evaluation run in a child process (``python -m
ssl_suite.engine.compare RUN_DIR``), so Accelerate's process state and memory stay apart and the
peak memory is the run's own (``ru_maxrss`` of the child, or ``torch.cuda.max_memory_allocated``
on CUDA). Beside the usual files the run directory holds:

* ``compare_spec.json``: what the child runs (written by the parent),
* ``compare_result.json``: the child's record, written atomically after each stage:
  ``status`` ``pretrained`` / ``done`` / ``failed`` (with the one-line ``error``), the
  pretraining summary read back from ``metrics.jsonl`` and the linear-evaluation numbers,
* ``compare.log``: the child's output (appended over attempts).

Resuming is deciding per run from those files: ``done`` is skipped; ``failed`` (a one-line user
error: a diverged loss, a refused configuration) is skipped and shown as failed unless
``--retry-failed``; ``pretrained`` does only the linear evaluation; a run directory with
checkpoints continues with ``pretrain --resume`` semantics; anything else starts afresh. A
failed run never stops the others; the command exits with status 1 when any run failed.

Outputs in ``OUT_DIR``: ``compare.csv`` (one row per algorithm, mean and sample standard
deviation over the finished seeds in separate columns), ``compare.md`` (the same as a Markdown
table, ``0.912 ± 0.004``, and the failures' messages under it) and ``compare.png`` (loss and kNN
top-1 against step and against wall-clock, one line per algorithm: the mean over its seeds).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Optional, Sequence

from ..config import (Config, ConfigError, EvalConfig, _f, _sub, build_config, load_config,
                      read_yaml, to_dict)
from ..errors import NonFiniteLossError, SSLSuiteError
from .metrics import read_metrics
from .eval_common import eval_config_for

SPEC_FILE = "compare_spec.json"
RESULT_FILE = "compare_result.json"
LOG_FILE = "compare.log"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# (column, header in compare.md, number format); every metric has _mean and _std in compare.csv
METRICS: list[tuple[str, str, str]] = [
    ("final_loss", "final loss", "{:.4f}"),
    ("knn_top1", "kNN top-1", "{:.3f}"),
    ("linear_top1", "linear top-1", "{:.3f}"),
    ("wall_s", "wall-clock (s)", "{:.1f}"),
    ("peak_mem_mb", "peak memory (MB)", "{:.0f}"),
    ("steps_per_s", "steps/s", "{:.2f}"),
]
CSV_COLUMNS = (["algorithm", "status", "n_seeds", "n_done"]
               + [f"{m}_{s}" for m, _, _ in METRICS for s in ("mean", "std")]
               + ["error", "overrides"])


# --------------------------------------------------------------------------------------------
# The comparison file


@dataclass
class PretrainSection:
    """The pretraining every run shares."""

    config: Optional[str] = _f(None, help="base pretraining YAML (e.g. configs/quickstart.yaml)")
    overrides: list[str] = _f([], help="dotted overrides applied to every run")


@dataclass
class EvalSection:
    """The linear evaluation every run gets (``ssl-suite linear-eval``'s config)."""

    config: Optional[str] = _f(None, help="evaluation YAML (e.g. configs/eval_quickstart.yaml)")
    overrides: list[str] = _f([], help="dotted overrides of the evaluation config")


@dataclass
class AlgorithmEntry:
    """One row of the table: a label and the overrides that make the algorithm."""

    name: str = _f("", help="label: the row name and the folder OUT_DIR/<name>")
    overrides: list[str] = _f([], help="dotted pretraining overrides (optim.name=adamw, ...)")


@dataclass
class CompareConfig:
    """A comparison: base pretraining, evaluation, seeds, output folder, algorithms."""

    out_dir: str = _f("runs/compare", help="one folder per algorithm and seed, and the table")
    seeds: list[int] = _f([0], help="every algorithm runs once per seed")
    pretrain: PretrainSection = _sub(PretrainSection)
    eval: EvalSection = _sub(EvalSection)
    algorithms: list[AlgorithmEntry] = _f([], help="the rows of the table")


@dataclass
class RunSpec:
    """One (algorithm, seed) run, validated: its config and evaluation config."""

    algorithm: str
    seed: int
    run_dir: Path
    base_config: str
    overrides: list[str]
    eval_config: Optional[str]
    eval_overrides: list[str]
    cfg: Config
    eval_cfg: EvalConfig

    @property
    def label(self) -> str:
        return f"{self.algorithm}/seed{self.seed}"


def _resolve_path(value: str, key: str, base_dir: Path) -> str:
    """An existing file: as given (relative to the working directory) or relative to the
    comparison file's folder; absolute, so the children find it from anywhere."""
    for p in (Path(value), base_dir / value):
        if p.is_file():
            return str(p.resolve())
    raise ConfigError(f"{key}: file not found: {value}")


def load_compare_config(path: str | Path) -> CompareConfig:
    """The comparison file, type-checked field by field (:class:`ConfigError`, one line naming
    the key, for anything wrong); paths resolved."""
    raw = read_yaml(path)
    cc = build_config(raw, None, cls=CompareConfig)
    base_dir = Path(path).resolve().parent
    if cc.pretrain.config is None:
        raise ConfigError("pretrain.config: required (the base pretraining YAML)")
    cc.pretrain.config = _resolve_path(cc.pretrain.config, "pretrain.config", base_dir)
    if cc.eval.config is not None:
        cc.eval.config = _resolve_path(cc.eval.config, "eval.config", base_dir)
    if not cc.algorithms:
        raise ConfigError("algorithms: give at least one {name, overrides} entry")
    if not cc.seeds:
        raise ConfigError("seeds: give at least one seed")
    if len(set(cc.seeds)) != len(cc.seeds) or any(s < 0 for s in cc.seeds):
        raise ConfigError(f"seeds: {cc.seeds} must be distinct non-negative integers")
    seen: set[str] = set()
    for i, a in enumerate(cc.algorithms):
        if not _NAME_RE.match(a.name):
            raise ConfigError(f"algorithms[{i}].name: {a.name!r} must be a non-empty folder name "
                              "(letters, digits, _ . + -)")
        if a.name in seen:
            raise ConfigError(f"algorithms[{i}].name: {a.name!r} appears twice")
        seen.add(a.name)
    return cc


def _check_optimizer(cfg: Config) -> None:
    """Build the run's optimizer over a tiny module: an unknown name or constructor keyword is
    found now, not after the other runs (other construction problems are left to the run)."""
    import torch
    from ..optim import OptimizerError, create_optimizer
    try:
        create_optimizer({"encoder": torch.nn.Linear(2, 2)}, cfg.optim, cfg.train.batch_size,
                         num_samples=1000, epochs=cfg.train.epochs, total_steps=10)
    except OptimizerError as e:
        raise ConfigError(str(e)) from None
    except Exception:   # noqa: BLE001 - a dummy module is not the run's; the run will tell
        pass


def _first_difference(a: Any, b: Any, key: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{key}: {b!r} there, {a!r} here"


def _check_existing_run(spec: RunSpec) -> None:
    """A run directory left by an earlier invocation must hold the same experiment."""
    saved = spec.run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = to_dict(load_config(saved))
    except ConfigError:
        old = {}
    new = to_dict(spec.cfg)
    old["run_dir"] = new["run_dir"]
    diff = _first_difference(new, old)
    if diff:
        raise ConfigError(f"algorithms[{spec.algorithm}]: {spec.run_dir} was pretrained with "
                          f"another config ({diff}); delete it or choose another --out-dir")


def plan_runs(cc: CompareConfig, cli_overrides: Sequence[str] = (),
              only: Optional[Sequence[str]] = None) -> list[RunSpec]:
    """Every (algorithm, seed) run with its validated config; the first problem raises
    :class:`ConfigError` naming the algorithm and the key, before anything has run."""
    names = [a.name for a in cc.algorithms]
    for n in only or []:
        if n not in names:
            raise ConfigError(f"--only: {n!r} is not an algorithm of the file "
                              f"({', '.join(names)})")
    base = read_yaml(cc.pretrain.config)
    out = Path(cc.out_dir)
    specs = []
    for a in cc.algorithms:
        if only and a.name not in only:
            continue
        for seed in cc.seeds:
            run_dir = out / a.name / f"seed{seed}"
            overrides = (list(cc.pretrain.overrides) + list(a.overrides) + list(cli_overrides)
                         + [f"run_dir={run_dir}", f"seed={seed}", "train.progress=false"])
            try:
                cfg = build_config(copy.deepcopy(base), overrides)   # it edits nested dicts
                if seed == cc.seeds[0]:
                    from .phases import check_combination
                    check_combination(cfg.model.weight_norm, cfg.growth.enabled,
                                      cfg.sparsity.enabled, wrs=cfg.optim.wrs,
                                      log_elr=cfg.train.log_elr)
                    _check_optimizer(cfg)
                eval_cfg = eval_config_for(cfg, cc.eval.config,
                                        list(cc.eval.overrides) + ["progress=false"])
            except ConfigError as e:
                raise ConfigError(f"algorithms[{a.name}]: {e}") from None
            spec = RunSpec(a.name, seed, run_dir, cc.pretrain.config, overrides, cc.eval.config,
                           list(cc.eval.overrides) + ["progress=false"], cfg, eval_cfg)
            _check_existing_run(spec)
            specs.append(spec)
    return specs


# --------------------------------------------------------------------------------------------
# Run state, files


def _write_json(path: Path, obj: dict) -> None:
    """Atomic: a temporary file renamed over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_result(run_dir: str | Path) -> dict:
    """A run's ``compare_result.json`` ({} if absent or torn)."""
    path = Path(run_dir) / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_action(spec: RunSpec, retry_failed: bool = False) -> str:
    """What a run still needs: ``skip`` (done, or failed and not retried), ``eval`` (pretraining
    finished: not evaluated yet, evaluation failed or crashed, or evaluated under another
    evaluation config), ``resume`` (checkpoints exist) or ``fresh``."""
    from . import checkpoint as ckpt
    rec = read_result(spec.run_dir)
    status = rec.get("status")
    if status == "done":
        return "skip" if rec.get("eval_config") == to_dict(spec.eval_cfg) else "eval"
    if status == "failed" and not retry_failed:
        return "skip"
    if rec.get("pretrain"):   # written once pretraining has finished
        return "eval"
    return "resume" if ckpt.list_checkpoints(spec.run_dir) else "fresh"


def summarize_metrics(run_dir: str | Path, batch_size: int) -> dict[str, Any]:
    """Pretraining numbers of a run, read back from its ``metrics.jsonl`` (so they hold across
    resumes): ``steps``, ``final_loss`` (the last logged loss), ``knn_init`` / ``knn_top1`` (kNN
    top-1 at step 0 and at the last step), ``wall_s`` (seconds since the run began, kNN monitors
    included), ``train_s`` (time of the logged training intervals, from their images/s: kNN
    monitors excluded) and ``steps_per_s`` = steps / train_s."""
    recs = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl")
            if isinstance(r.get("step"), (int, float))]
    logs = sorted((r for r in recs if isinstance(r.get("loss"), (int, float))),
                  key=lambda r: r["step"])
    knn = sorted((r for r in recs if isinstance(r.get("knn_top1"), (int, float))),
                 key=lambda r: r["step"])
    steps = max((int(r["step"]) for r in recs), default=0)
    train_s, prev = 0.0, 0
    for r in logs:
        ips = r.get("images_per_s")
        if isinstance(ips, (int, float)) and ips > 0:
            train_s += (r["step"] - prev) * batch_size / ips
        prev = r["step"]
    walls = [r["wall_s"] for r in recs if isinstance(r.get("wall_s"), (int, float))]
    return {
        "steps": steps,
        "final_loss": logs[-1]["loss"] if logs else None,
        "knn_init": knn[0]["knn_top1"] if knn and knn[0]["step"] == 0 else None,
        "knn_top1": knn[-1]["knn_top1"] if knn and knn[-1]["step"] > 0 else None,
        "wall_s": max(walls) if walls else None,
        "train_s": train_s or None,
        "steps_per_s": steps / train_s if train_s > 0 else None,
    }


# --------------------------------------------------------------------------------------------
# The child process: one run's pretraining (fresh or resumed) and linear evaluation


def _peak_memory_mb() -> tuple[float, str]:
    """Peak memory of this process: CUDA allocations when CUDA was used, else the resident set."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # kilobytes on Linux
    return kb / (2**20 if sys.platform == "darwin" else 2**10), "rss"


def _clean_fresh(run_dir: Path) -> None:
    """Files a run killed before its first checkpoint left behind (it restarts from step 0)."""
    for name in ("metrics.jsonl", "results.csv", RESULT_FILE):
        (run_dir / name).unlink(missing_ok=True)


def child_main(run_dir: str) -> int:
    """``python -m ssl_suite.engine.compare RUN_DIR``: run what ``RUN_DIR/compare_spec.json``
    asks (``action`` fresh / resume / eval) and record it in ``compare_result.json``. Exit status
    0, or 2 (user error) / 3 (non-finite loss) with the one-line error recorded."""
    from ..cli import _setup_logging, _user_errors
    _setup_logging()
    rdir = Path(run_dir)
    spec = json.loads((rdir / SPEC_FILE).read_text())
    action = spec["action"]
    rec = read_result(rdir) if action == "eval" else {}
    rec.update(algorithm=spec["algorithm"], seed=spec["seed"], error=None)
    t0 = time.perf_counter()
    stage = "pretrain"
    try:
        if action in ("fresh", "resume"):
            from .pretrain import pretrain, resume_config
            if action == "resume":
                cfg = resume_config(str(rdir))
                pretrain(cfg, resume_dir=str(rdir))
            else:
                _clean_fresh(rdir)
                cfg = build_config(read_yaml(spec["base_config"]), spec["overrides"])
                pretrain(cfg)
            peak, kind = _peak_memory_mb()
            summary = summarize_metrics(rdir, cfg.train.batch_size)
            summary["peak_mem_mb"], summary["peak_mem_kind"] = peak, kind
            rec.update(status="pretrained", stage="pretrain", pretrain=summary)
            _write_json(rdir / RESULT_FILE, rec)
        stage = "eval"
        from .linear_eval import linear_eval
        from .runs import run_config
        run_cfg = run_config(rdir)
        eval_cfg = eval_config_for(run_cfg, spec["eval_config"], spec["eval_overrides"])
        res = linear_eval(str(rdir), eval_cfg, run_cfg)
        rec.update(status="done", stage="eval", eval_config=to_dict(eval_cfg),
                   linear={"top1": res["top1"], "top5": res["top5"], "lr": res["lr"]})
        rec["child_s"] = rec.get("child_s", 0.0) + time.perf_counter() - t0
        _write_json(rdir / RESULT_FILE, rec)
        print(f"compare: {spec['algorithm']} seed {spec['seed']}: linear top-1 {res['top1']:.4f}")
        return 0
    except _user_errors() as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        rec.update(status="failed", stage=stage, error=msg)
        _write_json(rdir / RESULT_FILE, rec)
        print(f"ssl-suite: error: {msg}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLossError) else 2


# --------------------------------------------------------------------------------------------
# The parent: plan, run the children, table, plot


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def launch(spec: RunSpec, action: str) -> int:
    """Run one child for ``spec`` (output appended to ``RUN_DIR/compare.log``); its exit status.
    A child that dies without recording an error (killed, crashed) is recorded as ``crashed``,
    which the next invocation retries."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(spec.run_dir / SPEC_FILE, {
        "algorithm": spec.algorithm, "seed": spec.seed, "action": action,
        "base_config": spec.base_config, "overrides": spec.overrides,
        "eval_config": spec.eval_config, "eval_overrides": spec.eval_overrides})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = spec.run_dir / LOG_FILE
    with log.open("a") as f:
        f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {action}\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "ssl_suite.engine.compare",
                              str(spec.run_dir)], stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        rec = read_result(spec.run_dir)
        if rec.get("status") != "failed":
            rec.update(algorithm=spec.algorithm, seed=spec.seed, status="crashed",
                       error=f"exit status {rc}: {_last_line(log)}")
            _write_json(spec.run_dir / RESULT_FILE, rec)
    return rc


def _stats(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    return mean(vals), (stdev(vals) if len(vals) > 1 else None)


def table_rows(cc: CompareConfig, specs: list[RunSpec]) -> list[dict[str, Any]]:
    """One row per algorithm (file order): mean and sample std over its finished seeds of
    :data:`METRICS`, the seed counts, the status and the first failure's message."""
    rows = []
    by_algo: dict[str, list[RunSpec]] = {}
    for s in specs:
        by_algo.setdefault(s.algorithm, []).append(s)
    overrides = {a.name: a.overrides for a in cc.algorithms}
    for name, runs in by_algo.items():
        recs = [read_result(s.run_dir) for s in runs]
        done = [r for r in recs if r.get("status") == "done"]
        failed = [r for r in recs if r.get("status") in ("failed", "crashed")]
        status = "ok" if len(done) == len(runs) else \
            "failed" if failed and not done else \
            f"{len(failed)}/{len(runs)} failed" if failed else "incomplete"
        row: dict[str, Any] = {"algorithm": name, "status": status, "n_seeds": len(runs),
                               "n_done": len(done),
                               "error": failed[0].get("error") if failed else "",
                               "overrides": " ".join(overrides.get(name, []))}
        for key, _, _ in METRICS:
            if key == "linear_top1":
                vals = [(r.get("linear") or {}).get("top1") for r in done]
            else:
                vals = [(r.get("pretrain") or {}).get(key) for r in done]
            row[f"{key}_mean"], row[f"{key}_std"] = _stats(vals)
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def _cell(m: Optional[float], s: Optional[float], fmt: str) -> str:
    if m is None:
        return "–"
    return fmt.format(m) + (f" ± {fmt.format(s)}" if s is not None else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (``mean ± std``; a single seed shows the mean), the failures'
    one-line errors listed under it."""
    head = ["algorithm", "status", "seeds"] + [h for _, h, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["algorithm"], r["status"], f"{r['n_done']}/{r['n_seeds']}"]
        cells += [_cell(r[f"{k}_mean"], r[f"{k}_std"], fmt) for k, _, fmt in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['algorithm']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        lines += ["", "Failures:", ""] + errors
    return "\n".join(lines) + "\n"


def _seed_curves(run_dir: Path, key: str) -> dict[float, tuple[float, float]]:
    """step -> (wall-clock s, value) of ``key`` in a run's ``metrics.jsonl`` ({} if none)."""
    from ..plots import _series
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    recs = [r for r in read_metrics(path) if isinstance(r.get("step"), (int, float))]
    wall = dict(zip(*_series(recs, "wall_s")))
    return {st: (wall.get(st, math.nan), v) for st, v in zip(*_series(recs, key))}


def mean_curve(per_seed: list[dict[float, tuple[float, float]]]) -> tuple[list, list, list]:
    """(steps, wall-clock, values): the mean over seeds at the steps every seed logged."""
    per_seed = [c for c in per_seed if c]
    if not per_seed:
        return [], [], []
    steps = sorted(set(per_seed[0]).intersection(*per_seed[1:]))
    wall = [mean(c[s][0] for c in per_seed) for s in steps]
    vals = [mean(c[s][1] for c in per_seed) for s in steps]
    return steps, wall, vals


def plot_comparison(specs: list[RunSpec], out: str | Path) -> Path:
    """``compare.png``: BYOL loss (top) and kNN top-1 (bottom) against optimizer step (left) and
    against wall-clock seconds since the run began (right), one line per algorithm: the mean
    over its seeds that have a ``metrics.jsonl``; dashed where the algorithm has a failed run."""
    from ..plots import _figure, _knn_axis, _log_if_wide
    fig = _figure((15, 9))
    axes = fig.subplots(2, 2)
    fig.suptitle(f"{Path(out).resolve().parent.name}: mean over seeds", fontweight="bold")
    by_algo: dict[str, list[RunSpec]] = {}
    for s in specs:
        by_algo.setdefault(s.algorithm, []).append(s)
    if len(by_algo) <= 10:
        colours = [f"C{i}" for i in range(len(by_algo))]
    else:
        from matplotlib import colormaps
        colours = [colormaps["tab20"](i % 20) for i in range(len(by_algo))]
    all_loss: list[float] = []
    for i, (name, runs) in enumerate(by_algo.items()):
        failed = any(read_result(s.run_dir).get("status") in ("failed", "crashed") for s in runs)
        style = dict(color=colours[i], lw=1.2, label=name + (" (failed)" if failed else ""),
                     ls="--" if failed else ("-", "-.", ":")[i // 20 % 3])
        steps, wall, loss = mean_curve([_seed_curves(s.run_dir, "loss") for s in runs])
        all_loss += loss
        axes[0][0].plot(steps, loss, **style)
        axes[0][1].plot(wall, loss, **style)
        steps, wall, knn = mean_curve([_seed_curves(s.run_dir, "knn_top1") for s in runs])
        axes[1][0].plot(steps, knn, marker="o", ms=3, **style)
        axes[1][1].plot(wall, knn, marker="o", ms=3, **style)
    if all_loss:
        for ax in axes[0]:
            _log_if_wide(ax, all_loss)
    for ax in axes[0]:
        ax.set_ylabel("BYOL loss")
    for ax in axes[1]:
        _knn_axis(ax)
    for ax in axes[:, 0]:
        ax.set_xlabel("optimizer step")
    for ax in axes[:, 1]:
        ax.set_xlabel("wall-clock since the run began (s)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8,
               ncols=1 if len(labels) <= 24 else 2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def compare(config_path: str, cli_overrides: Sequence[str] = (), out_dir: Optional[str] = None,
            seeds: Optional[Sequence[int]] = None, only: Optional[Sequence[str]] = None,
            retry_failed: bool = False, progress: bool = True) -> int:
    """The whole command: validate every run, run what is missing, write ``compare.csv``,
    ``compare.md`` and ``compare.png`` in the output folder, print the table; 0 when every run
    finished, 1 when some failed (their errors are in the table)."""
    from tqdm.auto import tqdm
    cc = load_compare_config(config_path)
    if out_dir is not None:
        cc.out_dir = out_dir
    if seeds:
        cc.seeds = list(seeds)
    specs = plan_runs(cc, cli_overrides, only)
    out = Path(cc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    actions = [(s, run_action(s, retry_failed)) for s in specs]
    bar = tqdm(actions, desc="compare", unit="run", disable=not progress, dynamic_ncols=True)
    for spec, action in bar:
        bar.set_postfix_str(spec.label)
        if action == "skip":
            status = read_result(spec.run_dir).get("status")
            bar.write(f"{spec.label}: skipped ({status})", file=sys.stderr)
            continue
        what = {"fresh": "pretraining + linear eval", "resume": "resuming pretraining",
                "eval": "linear eval only"}[action]
        bar.write(f"{spec.label}: {what} -> {spec.run_dir}", file=sys.stderr)
        t0 = time.perf_counter()
        rc = launch(spec, action)
        rec = read_result(spec.run_dir)
        if rc == 0:
            bar.write(f"{spec.label}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        else:
            bar.write(f"{spec.label}: {rec.get('status')}: {rec.get('error')}", file=sys.stderr)
    bar.close()
    rows = table_rows(cc, specs)
    write_csv(rows, out / "compare.csv")
    md = markdown_table(rows)
    (out / "compare.md").write_text(md)
    png = None
    try:
        png = plot_comparison(specs, out / "compare.png")
    except SSLSuiteError as e:   # no matplotlib: the table is still written
        print(f"ssl-suite: warning: no plot: {e}", file=sys.stderr)
    print(md, end="")
    print(f"written: {out / 'compare.csv'}, {out / 'compare.md'}" + (f", {png}" if png else ""))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":  # the child process of one run
    sys.exit(child_main(sys.argv[1]))
