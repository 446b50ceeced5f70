"""Generic Adam demonstrations (Zou et al. CVPR 2019; Chen et al. JMLR 2022), seconds on a CPU.

1. Reddi et al.'s Theorem 1 problem: f_t(x) = C x if t mod 3 = 1, -x otherwise, x in [-1, 1],
   C = 3, beta1 = 0, alpha_t = alpha/sqrt(t). Adam with constant beta2 = 1/(1+C^2) (r = 0) drifts to
   x = +1, the worst point, with average regret that does not vanish; Generic Adam with the same
   constants but theta_t = 1 - beta/t (r = 1, meets the sufficient condition) goes to x* = -1.
2. Mini-batch Generic Adam on noisy linear regression: mean ||grad F(x_t)||^2 over T steps for
   batch 1, 4, 16, 64.

    python scripts/demo_generic_adam.py [--steps 3000] [--C 3] [--alpha 0.5] [--out demo.png]
"""

from __future__ import annotations

import argparse
import sys
import time

from ssl_suite.analysis import (check_sufficient_condition, minibatch_stationarity, reddi_adam,
                                reddi_beta2, reddi_counterexample, reddi_generic_adam)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="online rounds (default 3000)")
    ap.add_argument("--C", type=float, default=3.0, help="Reddi's C > 2 (default 3)")
    ap.add_argument("--alpha", type=float, default=0.5, help="alpha in alpha_t = alpha/sqrt(t)")
    ap.add_argument("--minibatch-steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="PNG for x_t of both runs (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.C <= 2:
        ap.error("--C must be > 2 (otherwise x* is not -1)")

    t_start = time.perf_counter()
    beta2 = reddi_beta2(args.C)
    runs = {
        f"Adam, theta = beta2 = {beta2:.4g} (r = 0)": (reddi_adam(args.C, args.alpha), 0.0),
        f"Generic Adam, theta_t = 1 - {1 - beta2:.4g}/t (r = 1)":
            (reddi_generic_adam(args.C, args.alpha, 1.0), 1.0),
    }
    print(f"Reddi et al. Thm 1: f_t(x) = {args.C:g}x (t mod 3 = 1), -x otherwise; x in [-1, 1]; "
          f"x* = -1; beta1 = 0, alpha_t = {args.alpha:g}/sqrt(t), x_1 = 0")
    results = {}
    for label, (factory, r) in runs.items():
        report = check_sufficient_condition(0.5, r, 0.0, 1.0 - beta2)
        results[label] = run = reddi_counterexample(factory, args.steps, C=args.C)
        marks = [t for t in (10, 100, 1000, 10000, 100000) if t <= args.steps] + [args.steps]
        xs = "  ".join(f"x_{t + 1}={float(run.x[t]):+.3f}" for t in dict.fromkeys(marks))
        verdict = "MET" if report.ok else "NOT MET: " + ", ".join(report.failed)
        print(f"  {label}\n    condition {verdict}"
              f"\n    {xs}\n    average regret R_T/T = {float(run.avg_regret[-1]):.4f}")

    print(f"\nMini-batch Generic Adam (s = 1/2, r = 1), noisy linear regression, "
          f"T = {args.minibatch_steps}: mean_t ||grad F(x_t)||^2")
    table = minibatch_stationarity(steps=args.minibatch_steps)
    base = table[min(table)]
    print("  batch   mean ||grad F||^2   ratio to batch 1")
    for b, v in table.items():
        print(f"  {b:>5}   {v:>17.4f}   {v / base:>16.3f}")
    print(f"\n({time.perf_counter() - t_start:.2f} s)")

    if args.out:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'ssl_suite[plots]')")
            return 0
        fig = Figure(figsize=(7, 3.2), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for label, run in results.items():
            ax.plot(range(1, len(run.x) + 1), run.x.numpy(), label=label, lw=1)
        ax.axhline(-1.0, color="k", lw=0.5, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel("x_t")
        ax.set_title(f"Reddi et al. counterexample, C = {args.C:g}: x* = -1")
        ax.legend(fontsize=8)
        fig.savefig(args.out)
        print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
