"""``ssl-suite <job> --config FILE key=value ...`` (also ``python -m ssl_suite``).

Jobs:
  pretrain   BYOL pretraining; ``--resume RUN_DIR`` continues a run from its last checkpoint.

A configuration, data or checkpoint problem ends the command with one line on stderr naming what
was wrong, exit status 2; a diverging run (non-finite loss) exits with status 3.
"""

from __future__ import annotations

import argparse
import logging
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
    return p


def _setup_logging() -> None:
    import os
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
    import os
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
    except NonFiniteLossError as e:
        print(f"ssl-suite: error: {e}", file=sys.stderr)
        return 3
    except _user_errors() as e:
        print(f"ssl-suite: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
