"""``ssl-suite <job> --config FILE key=value ...`` (also ``python -m ssl_suite``).

Jobs:
  pretrain     BYOL pretraining; ``--resume RUN_DIR`` continues a run from its last checkpoint.
  linear-eval  linear classifier on the frozen encoder of a run (cached or augmented protocol)
  finetune     semi-supervised fine-tuning on a fraction of the labels (1%, 10%, any)
  knn          weighted kNN accuracy of a run's encoder
  export       the online encoder to safetensors + JSON sidecar, loadable by timm
  plot         PNG curves of one run's metrics.jsonl, or a comparison of several runs
  optimizers   every optimizer name a config accepts, with a one-line description
  analyze      ``analyze hessian --run RUN``: Hessian spectrum (lambda_max, SLQ density) of the
               BYOL loss, full- and mini-batch; ``analyze flatness --run RUN``: local-energy curve
  compare      the same pretraining + linear evaluation for a list of algorithms and seeds:
               a table (CSV, Markdown) and a plot; resumable (``--config configs/compare_*.yaml``)

A configuration, data or checkpoint problem ends the command with one line on stderr naming what
was wrong, exit status 2; a diverging run (non-finite loss) exits with status 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .config import ConfigError, load_config
from .errors import NonFiniteLossError, SSLSuiteError


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .models import BackboneError
    from .optim import OptimizerError
    return (ConfigError, SSLSuiteError, DataError, BackboneError, OptimizerError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl-suite", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="job", required=True)
    pre = sub.add_parser("pretrain", help="BYOL pretraining")
    pre.add_argument("--config", help="YAML experiment file (configs/*.yaml)")
    pre.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    pre.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides, e.g. train.epochs=10 train.precision=bf16")
    for job, helptext in (("linear-eval", "linear evaluation of a run's frozen encoder"),
                          ("finetune", "semi-supervised fine-tuning of a run's encoder"),
                          ("knn", "weighted kNN accuracy of a run's encoder")):
        e = sub.add_parser(job, help=helptext)
        e.add_argument("--run", required=True, metavar="RUN_DIR", help="a pretraining run")
        e.add_argument("--config", help="YAML with data/linear/finetune/knn sections")
        e.add_argument("--random-init", action="store_true",
                       help="evaluate the same encoder at its random initialisation (baseline)")
        e.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. data.label_fraction=0.01 linear.mode=augmented")
    ex = sub.add_parser("export", help="online encoder -> safetensors + JSON sidecar for timm")
    ex.add_argument("--run", required=True, metavar="RUN_DIR")
    ex.add_argument("--out", required=True, metavar="FILE", help="e.g. encoder.safetensors")
    ex.add_argument("--network", choices=("online", "target"), default="online")
    sub.add_parser("optimizers", help="every optimizer name a config accepts, with its paper")
    pl = sub.add_parser("plot", help="PNG curves from metrics.jsonl (extra: plots)")
    pl.add_argument("runs", nargs="+", metavar="RUN")
    pl.add_argument("--out", metavar="FILE")
    an = sub.add_parser("analyze", help="curvature and flatness of a run (CSV + PNG in "
                                        "RUN/analysis)")
    asub = an.add_subparsers(dest="what", required=True)
    for what, helptext in (("hessian", "Hessian spectrum of the BYOL loss: lambda_max, SLQ "
                                       "density, full batch vs mini-batch (Granziol et al. 2022)"),
                           ("flatness", "local energy under multiplicative weight noise "
                                        "(Pittorino et al. 2021)")):
        a = asub.add_parser(what, help=helptext)
        a.add_argument("--run", required=True, metavar="RUN_DIR")
        a.add_argument("--out", metavar="DIR", help="default RUN_DIR/analysis")
        a.add_argument("--batch-size", type=int, default=128 if what == "hessian" else 256)
        a.add_argument("--num-batches", type=int, default=4)
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--device", default=None, help="default: cuda when available")
        a.add_argument("--no-progress", action="store_true")
        if what == "hessian":
            a.add_argument("--lanczos-steps", type=int, default=30)
            a.add_argument("--probes", type=int, default=2)
            a.add_argument("--bn-mode", choices=("train", "eval"), default="train")
        else:
            a.add_argument("--sigmas", type=float, nargs="+",
                           default=[0.0, 0.01, 0.02, 0.05, 0.1])
            a.add_argument("--samples", type=int, default=4)
            a.add_argument("--bn", choices=("eval", "batch"), default="eval")
    cmp = sub.add_parser("compare", help="the same pretraining + linear evaluation for several "
                                         "algorithms and seeds: table and plot (resumable)")
    cmp.add_argument("--config", required=True, help="comparison YAML (configs/compare_*.yaml)")
    cmp.add_argument("--out-dir", metavar="DIR", help="instead of the file's out_dir")
    cmp.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                     help="instead of the file's seeds")
    cmp.add_argument("--only", nargs="+", metavar="NAME", help="run only these algorithms")
    cmp.add_argument("--retry-failed", action="store_true",
                     help="run again the runs that failed with an error (skipped otherwise)")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.add_argument("overrides", nargs="*", metavar="key=value",
                     help="pretraining overrides for every run, after the algorithms' own "
                          "(e.g. data.root=/data/cifar10 train.epochs=2)")
    return p


def run_analyze(args: argparse.Namespace) -> int:
    common = dict(batch_size=args.batch_size, num_batches=args.num_batches, seed=args.seed,
                  out=args.out, progress=not args.no_progress, device=args.device)
    try:
        if args.what == "hessian":
            from .analysis.hessian import hessian_job
            res = hessian_job(args.run, lanczos_steps=args.lanczos_steps, probes=args.probes,
                              bn_mode=args.bn_mode, **common)
            full, mini = res.get("full", {}), res.get("mini", {})
            print(f"lambda_max: full batch {full.get('lambda_max', float('nan')):.4g}, "
                  f"mini-batch (B={args.batch_size}) {mini.get('lambda_max', float('nan')):.4g}"
                  f"  -- written to {args.out or os.path.join(args.run, 'analysis')}")
        else:
            from .analysis.flatness import flatness_job
            res = flatness_job(args.run, sigmas=tuple(args.sigmas), samples=args.samples,
                               bn=args.bn, **common)
            for name, m in res["metrics"].items():
                pts = ", ".join(f"{s:g}: {d:+.4g}" for s, d in zip(res["sigmas"], m["delta"]))
                print(f"{name} increase by sigma: {pts}")
            print(f"written: {res['csv']}, {res['png']}")
    except ValueError as e:   # the jobs' bad-input errors are one-line ValueErrors
        raise _AnalyzeError(str(e)) from None
    return 0


class _AnalyzeError(SSLSuiteError):
    pass


def run_eval(args: argparse.Namespace) -> int:
    from .engine.eval_common import eval_config
    cfg, run_cfg = eval_config(args.run, args.config, args.overrides)
    if args.job == "linear-eval":
        from .engine.linear_eval import linear_eval
        res = linear_eval(args.run, cfg, run_cfg, random_init=args.random_init)
        what = f"linear evaluation ({cfg.linear.mode}, best lr {res.get('lr')})"
    elif args.job == "finetune":
        from .engine.finetune import finetune
        res = finetune(args.run, cfg, run_cfg, random_init=args.random_init)
        what = (f"fine-tuning on {res.get('labelled')} labelled images "
                f"({cfg.data.label_fraction:g} of the labels, best lr {res.get('lr')})")
    else:
        from .engine.knn import knn_job
        res = knn_job(args.run, cfg, run_cfg, random_init=args.random_init)
        what = f"kNN (k={cfg.knn.k}, t={cfg.knn.temperature:g})"
    if res and int(os.environ.get("RANK", "0")) == 0:
        init = " [random init]" if args.random_init else ""
        top5 = f", top-5 {res['top5']:.4f}" if "top5" in res else ""
        print(f"{args.job}{init} on the {cfg.data.name} test split: top-1 {res['top1']:.4f}"
              f"{top5}  -- {what}; row added to {args.run}/results.csv")
    return 0


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_pretrain(args: argparse.Namespace) -> int:
    from .engine.pretrain import pretrain, resume_config
    if args.resume:
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    result = pretrain(cfg, resume_dir=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {result.run_dir}  (steps: {result.step}, "
              f"final loss: {_fmt(result.final_loss)})")
        if result.knn_final is not None:
            print(f"kNN top-1 on the {cfg.data.name} test split (k={cfg.train.knn_k}, "
                  f"t={cfg.train.knn_temperature}): pretrained {_fmt(result.knn_final)}  vs  "
                  f"random init {_fmt(result.knn_init)}")
    return 0


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        if args.job == "pretrain":
            return run_pretrain(args)
        if args.job in ("linear-eval", "finetune", "knn"):
            return run_eval(args)
        if args.job == "export":
            from .export import main_export
            return main_export(args.run, args.out, args.network)
        if args.job == "optimizers":
            from .optim import list_all
            rows = list_all()
            width = max(len(n) for n, _ in rows)
            for name, desc in rows:
                print(f"{name:<{width}}  {desc}")
            return 0
        if args.job == "plot":
            from .plots import main_plot
            return main_plot(args.runs, args.out)
        if args.job == "analyze":
            return run_analyze(args)
        if args.job == "compare":
            from .engine.compare import compare
            return compare(args.config, args.overrides, out_dir=args.out_dir, seeds=args.seeds,
                           only=args.only, retry_failed=args.retry_failed,
                           progress=not args.no_progress)
    except NonFiniteLossError as e:
        print(f"ssl-suite: error: {e}", file=sys.stderr)
        return 3
    except _user_errors() as e:
        print(f"ssl-suite: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
