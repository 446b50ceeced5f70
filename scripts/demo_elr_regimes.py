"""The three regimes of training a scale-invariant network on the sphere with a fixed ELR.

Kodryan, Lobacheva, Nakhodnov & Vetrov, "Training Scale-Invariant Neural Networks on the Sphere Can
Happen in Three Regimes", NeurIPS 2022 (spec ``shared/algorithms/init_prune_norm_largebatch.md``
Sec. 5.4): with the effective learning rate fixed, small ELRs *converge* (train loss and effective
gradient norm go to ~0), medium ELRs reach a *chaotic equilibrium* (the loss settles at an
ELR-dependent non-zero level and fluctuates there), large ELRs *diverge* (a random walk on the
sphere; the loss stays near its chance level).

Set-up, scaled down to seconds per run on one CPU core: ``small_cnn(16)`` on 8x8 digits, made fully
scale-invariant as in the paper's ConvNetSI (BN without affine parameters, the last linear layer
re-initialised to Frobenius norm 10 and frozen:
:func:`~ssl_suite.analysis.scale_invariance.make_fully_scale_invariant`), trained with
:class:`~ssl_suite.optim.sphere.SphereSGD` (joint sphere, no momentum, no weight decay, no
augmentation, constant ELR), batch 64, the same batches for every ELR. Test accuracy is taken in
eval mode after re-estimating the BN statistics on training batches
(:func:`~ssl_suite.optim.replica_sgd.recompute_bn_stats`): at large ELRs the weights rotate faster
than the running averages follow, and stale statistics would measure BN lag rather than the regime.

    python scripts/demo_elr_regimes.py            # writes docs/elr_regimes.png, prints the table
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ssl_suite.analysis.scale_invariance import make_fully_scale_invariant
from ssl_suite.analysis.small_tasks import digits, small_cnn
from ssl_suite.optim.replica_sgd import recompute_bn_stats
from ssl_suite.optim.sphere import SphereSGD
from ssl_suite.optim.wrs import ELRMonitor

ELRS = (1e-3, 1e-2, 4e-2, 7e-2, 1.0)


def run(elr: float, data, steps: int, batch_size: int, width: int, eval_every: int,
        seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = small_cnn(width)
    make_fully_scale_invariant(model, lambda: data.x_train[:batch_size])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SphereSGD(params, lr=elr, sphere="joint")
    monitor = ELRMonitor(model, every=eval_every)
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    order, pos = torch.randperm(n, generator=g), 0
    curve = {"step": [], "loss": [], "grad": [], "acc": [], "elr_measured": []}
    running, grads, count, t0 = 0.0, 0.0, 0, time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        with torch.no_grad():   # the SI weights are on the unit sphere: this is ||grad L(w_hat)||
            grads += float(torch.stack(torch._foreach_norm([p.grad for p in params])).norm())
        monitor.before_step()
        opt.step()
        stats = monitor.after_step(opt)
        if stats is not None:
            curve["elr_measured"].append(stats["elr_measured_joint"])
        running += loss.item()
        count += 1
        if step % eval_every == 0:
            curve["step"].append(step)
            curve["loss"].append(running / count)
            curve["grad"].append(grads / count)
            curve["acc"].append(accuracy(model, data, batch_size))
            running, grads, count = 0.0, 0.0, 0
    curve["seconds"] = time.perf_counter() - t0
    return curve


@torch.no_grad()
def accuracy(model, data, batch_size: int) -> float:
    """Test accuracy with BN statistics re-estimated on four training batches."""
    recompute_bn_stats(model, [data.x_train[i * 4 * batch_size:(i + 1) * 4 * batch_size]
                               for i in range(4)])
    model.eval()
    acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    model.train()
    return acc


def regime(curve: dict, chance_acc: float = 0.2) -> str:
    """Label a run by the paper's description (Sec. 5.4 of the spec): near-chance accuracy over
    the last quarter: divergence; a loss still falling by half between the second and the last
    quarter, or below 0.05: convergence; otherwise a stationary level: chaotic equilibrium."""
    q = max(len(curve["loss"]) // 4, 1)
    last, second = curve["loss"][-q:], curve["loss"][q:2 * q]
    if statistics.fmean(curve["acc"][-q:]) < chance_acc:
        return "divergence"
    if statistics.fmean(last) < 0.05 or statistics.fmean(last) < 0.5 * statistics.fmean(second):
        return "convergence"
    return "chaotic equilibrium"


def plot(results: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for elr, c in results.items():
        label = f"ELR {elr:g} ({regime(c)})"
        axes[0].plot(c["step"], c["loss"], label=label)
        axes[1].plot(c["step"], c["grad"], label=label)
        axes[2].plot(c["step"], c["acc"], label=label)
    axes[0].axhline(math.log(10), color="gray", ls=":", lw=1, label="ln 10")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].set_ylabel("train loss (mean over the last interval)")
    axes[1].set_ylabel("effective gradient norm ||grad L(w_hat)||")
    axes[2].set_ylabel("test accuracy (BN recalibrated)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle("Fully scale-invariant CNN on digits, SphereSGD at fixed ELR "
                 "(Kodryan et al. 2022: three regimes)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elrs", type=float, nargs="+", default=list(ELRS))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/elr_regimes.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits()
    t0 = time.perf_counter()
    results = {elr: run(elr, data, args.steps, args.batch_size, args.width, args.eval_every)
               for elr in args.elrs}
    plot(results, args.out)
    q = max(len(next(iter(results.values()))["loss"]) // 4, 1)
    print(f"{'ELR':>7s} {'regime':>20s} {'final loss':>10s} {'loss std':>9s} "
          f"{'eff. grad':>9s} {'test acc':>8s} {'measured ELR':>12s} {'s':>5s}")
    for elr, c in results.items():
        print(f"{elr:7g} {regime(c):>20s} {c['loss'][-1]:10.4f} "
              f"{statistics.pstdev(c['loss'][-q:]):9.4f} {c['grad'][-1]:9.4f} "
              f"{c['acc'][-1]:8.3f} {statistics.median(c['elr_measured']):12.4g} "
              f"{c['seconds']:5.1f}")
    print(f"(loss std and regime over the last {q} of {len(c['loss'])} intervals of "
          f"{args.eval_every} steps; total {time.perf_counter() - t0:.0f} s; plot: {args.out})")


if __name__ == "__main__":
    main()
