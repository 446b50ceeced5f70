"""Batch Hessian and the largest stable learning rate against batch size on digits (Granziol,
Zohren, Roberts, JMLR 2022), a few minutes on one CPU core.

Setting: the MLP of :mod:`ssl_suite.analysis.small_tasks` (64-32-32-10, ReLU, 3466 parameters) on
scikit-learn's digits (1437 training images), trained for ``--warm-steps`` SGD steps (lr 0.05,
B 32) from a seeded initialisation; everything below is measured at that point w0.

1. Curvature. lambda_max of the full-data Hessian (Lanczos, 30 steps) and of mini-batch Hessians
   H_B for B = 8 ... 1024 (``--probes`` random batches each, 20 steps; mean reported). The
   paper's outlier formula lambda'(B) = lambda + s / (B lambda) (spec §3.1) is fitted to the
   mini-batch values (:func:`~ssl_suite.analysis.lr_rules.fit_outlier_model`); the noise scale s
   is also estimated independently from the spread of H_b z over batches of 32
   (:func:`~ssl_suite.analysis.hessian.batch_hessian_noise`, s = B * hess_var).
2. Measured largest stable LR: bisection (in log lr, ``--bisect`` rounds) for the largest lr at
   which ``--run-steps`` steps of plain SGD (and of Adam) from w0 on seeded batches of size B keep
   the full-data loss finite and below 2x its value at w0.
3. Predictions for SGD: 2 / lambda_max(H_B) (the measured batch curvature), the paper's
   2 / lambda'(B) with the fitted (lambda, s) (linear in B below B* = s / lambda^2), and the pure
   linear and square-root rules anchored at the smallest B's measured value. For Adam the
   square-root rule (spec §3.2) anchored the same way.

Prints one table and writes ``docs/batch_hessian.png``.

    python scripts/study_batch_hessian.py [--probes 4] [--run-steps 100] [--runs 2]
                                          [--out docs/batch_hessian.png]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from ssl_suite.analysis import lr_rules, small_tasks
from ssl_suite.analysis.hessian import HessianOperator, batch_hessian_noise, lanczos

BATCHES = (8, 16, 32, 64, 128, 256, 512, 1024)


def batch_loss(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def full_loss(model, data) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data.x_train), data.y_train))


def stable(model, w0, data, opt_name, lr, batch_size, steps, seeds, limit) -> bool:
    """``steps`` steps of SGD/Adam from w0 at ``lr``, for each seed in ``seeds`` (its own batch
    sequence); stable if the full-data loss stays finite and below ``limit`` after every step
    of every run (so a loss spike that later recovers counts as unstable)."""
    n = len(data.y_train)
    for seed in seeds:
        model.load_state_dict(w0)
        opt = (torch.optim.SGD(model.parameters(), lr=lr) if opt_name == "sgd"
               else torch.optim.Adam(model.parameters(), lr=lr))
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(n, (batch_size,), generator=g)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            loss = full_loss(model, data)
            if not math.isfinite(loss) or loss > limit:
                return False
    return True


def max_stable_lr(model, w0, data, opt_name, batch_size, steps, rounds, lo, hi, seeds,
                  limit) -> float:
    """Largest stable lr by bisection in log space between ``lo`` (assumed stable) and ``hi``."""
    for _ in range(10):             # widen until hi is unstable
        if not stable(model, w0, data, opt_name, hi, batch_size, steps, seeds, limit):
            break
        lo, hi = hi, hi * 4
    for _ in range(10):             # and lo stable
        if stable(model, w0, data, opt_name, lo, batch_size, steps, seeds, limit):
            break
        lo, hi = lo / 4, lo
    for _ in range(rounds):
        mid = math.sqrt(lo * hi)
        if stable(model, w0, data, opt_name, mid, batch_size, steps, seeds, limit):
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def plot(path, rows, lam_full, fit, s_hvp):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bs = [r["B"] for r in rows]
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.errorbar(bs, [r["lam"] for r in rows], yerr=[r["lam_sd"] for r in rows], fmt="o",
                 color="C0", label="lambda_max(H_B), mean +- sd over batches")
    dense = [2 ** (k / 8) for k in range(8 * 3, 8 * 10 + 1)]
    ax1.plot(dense, [lr_rules.batch_outlier(fit[0], fit[1], b) for b in dense], color="C0",
             label=f"fit lambda + s/(B lambda): lambda={fit[0]:.3g}, s={fit[1]:.3g}")
    ax1.plot(dense, [lr_rules.batch_outlier(fit[0], s_hvp, b) for b in dense], color="C2", ls=":",
             label=f"same lambda, s from H_b z spread = {s_hvp:.3g}")
    ax1.axhline(lam_full, color="k", ls="--", lw=0.8, label=f"full data (N=1437): {lam_full:.3g}")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("batch size B")
    ax1.set_ylabel("top Hessian eigenvalue")
    ax1.legend(fontsize=7)
    ax2.plot(bs, [r["sgd"] for r in rows], "o-", color="C0", label="SGD measured")
    ax2.plot(bs, [2 / r["lam"] for r in rows], "s--", color="C0", alpha=0.6,
             label="SGD: 2 / lambda_max(H_B)")
    ax2.plot(bs, [r["paper"] for r in rows], color="C1",
             label="SGD: 2 / (lambda + s/(B lambda)) (fit)")
    ax2.plot(bs, [r["lin"] for r in rows], ":", color="C1", label="SGD: linear rule from B=8")
    ax2.plot(bs, [r["sqrt"] for r in rows], ":", color="C3", label="SGD: sqrt rule from B=8")
    ax2.plot(bs, [r["adam"] for r in rows], "^-", color="C2", label="Adam measured")
    ax2.plot(bs, [r["adam_sqrt"] for r in rows], ":", color="C2", label="Adam: sqrt rule from B=8")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("batch size B")
    ax2.set_ylabel("largest stable learning rate")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("digits MLP (3466 params): batch Hessian and maximal learning rates", fontsize=10)
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=4, help="random batches per B (default 4)")
    ap.add_argument("--warm-steps", type=int, default=300, help="SGD steps to w0 (default 300)")
    ap.add_argument("--run-steps", type=int, default=100,
                    help="steps per stability run (default 100)")
    ap.add_argument("--bisect", type=int, default=7, help="bisection rounds (default 7)")
    ap.add_argument("--runs", type=int, default=2,
                    help="batch sequences per stability test (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/batch_hessian.png", help="PNG ('' for none)")
    args = ap.parse_args(argv)
    if min(args.probes, args.run_steps, args.bisect, args.runs) < 1 or args.warm_steps < 0:
        ap.error("--probes, --run-steps and --bisect must be >= 1, --warm-steps >= 0")
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    data = small_tasks.digits(flat=True, seed=args.seed)
    torch.manual_seed(args.seed)
    model = small_tasks.small_mlp(64, hidden=32, depth=2)
    small_tasks.train(model, torch.optim.SGD(model.parameters(), lr=0.05), data,
                      args.warm_steps, batch_size=32, seed=args.seed, eval_every=10 ** 9)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    loss0 = full_loss(model, data)
    n = len(data.y_train)

    full_op = HessianOperator(params, batch_loss(model, data.x_train, data.y_train))
    lam_full = lanczos(full_op, 30, seed=args.seed).lambda_max
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for b in BATCHES:
        lams = []
        for r in range(args.probes):
            idx = torch.randperm(n, generator=g)[:b]
            op = HessianOperator(params, batch_loss(model, data.x_train[idx], data.y_train[idx]))
            lams.append(lanczos(op, 20, seed=args.seed + r).lambda_max)
        t = torch.tensor(lams)
        rows.append({"B": b, "lam": float(t.mean()),
                     "lam_sd": float(t.std()) if len(lams) > 1 else 0.0})
    fit = lr_rules.fit_outlier_model([r["B"] for r in rows], [r["lam"] for r in rows])
    perm = torch.randperm(n, generator=g)
    fns = [batch_loss(model, data.x_train[perm[i * 32:(i + 1) * 32]],
                      data.y_train[perm[i * 32:(i + 1) * 32]]) for i in range(16)]
    s_hvp = lr_rules.noise_scale_from_hvp_variance(
        batch_hessian_noise(params, fns, seed=args.seed).hess_var, 32)
    t_curv = time.perf_counter() - t0

    limit = 2.0 * loss0
    for row in rows:
        b = row["B"]
        guess = 2.0 / row["lam"]
        seeds = [args.seed + 100 + k for k in range(args.runs)]
        row["sgd"] = max_stable_lr(model, w0, data, "sgd", b, args.run_steps, args.bisect,
                                   guess / 4, guess * 4, seeds, limit)
        row["adam"] = max_stable_lr(model, w0, data, "adam", b, args.run_steps, args.bisect,
                                    1e-3, 0.1, seeds, limit)
        row["paper"] = lr_rules.max_lr_for_batch(b, fit[0], fit[1])
    base = rows[0]
    for row in rows:
        row["lin"] = lr_rules.scale_lr(base["sgd"], base["B"], row["B"], "linear")
        row["sqrt"] = lr_rules.scale_lr(base["sgd"], base["B"], row["B"], "sqrt")
        row["adam_sqrt"] = lr_rules.scale_lr(base["adam"], base["B"], row["B"], "sqrt")

    def log_rms(pred, meas):
        return math.sqrt(sum(math.log(pred(r) / meas(r)) ** 2 for r in rows) / len(rows))

    print(f"digits MLP, {sum(p.numel() for p in params)} params, w0 after {args.warm_steps} SGD "
          f"steps: full loss {loss0:.4f}; full-data lambda_max {lam_full:.4g} (2/lambda = "
          f"{2 / lam_full:.4g})")
    print(f"fit lambda'(B) = lambda + s/(B lambda): lambda = {fit[0]:.4g}, s = {fit[1]:.4g}, "
          f"B* = s/lambda^2 = {lr_rules.critical_batch_size(fit[0], fit[1]):.3g}; "
          f"s from the spread of H_b z (B=32, isotropic-noise reading): {s_hvp:.4g}")
    print(f"stability: {args.runs} runs x {args.run_steps} steps from w0, full loss finite and "
          f"< 2x {loss0:.3f} after every step; bisection {args.bisect} rounds")
    head = (f"{'B':>5} {'lam(H_B)':>9} {'lam fit':>8} | {'SGD meas':>9} {'2/lam_B':>8} "
            f"{'paper':>8} {'linear':>8} {'sqrt':>8} | {'Adam meas':>9} {'Adam sqrt':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lam_fit = lr_rules.batch_outlier(fit[0], fit[1], r["B"])
        print(f"{r['B']:>5} {r['lam']:>9.4g} {lam_fit:>8.4g} | {r['sgd']:>9.4g} {2 / r['lam']:>8.4g} "
              f"{r['paper']:>8.4g} {r['lin']:>8.4g} {r['sqrt']:>8.4g} | {r['adam']:>9.4g} "
              f"{r['adam_sqrt']:>9.4g}")
    sgd = lambda r: r["sgd"]  # noqa: E731
    adam = lambda r: r["adam"]  # noqa: E731
    print(f"log-RMS error vs measured SGD: 2/lam_B {log_rms(lambda r: 2 / r['lam'], sgd):.3f}, "
          f"paper fit {log_rms(lambda r: r['paper'], sgd):.3f}, "
          f"linear {log_rms(lambda r: r['lin'], sgd):.3f}, sqrt {log_rms(lambda r: r['sqrt'], sgd):.3f}"
          f"; vs measured Adam: sqrt rule {log_rms(lambda r: r['adam_sqrt'], adam):.3f}, linear "
          f"rule {log_rms(lambda r: base['adam'] * r['B'] / base['B'], adam):.3f}")
    if args.out:
        plot(args.out, rows, lam_full, fit, s_hvp)
        print(f"wrote {args.out}")
    print(f"time: curvature {t_curv:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
