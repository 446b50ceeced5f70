"""GradInit (Zhu, Ni, Xu, Kong, Huang, Goldstein; NeurIPS 2021) on a BN-free small ResNet, digits.

What it tests: whether a residual network without any normalisation, He-initialised, that fails to
train with SGD-momentum at a high learning rate from its default initialisation trains after
GradInit has learned one multiplier per weight/bias block (``ssl_suite.models.gradinit``) and the
multipliers were folded into the weights (``fold_scales``). Every (lr, seed) cell starts from the
same initial weights and sees the same training batches with and without GradInit.

Network (a scaled-down version of the paper's / zhuchen03/gradinit's ``resnet110 --no_bn``): stem
conv3x3(1->w) + ReLU, ``--blocks`` basic blocks ``relu(x + conv(relu(conv(x))))`` at 8x8, global
average pool, linear. Convs have biases (zero-initialised) and ``kaiming_normal_(fan_out, relu)``
weights, the fc keeps torch's default weight init and a zero bias -- all as in the released
``models/gradinit_resnet_cifar.py`` with ``use_bn=False``. Without normalisation the residual
stream's variance roughly doubles per block.

Training: SGD, momentum 0.9, constant lr, no warmup, no weight decay, batch 64, ``--steps`` steps
(the paper's CIFAR runs also add weight decay, a cosine schedule and 200 epochs; the released
script for ``resnet110 --no_bn`` also clips the training gradient norm at 1 (``--train-clip 1``),
which is *not* done here).

GradInit settings (released ``launch/run_gradinit.sh``, ``resnet110 --no_bn`` line): simulated
optimizer SGD, gamma = 1, tau (Adam lr on the multipliers) = 5e-2, min_scale alpha = 0.01,
per-multiplier gradient clip 1. Deviations: eta = the training lr of each run (the script fixes
eta = 0.1 = its training lr); batch 64; ``--gi-steps`` (default 100) iterations instead of 390 to
keep the script short; the paper's objective (``normalize_grad=False``, second order) by default,
``--normalize-grad`` gives the script's ``--gradinit-normalize-grad``.

A run is reported as ``diverged`` when the loss becomes non-finite and as ``stuck`` when its final
training loss is above 2.0 (chance is ln 10 = 2.30); the test accuracy is printed either way.
About three minutes on one CPU core with the defaults (``--quick``: one seed, ~25 s). The
table also gives the gradient norm at the start of training: the plain net's first momentum steps
are about 100x larger than the GradInit net's, which GradInit's constraint ||g|| <= gamma keeps
small.

    OMP_NUM_THREADS=1 python scripts/demo_gradinit.py [--blocks 8] [--steps 600] [--gi-steps 100]
        [--seeds 0 1 2] [--lrs 0.01 0.1] [--out docs/gradinit_demo.png]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ssl_suite.analysis import small_tasks
from ssl_suite.models.gradinit import fold_scales, gradinit

STUCK_LOSS = 2.0  # final train loss above this counts as "stuck" (chance: ln 10 = 2.303)


class BasicBlock(nn.Module):
    """``relu(x + conv2(relu(conv1(x))))`` with no normalisation (the paper's no-BN block)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=True)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class SmallResNet(nn.Module):
    """BN-free ResNet for 1x8x8 inputs: stem conv, ``blocks`` basic blocks, GAP, linear."""

    def __init__(self, width: int = 16, blocks: int = 4, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=True)
        self.blocks = nn.Sequential(*[BasicBlock(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, num_classes)
        # Released code's init for use_bn=False: He-normal (fan_out) convs with zero bias,
        # default-initialised fc weight with zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def gi_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def init_grad_norm(model: nn.Module, batch) -> float:
    """||grad L|| over all parameters on one batch (the size of SGD's first step / lr)."""
    model.zero_grad(set_to_none=True)
    gi_loss(model, batch).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return float(norm)


def status(curves: small_tasks.Curves) -> str:
    if curves.diverged or not math.isfinite(curves.final_loss):
        return "diverged"
    if curves.final_loss > STUCK_LOSS:
        return "stuck"
    return "ok"


def cell(runs: list[small_tasks.Curves]) -> tuple[str, str]:
    """(loss column, accuracy column) over the seeds of one (lr, method)."""
    losses = []
    for c in runs:
        s = status(c)
        losses.append(f"{c.final_loss:.3f}" if s == "ok" else s)
    accs = [c.final_acc for c in runs]
    acc = "/".join(f"{a:.2f}" for a in accs) + f" (mean {sum(accs) / len(accs):.2f})"
    return " / ".join(losses), acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps per run")
    ap.add_argument("--gi-steps", type=int, default=100, help="GradInit iterations (paper: 390)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--blocks", type=int, default=8, help="residual blocks")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--scale-lr", type=float, default=5e-2, help="tau, Adam lr on the multipliers")
    ap.add_argument("--normalize-grad", action="store_true",
                    help="released code's --gradinit-normalize-grad (paper: off)")
    ap.add_argument("--plot-lrs", type=float, nargs="+", default=[0.01, 0.1],
                    help="learning rates whose loss curves (first seed) go in the plot")
    ap.add_argument("--out", default="docs/gradinit_demo.png", help="PNG ('' for none)")
    ap.add_argument("--quick", action="store_true", help="one seed, 150 steps, 50 GradInit steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.gi_steps = args.seeds[:1], 150, 50
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    data = small_tasks.digits(seed=0)
    print(f"BN-free ResNet (stem + {args.blocks} blocks, width {args.width}) on 8x8 digits; "
          f"SGD momentum 0.9, batch {args.batch_size}, {args.steps} steps; GradInit: SGD, eta=lr, "
          f"gamma=1, tau={args.scale_lr:g}, alpha=0.01, clip 1, {args.gi_steps} iterations, "
          f"normalize_grad={args.normalize_grad}; seeds {args.seeds}")

    plain: dict[float, list] = {}
    gi: dict[float, list] = {}
    scales_by_lr: dict[float, dict[str, float]] = {}
    gi_seconds = 0.0
    gnorms: dict[float, list] = {}   # gradient norm at the start of training: plain, GradInit
    for lr in args.lrs:
        plain[lr], gi[lr] = [], []
        for seed in args.seeds:
            torch.manual_seed(seed)
            init = SmallResNet(args.width, args.blocks).state_dict()

            model = SmallResNet(args.width, args.blocks)
            model.load_state_dict(init)
            probe = next(small_tasks.batch_stream(data, args.batch_size, 2000 + seed))
            gnorm_plain = init_grad_norm(model, probe)
            plain[lr].append(small_tasks.train(
                model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), data,
                steps=args.steps, batch_size=args.batch_size, seed=seed, eval_every=10))

            model = SmallResNet(args.width, args.blocks)
            model.load_state_dict(init)
            t0 = time.perf_counter()
            stream = small_tasks.batch_stream(data, args.batch_size, 1000 + seed)
            scales = gradinit(model, gi_loss, stream,
                              optimizer="sgd", lr=lr, steps=args.gi_steps, gamma=1.0,
                              min_scale=0.01, scale_lr=args.scale_lr, grad_clip=1.0,
                              normalize_grad=args.normalize_grad, progress=False)
            gi_seconds += time.perf_counter() - t0
            if seed == args.seeds[0]:
                scales_by_lr[lr] = scales
            fold_scales(model, scales)
            gnorms.setdefault(lr, []).append((gnorm_plain, init_grad_norm(model, probe)))
            gi[lr].append(small_tasks.train(
                model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), data,
                steps=args.steps, batch_size=args.batch_size, seed=seed, eval_every=10))

    print("\nFinal train loss (per seed; 'stuck' = loss > 2.0, chance 2.30) and test accuracy "
          "(per seed, mean):\n")
    print("| lr | ‖g‖ at start: plain / GradInit (mean) | plain: final loss | plain: test acc "
          "| GradInit: final loss | GradInit: test acc | GradInit weight scales min / max "
          "(seed %d) |" % args.seeds[0])
    print("|---|---|---|---|---|---|---|")
    for lr in args.lrs:
        pl, pa = cell(plain[lr])
        gl, ga = cell(gi[lr])
        w = [v for n, v in scales_by_lr[lr].items() if n.endswith("weight")]
        g0 = sum(a for a, _ in gnorms[lr]) / len(gnorms[lr])
        g1 = sum(b for _, b in gnorms[lr]) / len(gnorms[lr])
        print(f"| {lr:g} | {g0:.2f} / {g1:.2f} | {pl} | {pa} | {gl} | {ga} | "
              f"{min(w):.3f} / {max(w):.3f} |")

    print(f"\nLearned multipliers per block (seed {args.seeds[0]}; zero-initialised biases are "
          "not rescaled):\n")
    names = list(scales_by_lr[args.lrs[0]])
    print("| parameter | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |")
    print("|---|" + "---|" * len(args.lrs))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{scales_by_lr[lr][n]:.3f}" for lr in args.lrs) + " |")
    for lr in args.lrs:
        convs = {n: v for n, v in scales_by_lr[lr].items() if n.startswith("blocks.")}
        n_min = min(convs, key=convs.get)
        second = sum(convs[f"blocks.{b}.conv2.weight"] < convs[f"blocks.{b}.conv1.weight"]
                     for b in range(args.blocks))
        print(f"lr {lr:g}: smallest block multiplier {n_min} = {convs[n_min]:.3f}; "
              f"conv2 < conv1 in {second}/{args.blocks} blocks")

    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plot_lrs = [lr for lr in args.plot_lrs if lr in plain]
        fig, axes = plt.subplots(1, len(plot_lrs), figsize=(4.5 * len(plot_lrs), 3.6),
                                 squeeze=False)
        for ax, lr in zip(axes[0], plot_lrs):
            for label, runs in (("plain (He init)", plain), ("GradInit", gi)):
                c = runs[lr][0]
                ax.plot(c.step, c.train_loss, label=f"{label}: acc {c.final_acc:.2f}")
            ax.axhline(math.log(10), color="gray", lw=0.8, ls=":", label="chance (ln 10)")
            ax.set_yscale("log")
            ax.set_title(f"lr {lr:g}, seed {args.seeds[0]}")
            ax.set_xlabel("step")
            ax.set_ylabel("train loss (mean over 10 steps)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"BN-free ResNet ({args.blocks} blocks) on digits, SGD momentum 0.9")
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        plt.close(fig)
        print(f"\nwrote {args.out}")
    print(f"GradInit time {gi_seconds:.1f} s; "
          f"total wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
