"""MBF (mini-block Fisher, [RECONSTRUCTION] of Bahamou, Goldfarb & Ren, AISTATS 2023) against Adam
at equal wall-clock on the small CNN of :mod:`ssl_suite.analysis.small_tasks` (sklearn digits).

Each optimizer trains the same model (same initialisation, same batches) for ``--seconds`` of
training time (evaluation excluded) at each learning rate of a small grid; the LR with the lowest
final training loss wins. Prints a table (steps done, final train loss, test accuracy) and plots
every winner's curves against seconds and steps. Under two minutes on one core with defaults.

    OMP_NUM_THREADS=1 python scripts/demo_mbf.py [--seconds 3] [--seed 0] [--out docs/mbf_demo.png]
"""

from __future__ import annotations

import argparse
import time

import torch

from ssl_suite.analysis import small_tasks
from ssl_suite.optim.mbf import MBF

GRIDS = {
    "MBF": (lambda params, lr: MBF(params, lr=lr), (0.003, 0.01, 0.03)),
    "Adam": (lambda params, lr: torch.optim.Adam(params, lr=lr), (0.001, 0.003, 0.01)),
}


def _time_to(curves, level: float) -> str:
    """Training seconds at the first evaluation point whose train loss is below ``level``."""
    for sec, loss in zip(curves.seconds, curves.train_loss):
        if loss < level:
            return f"{sec:.2f}"
    return "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="training seconds per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/mbf_demo.png", help="PNG of the winners' curves")
    ap.add_argument("--width", type=int, default=16, help="small_cnn width")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    data = small_tasks.digits(seed=args.seed)
    print(f"small_cnn(width={args.width}) on digits, batch {args.batch_size}, "
          f"{args.seconds:g} s of training per run, threads {torch.get_num_threads()}")
    print(f"{'optimizer':<8} {'lr':>7} {'steps':>6} {'train loss':>11} {'test acc':>9} "
          f"{'s to loss<0.1':>14}")
    winners = {}
    for name, (make, lrs) in GRIDS.items():
        best = None
        for lr in lrs:
            torch.manual_seed(args.seed)
            model = small_tasks.small_cnn(width=args.width)
            curves = small_tasks.train(model, make(model.parameters(), lr), data, steps=10**7,
                                       batch_size=args.batch_size, seed=args.seed,
                                       seconds=args.seconds, eval_every=25)
            loss = float("inf") if curves.diverged else curves.final_loss
            print(f"{name:<8} {lr:>7g} {curves.step[-1]:>6} {curves.final_loss:>11.2e} "
                  f"{curves.final_acc:>9.3f} {_time_to(curves, 0.1):>14}"
                  + ("  diverged" if curves.diverged else ""))
            if best is None or loss < best[0]:
                best = (loss, lr, curves)
        winners[f"{name} lr={best[1]:g}"] = best[2]
        print(f"  -> {name}: lr {best[1]:g} wins")
    print("\nwinners at equal wall-clock:")
    for label, c in winners.items():
        print(f"  {label:<16} steps {c.step[-1]:>5}  train loss {c.final_loss:.2e}  "
              f"test acc {c.final_acc:.3f}  ({c.step[-1] / c.seconds[-1]:.0f} steps/s)")
    if args.out:
        small_tasks.plot_curves(winners, args.out, x_axes=("seconds", "step"),
                                title=f"MBF vs Adam, digits small CNN, {args.seconds:g} s each")
        print(f"plot: {args.out}")
    print(f"({time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
