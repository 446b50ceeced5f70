"""SVI (Xu, Cheng & Xie 2022) vs SGD-momentum on digits with a small MLP, seconds on a CPU.

The paper's comparison (spec 4.4/4.5): the same network, initial weights and batches trained with
SGD-momentum on ordinary gradients and on SVI directions; its claim is better efficiency early in
training. Setup: scikit-learn's 8x8 digits as flat 64-vectors, ``small_mlp(64, 64, depth=2)``
(Linear-ReLU-Linear-ReLU-Linear), batch 64; the optimizer of the paper's two-moon experiment
(``simulation_FCNN.py``: SGD lr 0.15, classical momentum 0.9 -> timm's ``"momentum"``) for all
runs, at that lr and on a small grid below it (``--lrs``, default 0.15, 0.05, 0.015: SVI
throughout is unstable at 0.15 on this deeper ReLU net). Two losses:

* ``softmax-MSE``: the paper's GLM view, softmax output link (an ``nn.Softmax`` module, so SVI
  treats it as the last layer's sigma) and per-sample ``||softmax(z) - onehot(y)||^2`` (the OGB
  notebooks' MSE x K); the last layer then gets the monotone field (2/N)(y_hat - y)^T [X, 1].
* ``CE``: cross-entropy on logits (the vision notebooks); the last layer gets its gradient.

Runs: SGD; SVI throughout (the paper's two-moon/OGB setting); SVI with a 10 % warm start
(``warm_start_fraction=0.1``, the vision notebooks' ``pause_SVI``: plain gradients afterwards,
base optimizer rebuilt). Seeds ``seed .. seed+2`` (init and batch order; the data split is fixed);
the table gives the mean (and spread) over seeds of the train loss (mean over the evaluation
window ending there) and test accuracy at 10 % of the steps and at the end, and the training
seconds. The plot shows the first seed at ``--plot-lr`` (default 0.05).

    python scripts/demo_svi.py [--steps 400] [--seed 0] [--out docs/svi_demo.png]
                               [--lrs 0.15,0.05,0.015] [--plot-lr 0.05]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from ssl_suite.analysis import small_tasks
from ssl_suite.optim.svi import SVI

MOMENTUM = 0.9


def softmax_mse_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    probs = model(x)  # the model ends with nn.Softmax
    return ((probs - F.one_hot(y, probs.shape[1]).to(probs.dtype)) ** 2).sum(1)


def make_model(loss: str) -> nn.Module:
    mlp = small_tasks.small_mlp(64, 64, depth=2)
    return nn.Sequential(mlp, nn.Softmax(dim=1)) if loss == "softmax-MSE" else mlp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    ap.add_argument("--seed", type=int, default=0, help="first of 3 seeds (default 0)")
    ap.add_argument("--out", default="docs/svi_demo.png", help="PNG of the curves ('' for none)")
    ap.add_argument("--lrs", default="0.15,0.05,0.015", help="comma-separated learning rates")
    ap.add_argument("--plot-lr", type=float, default=0.05, help="lr whose curves are plotted")
    args = ap.parse_args(argv)
    if args.steps < 20:
        ap.error("--steps must be >= 20")
    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--lrs: not a comma-separated list of numbers: {args.lrs!r}")
    if not lrs or any(lr <= 0 for lr in lrs):
        ap.error("--lrs: give one or more positive learning rates")
    torch.set_num_threads(1)
    from timm.optim import create_optimizer_v2

    data = small_tasks.digits(flat=True, seed=0)
    eval_every = max(args.steps // 20, 1)
    early = max(args.steps // 10, 1)
    runs = {
        "SGD": lambda ps, lr, T: create_optimizer_v2(ps, "momentum", lr=lr, momentum=MOMENTUM),
        "SVI": lambda ps, lr, T: SVI(ps, lr=lr, base="momentum", momentum=MOMENTUM),
        "SVI warm 10%": lambda ps, lr, T: SVI(ps, lr=lr, base="momentum", momentum=MOMENTUM,
                                              warm_start_fraction=0.1, total_steps=T),
    }
    seeds = [args.seed, args.seed + 1, args.seed + 2]
    print(f"digits (flat), MLP 64-64-64-10 (ReLU), batch 64, {args.steps} steps, "
          f"SGD momentum {MOMENTUM} (classical), lr {lrs} for all, seeds {seeds}")
    t_all = time.perf_counter()
    table, plots = [], {}
    for loss in ("softmax-MSE", "CE"):
        loss_fn = softmax_mse_losses if loss == "softmax-MSE" else small_tasks.cross_entropy_losses
        for lr, (name, build) in ((lr, run) for lr in lrs for run in runs.items()):
            rows = []
            for seed in seeds:
                torch.manual_seed(seed)
                model = make_model(loss)
                c = small_tasks.train(model, build(model.parameters(), lr, args.steps), data,
                                      args.steps, batch_size=64, seed=seed,
                                      eval_every=eval_every, loss_fn=loss_fn)
                i = next(k for k, s in enumerate(c.step) if s >= early)
                rows.append([c.train_loss[i], c.test_acc[i], c.final_loss, c.final_acc,
                             c.seconds[-1], float(c.diverged)])
                if seed == seeds[0] and abs(lr - args.plot_lr) < 1e-12:
                    plots[f"{name}, {loss}"] = c
            table.append((loss, lr, name, torch.tensor(rows, dtype=torch.float64)))

    print(f"\n{'loss':<12} {'lr':>6} {'optimizer':<13} {'loss@10%':>9} {'acc@10%':>15} "
          f"{'loss@end':>9} {'acc@end':>15} {'seconds':>8}")
    for loss, lr, name, r in table:
        m, s = r.mean(0), r.std(0)
        flag = "  (diverged)" if r[:, 5].any() else ""
        print(f"{loss:<12} {lr:>6g} {name:<13} {m[0]:>9.4f} {m[1]:>8.4f}±{s[1]:.4f} {m[2]:>9.4f} "
              f"{m[3]:>8.4f}±{s[3]:.4f} {m[4]:>8.2f}{flag}")
    print(f"\n(10% = the evaluation at step {early}; mean ± std over {len(seeds)} seeds; "
          f"{time.perf_counter() - t_all:.1f} s in all)")
    if args.out and not plots:
        print(f"--plot-lr {args.plot_lr} is not in --lrs: no plot")
    elif args.out:
        try:
            small_tasks.plot_curves(plots, args.out,
                                    title=f"SVI vs SGD-momentum (lr {args.plot_lr:g}, m "
                                          f"{MOMENTUM}), digits MLP, {args.steps} steps, "
                                          f"seed {seeds[0]}")
            print(f"plot: {args.out}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'ssl_suite[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
