"""SCL sparse connectivity learning (Tang et al., "Automatic Sparse Connectivity Learning for Neural
Networks", IEEE TNNLS 2023, arXiv 2201.05020): sparsity vs accuracy on the digits small CNN.

What it shows: a sweep of the regularisation weight lambda for ``ssl_suite.models.scl`` on the
small CNN of :mod:`ssl_suite.analysis.small_tasks` (width 16, BatchNorm; 8x8 sklearn digits), with
global and per-layer sparsity, test accuracy, and test accuracy after ``fold_scl`` (masks folded
into plain weights; checked to give bit-identical logits), next to a dense baseline.

Setup. Every conv and linear weight is masked (``apply_scl(model, ("conv", "linear"))``, per-row
RMS-normalised mask gradient, ``m_hat`` starts at +1); ``--keep-ends`` keeps the first conv and the
classifier dense. Loss = cross-entropy + lambda * scl_regularizer(model, normalize=True), i.e.
lambda times the fraction of live connections. Weights: SGD lr 0.1, momentum 0.9, weight decay 5e-4
(the demos' CIFAR-style setting, not from the SCL paper); masks: their own SGD group, lr
``--mask-lr`` (3e-3), momentum 0.9, no weight decay. Batch 64, ``--steps`` (400) steps, same init
and batches for every lambda.

Scale of lambda: the task part of dJ/dm_hat is normalised to RMS 1 per output row, while the
normalised regulariser adds lambda / N_total to every mask variable (N_total = number of masked
weights, ~14.5k here). So lambda must be of order N_total before the pressure competes with the
task gradient; lambda in 1e-3..0.1 prunes nothing. The table lists lambda and lambda / N_total. With
mask momentum 0.9 the normalised task-gradient noise alone prunes a few percent at lambda = 0.
Only the SCL abstract was available; the regulariser and normalisation follow our reconstruction
(see the module docstring of ``ssl_suite/models/scl.py``).

    OMP_NUM_THREADS=1 python scripts/demo_scl.py [--steps 400] [--seed 0] [--keep-ends]
        [--lambdas 0 300 1000 2000 3000 5000 10000] [--out docs/scl_demo.png]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ssl_suite.analysis import small_tasks
from ssl_suite.models import scl


def make_optimizer(model, mask_lr: float) -> torch.optim.Optimizer:
    """Weights: SGD lr 0.1, momentum 0.9, wd 5e-4. Masks (if any): own group, no weight decay."""
    masks = scl.mask_parameters(model)
    mask_ids = {id(p) for p in masks}
    weights = [p for p in model.parameters() if id(p) not in mask_ids]
    groups = [{"params": weights, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}]
    if masks:
        groups.append({"params": masks, "lr": mask_lr, "momentum": 0.9, "weight_decay": 0.0})
    return torch.optim.SGD(groups)


@torch.no_grad()
def full_train_ce(model, data) -> float:
    """Task cross-entropy on the whole training set, eval mode (no regulariser term)."""
    was = model.training
    model.eval()
    ce = float(F.cross_entropy(model(data.x_train), data.y_train))
    model.train(was)
    return ce


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps per run")
    ap.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    ap.add_argument("--lambdas", type=float, nargs="+",
                    default=[0, 300, 1000, 2000, 3000, 5000, 10000])
    ap.add_argument("--mask-lr", type=float, default=3e-3, help="SGD lr of the mask variables")
    ap.add_argument("--keep-ends", action="store_true",
                    help="keep the first conv and the last linear dense")
    ap.add_argument("--width", type=int, default=16, help="small_cnn width")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="docs/scl_demo.png", help="PNG ('' for none)")
    ap.add_argument("--quick", action="store_true", help="200 steps, lambdas 0 1000 3000 10000")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.lambdas = 200, [0, 1000, 3000, 10000]
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    data = small_tasks.digits(seed=args.seed)
    torch.manual_seed(args.seed)
    init = small_tasks.small_cnn(width=args.width).state_dict()

    def fresh():
        model = small_tasks.small_cnn(width=args.width)
        model.load_state_dict(init)
        return model

    # Dense baseline: same optimizer for the weights, no masks.
    dense = fresh()
    base = small_tasks.train(dense, make_optimizer(dense, args.mask_lr), data, steps=args.steps,
                             batch_size=args.batch_size, seed=args.seed)
    names = {"0": "conv1", "3": "conv2", "6": "conv3", "11": "fc"}  # small_cnn(batch_norm=True)
    exclude = ("0", "11") if args.keep_ends else ()
    rows = []
    for lam in args.lambdas:
        model = fresh()
        scl.apply_scl(model, layers=("conv", "linear"), exclude=exclude)
        n_total = sum(p.numel() for p in scl.mask_parameters(model))

        def loss_fn(m, x, y, lam=lam):
            # per-sample task loss + the (scalar) regulariser, so the mean is L + lambda * R/N
            return F.cross_entropy(m(x), y, reduction="none") + lam * scl.scl_regularizer(
                m, normalize=True)

        small_tasks.train(model, make_optimizer(model, args.mask_lr), data,
                                   steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                   loss_fn=loss_fn)
        train_ce = full_train_ce(model, data)
        per_layer = scl.sparsity_report(model)
        sparsity = scl.global_sparsity(model)
        acc = small_tasks.accuracy(model, data.x_test, data.y_test)
        model.eval()
        with torch.no_grad():
            logits = model(data.x_test)
        scl.fold_scl(model)
        with torch.no_grad():
            logits_folded = model(data.x_test)
        acc_folded = small_tasks.accuracy(model, data.x_test, data.y_test)
        assert not scl.mask_parameters(model), "fold_scl left masks behind"
        identical = torch.equal(logits, logits_folded) and acc == acc_folded
        assert identical, f"fold_scl changed the outputs at lambda={lam}"
        rows.append(dict(lam=lam, n_total=n_total, sparsity=sparsity, per_layer=per_layer,
                         acc=acc, acc_folded=acc_folded, identical=identical,
                         loss=train_ce))

    masked = ", ".join(names.get(k, k) for k in rows[0]["per_layer"]) if rows else ""
    print(f"small_cnn(width={args.width}, BN) on digits, batch {args.batch_size}, {args.steps} "
          f"steps, weights SGD 0.1/m0.9/wd5e-4, masks SGD {args.mask_lr:g}/m0.9; masked: {masked} "
          f"(N_total = {rows[0]['n_total'] if rows else 0}); seed {args.seed}\n")
    layer_keys = list(rows[0]["per_layer"]) if rows else []
    print("| lambda | lambda/N | global sparsity | per-layer sparsity ("
          + " / ".join(names.get(k, k) for k in layer_keys)
          + ") | train CE (eval) | test acc | test acc after fold_scl |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | - | 0.000 | - | {full_train_ce(dense, data):.3f} | {base.final_acc:.3f} | - |")
    for r in rows:
        per = " / ".join(f"{r['per_layer'][k]:.2f}" for k in layer_keys)
        same = "identical" if r["identical"] else "DIFFERS"
        print(f"| {r['lam']:g} | {r['lam'] / r['n_total']:.3f} | {r['sparsity']:.3f} | {per} | "
              f"{r['loss']:.3f} | {r['acc']:.3f} | {r['acc_folded']:.3f} ({same}) |")

    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot([r["sparsity"] for r in rows], [r["acc"] for r in rows], "o-", label="SCL")
        for r in rows:
            ax.annotate(f"λ={r['lam']:g}", (r["sparsity"], r["acc"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
        ax.axhline(base.final_acc, color="gray", ls="--", label=f"dense {base.final_acc:.3f}")
        ax.set_xlabel("global sparsity (fraction of pruned conv+linear weights)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"SCL on digits small CNN ({args.steps} steps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        plt.close(fig)
        print(f"\nwrote {args.out}")
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
