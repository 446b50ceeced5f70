"""``ssl-suite <job> --config FILE key=value ...`` (also ``python -m ssl_suite``).

Jobs:
  pretrain     BYOL pretraining; ``--resume RUN_DIR`` continues a run from its last checkpoint.
  linear-eval  linear classifier on the frozen encoder of a run (cached or augmented protocol)
  finetune     semi-supervised fine-tuning on a fraction of the labels (1%, 10%, any)
  knn          weighted kNN accuracy of a run's encoder
  export       the online encoder to safetensors + JSON sidecar, loadable by timm
  plot         PNG curves of one run's metrics.jsonl, or a comparison of several runs
  optimizers   every optimizer name a config accepts, with a one-line description

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
    return p


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
    except NonFiniteLossError as e:
        print(f"ssl-suite: error: {e}", file=sys.stderr)
        return 3
    except _user_errors() as e:
        print(f"ssl-suite: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
