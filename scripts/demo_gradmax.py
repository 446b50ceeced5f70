"""GradMax (Evci et al., "GradMax: Growing Neural Networks using Gradient Information", ICLR 2022)
against random growth on the paper's student-teacher task (the released ``Student_Teacher.ipynb``).

Teacher: an MLP 10 -> 10 -> 10 without biases, ``relu1`` hidden units, weights ~ U[-1, 1]; data
x ~ N(0, I_10), 1000 samples; targets = teacher(x). Student: the same MLP with 5 hidden units,
MSE loss, full-batch gradient descent (LR 0.1). Every 200 steps one hidden unit is added (5 times)
by :func:`ssl_suite.models.gradmax.grow_pair`: zero incoming weights, outgoing weights either the
top singular vector of the gradient matrix (``gradmax``, Eq. 9) or a random unit direction
(``random``, the paper's baseline), both scaled to the same norm (``scale * mean outgoing norm``,
the code's ``mean_norm``); then 500 more steps. Each seed uses the same teacher, data and initial
student for both methods.

What the paper reports (and this script measures): right after each growth the new incoming
weights' gradient norm is larger with GradMax than with random growth, and the training loss of
GradMax stays at or below that of random growth.

    OMP_NUM_THREADS=1 python scripts/demo_gradmax.py [--seeds 0 1 2 3 4]
        [--out docs/gradmax_demo.png]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ssl_suite.models.gradmax import ReLU1, grow_pair

IN, TEACHER_WIDTH, OUT, N = 10, 10, 10, 1000
GROW_EVERY, GROWTHS, TAIL, LR = 200, 5, 500, 0.1


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, width, bias=False), ReLU1(),
                         nn.Linear(width, OUT, bias=False))


def run(method: str, seed: int, scale: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    teacher = mlp(TEACHER_WIDTH)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
        x = torch.randn(N, IN, generator=g)
        y = teacher(x)
    torch.manual_seed(seed + 1000)
    student = mlp(TEACHER_WIDTH // 2)
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    loss_fn = nn.MSELoss()

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(student(x), y)
        loss.backward()
        return loss

    losses, new_grad_sq = [], []
    for step in range(GROW_EVERY * GROWTHS + TAIL):
        if step and step % GROW_EVERY == 0 and step // GROW_EVERY <= GROWTHS:
            grow_pair(student[0], student[2], 1, closure, scale=scale, scale_method="mean_norm",
                      optimizer=opt, method=method,
                      generator=torch.Generator().manual_seed(seed * 100 + step))
            closure()   # the gradient the new unit's zero incoming weights receive
            new_grad_sq.append(float(student[0].weight.grad[-1].pow(2).sum()))
        losses.append(float(closure().detach()))
        opt.step()
    return {"loss": losses, "new_grad_sq": new_grad_sq}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--scale", type=float, default=0.5, help="new outgoing norm / mean norm")
    ap.add_argument("--out", default="docs/gradmax_demo.png", help="PNG ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = {m: [run(m, s, args.scale) for s in args.seeds] for m in ("gradmax", "random")}

    def mean(vals):
        return sum(vals) / len(vals)

    print(f"student-teacher MLP {IN}-{TEACHER_WIDTH // 2}..{TEACHER_WIDTH // 2 + GROWTHS}-{OUT}, "
          f"full-batch GD lr {LR}, one unit every {GROW_EVERY} steps x {GROWTHS}, seeds "
          f"{args.seeds}\n")
    print("| growth | ‖∂L/∂w_new‖² GradMax (mean over seeds) | random | GradMax larger in |")
    print("|---|---|---|---|")
    for i in range(GROWTHS):
        a = [r["new_grad_sq"][i] for r in res["gradmax"]]
        b = [r["new_grad_sq"][i] for r in res["random"]]
        wins = sum(x > y for x, y in zip(a, b))
        print(f"| {i + 1} (step {GROW_EVERY * (i + 1)}) | {mean(a):.3g} | {mean(b):.3g} | "
              f"{wins}/{len(a)} seeds |")
    print("\n| training loss at step | GradMax | random | GradMax lower in |")
    print("|---|---|---|---|")
    for step in (GROW_EVERY - 1, 2 * GROW_EVERY + 50, 4 * GROW_EVERY + 50,
                 GROW_EVERY * GROWTHS + TAIL - 1):
        a = [r["loss"][step] for r in res["gradmax"]]
        b = [r["loss"][step] for r in res["random"]]
        wins = sum(x < y for x, y in zip(a, b))
        when = " (before the first growth)" if step < GROW_EVERY else ""
        print(f"| {step + 1}{when} | {mean(a):.4f} | {mean(b):.4f} | {wins}/{len(a)} seeds |")

    if args.out:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure(figsize=(6.5, 4), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for m, color in (("gradmax", "tab:blue"), ("random", "tab:orange")):
            curves = [r["loss"] for r in res[m]]
            avg = [mean(v) for v in zip(*curves)]
            ax.plot(avg, color=color, label=f"{m} (mean of {len(curves)} seeds)")
        for i in range(1, GROWTHS + 1):
            ax.axvline(i * GROW_EVERY, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step (dotted: one unit added)")
        ax.set_ylabel("training MSE")
        ax.set_title("GradMax vs random growth, student-teacher")
        ax.legend()
        fig.savefig(args.out)
        print(f"\nwrote {args.out}")
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
