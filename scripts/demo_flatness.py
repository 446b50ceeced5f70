"""SGD vs Entropy-SGD vs Replicated SGD minima on digits: local energy and test accuracy.

Pittorino et al., "Entropic gradient descent algorithms and wide flat minima" (ICLR 2021), in
miniature: train the small CNN of :mod:`ssl_suite.analysis.small_tasks` (width 16, BatchNorm) on
scikit-learn's 8x8 digits with three optimizers from the **same initial weights** and the same
seeded stream of minibatches (batch 64, every closure call draws the next, fresh batch), then
measure each minimum's local energy (:func:`ssl_suite.analysis.flatness.local_energy`):
multiplicative Gaussian noise ``w -> w (1 + sigma z)`` on all parameters, eval-mode BN, the mean
over ``--samples`` draws (the same draws for every optimizer) of the train error (%) and train
loss on the whole training split, as a curve over sigma; and test accuracy.

Budget (``--budget equal``, default): every optimizer gets the same number of minibatch gradient
evaluations (``--evals``): SGD makes ``evals`` steps, Entropy-SGD ``evals / L`` outer steps of
``L`` = 5 SGLD passes (Pittorino et al.'s "comparable computational cost" for eSGD), replicated SGD
``evals / y`` steps of its y = 3 replicas. ``--budget paper``: rSGD trains each replica for the
SGD step count (y x the evaluations), as in the paper.

Settings (not tuned here):
* SGD: Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, cosine decay (the paper's baseline).
* Entropy-SGD: the Lua code of the paper's runs (:data:`~ssl_suite.optim.entropy_sgd.CODE_LUA`:
  outer step ``lr (x - mu)`` with lr 1 and cosine decay, SGLD lr 0.1 with Nesterov momentum 0.9,
  thermal noise 1e-4, mu weight 0.25 on the new sample), weight decay 5e-4 in the SGLD gradient,
  scoping gamma 0.03 -> 3 (x100 over the run, exponential).
* Replicated SGD: y = 3 replicas started from the same weights, per-replica Nesterov SGD 0.9,
  lr 0.1 cosine, weight decay 5e-4, coupling gamma 2e-3 (the code's g = 1e-3) growing x1e4
  (the code's gmax) per epoch; the model evaluated is the centre.
BN statistics of every final model (the centre, Entropy-SGD's x) are re-estimated on the training
split before evaluation (:func:`~ssl_suite.optim.replica_sgd.recompute_bn_stats`), for all three.

    python scripts/demo_flatness.py [--evals 2400] [--budget equal|paper] [--samples 8]
                                    [--seed 0] [--out docs/flatness_demo.png]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Iterator

import torch
import torch.nn.functional as F

from ssl_suite.analysis import small_tasks
from ssl_suite.analysis.flatness import local_energy, plot_local_energy
from ssl_suite.optim import protocol
from ssl_suite.optim.entropy_sgd import CODE_LUA, EntropySGD
from ssl_suite.optim.replica_sgd import ReplicaSGD, recompute_bn_stats

BATCH = 64
L_SGLD = 5
REPLICAS = 3


def cosine(opt: torch.optim.Optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))


def train(model, opt, steps: int, stream: Iterator) -> tuple[int, float, float]:
    """``steps`` optimizer steps; each closure call draws a fresh batch. Returns (gradient
    evaluations, mean loss of the last 10 % of the calls, seconds)."""
    calls, recent = 0, []

    def closure():
        nonlocal calls
        x, y = next(stream)
        calls += 1
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        protocol.backward(opt, losses.mean())
        recent.append(float(losses.detach().mean()))
        return losses.detach()

    sched = cosine(opt, steps)
    model.train()
    t0 = time.perf_counter()
    with protocol.attach(opt, model):
        for _ in range(steps):
            opt.step(closure)
            sched.step()
            if not math.isfinite(recent[-1]):
                raise SystemExit(f"{type(opt).__name__}: the loss became {recent[-1]}; stopped")
    tail = recent[-max(1, len(recent) // 10):]
    return calls, sum(tail) / len(tail), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=int, default=2400,
                    help="minibatch gradient evaluations per optimizer (default 2400)")
    ap.add_argument("--budget", choices=("equal", "paper"), default="equal",
                    help="equal: same evaluations for all; paper: rSGD gets y x (default equal)")
    ap.add_argument("--sigmas", default="0,0.05,0.1,0.2,0.3,0.4",
                    help="comma-separated noise levels (default 0,0.05,0.1,0.2,0.3,0.4)")
    ap.add_argument("--samples", type=int, default=8, help="noise draws per sigma (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="init, batch and noise seed (default 0)")
    ap.add_argument("--out", default="docs/flatness_demo.png", help="PNG ('' for none)")
    args = ap.parse_args(argv)
    if args.evals < 10 * L_SGLD * REPLICAS:
        ap.error(f"--evals must be >= {10 * L_SGLD * REPLICAS}")
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        ap.error(f"--sigmas: not a comma-separated list of numbers: {args.sigmas!r}")
    torch.set_num_threads(1)
    t_all = time.perf_counter()

    data = small_tasks.digits(seed=args.seed)
    torch.manual_seed(args.seed)
    init = small_tasks.small_cnn().state_dict()
    n = args.evals
    steps_per_epoch = len(data.y_train) // BATCH
    sgd_steps, esgd_steps = n, n // L_SGLD
    rsgd_steps = n if args.budget == "paper" else n // REPLICAS
    wd = 5e-4
    runs = {
        "SGD": (sgd_steps, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                      weight_decay=wd)),
        "Entropy-SGD": (esgd_steps, lambda ps: EntropySGD(
            ps, **{**CODE_LUA, "lr": 1.0, "L": L_SGLD, "gamma0": 0.03, "gamma_growth": 100.0,
                   "total_steps": esgd_steps, "sgld_lr": 0.1, "noise": 1e-4,
                   "weight_decay": wd, "noise_seed": args.seed})),
        "Replicated SGD": (rsgd_steps, lambda ps: ReplicaSGD(
            ps, lr=0.1, replicas=REPLICAS, gamma0=2e-3, gamma_growth=1e4,
            total_steps=rsgd_steps, gamma_every=steps_per_epoch, momentum=0.9, nesterov=True,
            weight_decay=wd)),
    }

    def metrics(model):
        logits = model(data.x_train)
        return {"train_error_pct": 100.0 * float((logits.argmax(1) != data.y_train).float().mean()),
                "train_loss": float(F.cross_entropy(logits, data.y_train))}

    print(f"digits ({len(data.y_train)} train / {len(data.y_test)} test), small CNN (width 16, "
          f"BN), batch {BATCH}, same init and batch stream, budget {args.budget}: {n} gradient "
          f"evaluations (rSGD {rsgd_steps * REPLICAS}); local energy: multiplicative noise, "
          f"{args.samples} draws per sigma, eval-mode BN re-estimated on the train split")
    curves, rows = {}, []
    for name, (steps, build) in runs.items():
        model = small_tasks.small_cnn()
        model.load_state_dict(init)
        opt = build(model.parameters())
        stream = small_tasks.batch_stream(data, BATCH, args.seed)
        calls, loss, secs = train(model, opt, steps, stream)
        recompute_bn_stats(model, data.x_train.split(256))
        acc = small_tasks.accuracy(model, data.x_test, data.y_test)
        curves[name] = local_energy(model, metrics, sigmas, args.samples, seed=args.seed)
        rows.append((name, steps, calls, loss, acc, secs))

    sig = curves["SGD"].sigmas
    print(f"\n{'optimizer':<15} {'steps':>6} {'grads':>6} {'loss*':>7} {'test acc':>8} "
          f"{'train err %':>11} {'sec':>5}")
    for name, steps, calls, loss, acc, secs in rows:
        c = curves[name]
        print(f"{name:<15} {steps:>6} {calls:>6} {loss:>7.4f} {acc:>8.4f} "
              f"{c.base['train_error_pct']:>11.2f} {secs:>5.1f}")
    print("(* mean minibatch loss over the last 10 % of the gradient evaluations)")
    for metric, fmt in (("train_error_pct", "{:+.2f}"), ("train_loss", "{:+.4f}")):
        print(f"\nlocal energy, delta {metric} (mean over draws; +- = standard error) at sigma:")
        print(f"{'optimizer':<15} " + " ".join(f"{s:>18g}" for s in sig if s > 0))
        for name in runs:
            c = curves[name]
            cells = [f"{fmt.format(d)} +- {e:.2g}" for s, d, e in
                     zip(c.sigmas, c.delta(metric), c.stderr(metric)) if s > 0]
            print(f"{name:<15} " + " ".join(f"{cell:>18}" for cell in cells))
    print(f"\n({time.perf_counter() - t_all:.1f} s in all)")
    if args.out:
        try:
            plot_local_energy(curves, args.out,
                              title=f"Local energy of SGD / Entropy-SGD / rSGD minima, digits CNN, "
                                    f"{args.budget} budget ({n} gradient evaluations)",
                              labels={"train_error_pct": "train error (%)",
                                      "train_loss": "train loss"})
            print(f"plot: {args.out}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'ssl_suite[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
