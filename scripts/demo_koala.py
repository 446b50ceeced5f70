"""KOALA-V and KOALA-M (Davtyan et al., AAAI 2022) vs SGD with momentum on digits, seconds on a CPU.

The small CNN of :mod:`ssl_suite.analysis.small_tasks` (width 16, BatchNorm) on scikit-learn's 8x8
digits, batch 64, the same seed, initial weights and batches for every optimizer, and the shape of
the paper's CIFAR schedule (``train.py``: step schedule, x0.2 at 30/60/90 % of training; weight
decay 5e-4 for all). Baseline: SGD, lr 0.1, momentum 0.9 (the paper's CIFAR baseline; not tuned
here). KOALA: lr 1.0 (= target loss 0, the paper's default), all other settings the defaults of
:class:`ssl_suite.optim.koala.KOALA` (``train.py``'s sigma = 0.1 / P_0 = diag(0.1, 0.1)).
Prints final train loss (mean over the last evaluation window), test accuracy and training seconds.

    python scripts/demo_koala.py [--steps 300] [--seed 0] [--out docs/koala_demo.png]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ssl_suite.analysis import small_tasks
from ssl_suite.optim.koala import KOALAM, KOALAV


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="init and batch-order seed (default 0)")
    ap.add_argument("--out", default="docs/koala_demo.png", help="PNG of the curves ('' for none)")
    args = ap.parse_args(argv)
    if args.steps < 10:
        ap.error("--steps must be >= 10")
    torch.set_num_threads(1)

    data = small_tasks.digits(seed=args.seed)
    torch.manual_seed(args.seed)
    init = small_tasks.small_cnn().state_dict()
    milestones = [int(args.steps * f) for f in (0.3, 0.6, 0.9)]
    runs = {
        "SGD-momentum (lr 0.1, m 0.9)":
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
        "KOALA-V (lr 1.0)": lambda ps: KOALAV(ps, lr=1.0, weight_decay=5e-4),
        "KOALA-M (lr 1.0)": lambda ps: KOALAM(ps, lr=1.0, weight_decay=5e-4),
    }
    print(f"digits, small CNN, batch 64, {args.steps} steps, seed {args.seed}, "
          f"lr x0.2 at steps {milestones}, weight decay 5e-4")
    results = {}
    t_all = time.perf_counter()
    for name, build in runs.items():
        model = small_tasks.small_cnn()
        model.load_state_dict(init)
        opt = build(model.parameters())
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.2)
        results[name] = small_tasks.train(model, opt, data, args.steps, batch_size=64,
                                          seed=args.seed, eval_every=max(args.steps // 20, 1),
                                          scheduler=sched)
    print(f"\n{'optimizer':<30} {'train loss':>10} {'test acc':>9} {'seconds':>8}")
    for name, c in results.items():
        flag = "  (diverged)" if c.diverged else ""
        print(f"{name:<30} {c.final_loss:>10.4f} {c.final_acc:>9.4f} {c.seconds[-1]:>8.2f}{flag}")
    print(f"\n({time.perf_counter() - t_all:.1f} s in all)")
    if args.out:
        try:
            small_tasks.plot_curves(results, args.out,
                                    title=f"KOALA vs SGD-momentum, digits small CNN, "
                                          f"{args.steps} steps")
            print(f"plot: {args.out}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'ssl_suite[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
