"""Step time of each optimizer on ResNet-18's parameters, against fused AdamW in the same run.

The parameters of a timm ``resnet18`` (1000 classes, 11.7M parameters in 62 tensors) are
copied once per optimizer, their gradients filled once with the same random values, and every
optimizer steps on them; the learning rate moves a little every step, as under a schedule. Only
``optimizer.step()`` is timed (no forward/backward): an optimizer step is memory-bound, and the
baseline is the fastest AdamW torch has on the device (``fused=True``; its foreach path is shown
too). Steps are timed in blocks of 5 (so a Lookahead sync every 5 steps is in every block), the
optimizers take turns over several rounds so that load from other processes spreads over all of
them, and each row is the median over blocks after warm-up.

Ours are built through :func:`ssl_suite.optim.create_optimizer`, so their parameter groups are
the real ones (biases and norm parameters without weight decay and adaptation); the others get
the same groups. ``GenericAdam`` and ``Lookahead`` are measured where ``ssl_suite.optim`` has
them. The first-step column includes one-off work such as ``torch.compile`` of our LARS step.

Targets: our LARS <= 0.5x timm's LARS (the faster of its default and foreach paths) and every
elementwise optimizer of ours <= 1.5x fused AdamW.

    python scripts/bench_optim_step.py [--steps 100] [--warmup 5] [--rounds 5]
                                       [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import timm
import torch
from torch import nn

BLOCK = 5  # steps per timed block: Lookahead's k, so each block holds one sync


@dataclass
class Entry:
    name: str
    build: Callable[[nn.Module], torch.optim.Optimizer]
    ours: bool = False
    target: float = 1.5          # ours: step time / fused AdamW must stay below this
    periodic: bool = False       # work every k steps (MBF's inverse): mean, not median
    opt: Optional[torch.optim.Optimizer] = None
    prepare: Optional[Callable[[], None]] = None   # untimed, before every step
    closure: Optional[Callable[[], torch.Tensor]] = None
    first_s: float = 0.0
    times: list = field(default_factory=list)
    error: str = ""

    @property
    def ms(self) -> float:
        agg = statistics.mean if self.periodic else statistics.median
        return 1e3 * agg(self.times) / BLOCK


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _groups(model: nn.Module, weight_decay: float) -> list[dict]:
    from ssl_suite.optim import param_groups
    return param_groups({"encoder": model}, weight_decay)


def _ours(name: str, base_lr: float, weight_decay: float, **kwargs):
    from ssl_suite.config import OptimConfig
    from ssl_suite.optim import create_optimizer

    def build(model):
        cfg = OptimConfig(name=name, base_lr=base_lr, weight_decay=weight_decay,
                          lr_scaling="none", **kwargs)
        return create_optimizer({"encoder": model}, cfg, global_batch=256)
    return build


def _generic_adam(model):
    from ssl_suite.optim.generic_adam import GenericAdam  # being written; optional
    try:
        opt = _ours("genericadam", 1e-3, 0.0)(model)
    except Exception:  # not registered (yet): the class over the same groups
        opt = GenericAdam(_groups(model, 0.0), lr=1e-3)
    assert isinstance(opt, GenericAdam), type(opt)
    return opt


def _lookahead_lars(model):
    from ssl_suite.optim import LARS
    from ssl_suite.optim.lookahead import Lookahead  # being written; optional
    try:
        opt = _ours("lookahead_byollars", 0.2, 1.5e-6)(model)
    except Exception:  # the factory does not know the prefix (yet): wrap by hand
        opt = Lookahead(_ours("byollars", 0.2, 1.5e-6)(model), k=BLOCK)
    assert isinstance(opt, Lookahead) and isinstance(opt.optimizer, LARS), type(opt)
    assert opt.k == BLOCK, f"Lookahead k={opt.k}, the benchmark times blocks of {BLOCK}"
    return opt


def _timm(name: str, lr: float, weight_decay: float, **kwargs):
    from timm.optim import create_optimizer_v2
    return lambda model: create_optimizer_v2(_groups(model, weight_decay), opt=name, lr=lr,
                                             weight_decay=weight_decay, **kwargs)


def _eager_lars(model):
    """Our LARS without torch.compile: what runs where compiling is not possible."""
    opt = _ours("byollars", 0.2, 1.5e-6)(model)
    opt.compile = False
    return opt


# ---- part-2 optimizers, primed with one real forward/backward ------------------------------
#: per-step statistics the hooks of each optimizer leave on its layers
_LAYER_STATS = {"nsgd": ("acc", "calls", "n0"),
                "mbf": ("acc", "acc_bias", "acc_w", "acc_A", "acc_D", "rows", "tokens")}


def _primed(entry: Entry, name: str, lr: float, weight_decay: float):
    """Build ``name``, attach it, run one forward/backward of a batch of 16 64x64 images so the
    hooks collect this step's statistics, and keep a copy of them. ``entry.prepare`` puts the
    copy back (untimed) before each step that reads them (every step for NSGD, the curvature
    steps for MBF), so the timed ``step()`` does all its per-step work: NSGD's input-power EMA,
    log and division; MBF's Fisher EMA every ``t_cov`` steps, Cholesky inverse every ``t_inv``
    steps (hence the mean over blocks) and the mini-block preconditioning."""
    import torch.nn.functional as F

    def build(model):
        opt = _ours(name, lr, weight_decay)(model)
        opt.attach(model)
        g = torch.Generator().manual_seed(1)
        dev = next(model.parameters()).device
        x = torch.randn(16, 3, 64, 64, generator=g).to(dev)
        y = torch.randint(0, 1000, (16,), generator=g).to(dev)
        F.cross_entropy(model(x), y).backward()
        keys = _LAYER_STATS[name]
        snap = [(layer, {k: getattr(layer, k) for k in keys}) for layer in opt._layers]
        for layer, saved in snap:
            for k, v in saved.items():
                saved[k] = v.clone() if isinstance(v, torch.Tensor) else v

        def restore(layer, k, v):
            """A copy of ``v``; MBF's per-block sums go into the layer's spare buffer, as its
            hooks write them (a fresh clone would make the step free the last one, a cost
            training does not have)."""
            spare = getattr(layer, "spare", None) if k == "acc" else None
            if spare is not None and spare.shape == v.shape and spare.dtype == v.dtype:
                layer.spare = None
                return spare.copy_(v)
            return v.clone()

        def prepare():
            if name == "mbf" and opt._k % opt.t_cov != 0:
                return
            for layer, saved in snap:
                for k, v in saved.items():
                    setattr(layer, k, restore(layer, k, v) if isinstance(v, torch.Tensor)
                            else v)
        entry.prepare = prepare
        return opt
    return build


def _koala(entry: Entry, name: str, **kwargs):
    """KOALA reads the per-sample losses the closure returns; here a fixed vector of 256.
    ``kwargs`` go to the optimizer (``fuse_predict=True``, ``predict_buffer=False``)."""
    losses = torch.rand(256, generator=torch.Generator().manual_seed(2)) + 1.0

    def build(model):
        opt = _ours(name, 1.0, 0.0, kwargs=dict(kwargs))(model)
        dev = next(model.parameters()).device
        vec = losses.to(dev)
        entry.closure = lambda: vec
        return opt
    return build


def _part2() -> list[Entry]:
    out = []
    for label, kind, target in (("ours nsgd", "nsgd", 1.5), ("ours koalav", "koalav", 1.5),
                                ("ours koalam", "koalam", 1.5), ("ours mbf", "mbf", 4.0)):
        e = Entry(label, None, ours=True, target=target, periodic=kind == "mbf")
        e.build = (_primed(e, kind, 0.1 if kind == "nsgd" else 0.01, 5e-4)
                   if kind in _LAYER_STATS else _koala(e, kind))
        out.append(e)
    e = Entry("ours koalam fuse_predict", None, ours=True, target=1.5)
    e.build = _koala(e, "koalam", fuse_predict=True)
    out.insert(3, e)
    e = Entry("ours koalam in place (info)", None)          # predict_buffer=False
    e.build = _koala(e, "koalam", predict_buffer=False)
    out.insert(4, e)
    return out


def entries() -> list[Entry]:
    return [
        Entry("torch AdamW fused", lambda m: torch.optim.AdamW(_groups(m, 0.05), lr=1e-3,
                                                               fused=True)),
        Entry("torch AdamW foreach", lambda m: torch.optim.AdamW(_groups(m, 0.05), lr=1e-3,
                                                                 foreach=True)),
        Entry("torch SGD momentum foreach", lambda m: torch.optim.SGD(
            _groups(m, 1e-4), lr=0.1, momentum=0.9, foreach=True)),
        Entry("torch RAdam foreach", lambda m: torch.optim.RAdam(_groups(m, 0.0), lr=1e-3,
                                                                 foreach=True)),
        Entry("timm lars (default)", _timm("lars", 0.2, 1.5e-6, momentum=0.9)),
        Entry("timm lars foreach", _timm("lars", 0.2, 1.5e-6, momentum=0.9, foreach=True)),
        Entry("timm lamb (default)", _timm("lamb", 1e-3, 0.01)),
        Entry("ours byollars", _ours("byollars", 0.2, 1.5e-6), ours=True),
        Entry("ours byollars eager (info)", _eager_lars),
        Entry("ours genericadam", _generic_adam, ours=True),
        Entry("ours lookahead(byollars)", _lookahead_lars, ours=True),
        *_part2(),
    ]


def run(args) -> list[Entry]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1000).to(device)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    table = [e for e in entries() if e.name == "torch AdamW fused" or not args.only
             or any(k in e.name for k in args.only)]
    for e in table:
        try:
            m = copy.deepcopy(model)
            opt = e.build(m)
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            e.opt = opt
        except Exception as exc:  # noqa: BLE001  (optional files that are not there yet)
            e.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:90]

    live = [e for e in table if e.opt is not None]

    def step(e) -> float:
        """One step of ``e``; returns its seconds (``prepare`` is not timed)."""
        if e.prepare is not None:
            e.prepare()
        _sync(device)
        t = time.perf_counter()
        for g in e.opt.param_groups:  # as a per-step schedule would
            g["lr"] *= 0.9999
        e.opt.step(e.closure) if e.closure is not None else e.opt.step()
        _sync(device)
        return time.perf_counter() - t

    for e in live:  # warm-up; the first step holds one-off work (torch.compile, state)
        e.first_s = step(e)
        for _ in range(args.warmup):
            step(e)
    blocks = max(1, args.steps // BLOCK)
    per_round = max(1, blocks // args.rounds)
    done = 0
    while done < blocks:
        n = min(per_round, blocks - done)
        for e in live:
            for _ in range(n):
                e.times.append(sum(step(e) for _ in range(BLOCK)))
        done += n
    return table


def report(table: list[Entry], args) -> bool:
    by = {e.name: e for e in table}
    base = by["torch AdamW fused"]
    if not base.times:
        raise SystemExit(f"fused AdamW did not run on {args.device}: {base.error}")
    n_params = sum(p.numel() for g in base.opt.param_groups for p in g["params"])
    n_tensors = sum(len(g["params"]) for g in base.opt.param_groups)
    print(f"optimizer.step() on timm resnet18 ({n_params / 1e6:.2f}M parameters, {n_tensors} "
          f"tensors), {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"timm {timm.__version__}")
    print(f"median over {len(base.times)} blocks of {BLOCK} steps after {args.warmup} warm-up "
          f"steps, optimizers interleaved over {args.rounds} rounds\n")
    print(f"{'optimizer':30s} {'ms/step':>9s} {'x fused AdamW':>14s} {'1st step s':>11s}")
    for e in table:
        if e.times:
            print(f"{e.name + (' (mean)' if e.periodic else ''):30s} {e.ms:9.2f} "
                  f"{e.ms / base.ms:14.2f} {e.first_s:11.2f}")
        else:
            print(f"{e.name:30s} {'skipped':>9s}   ({e.error})")

    ok = True
    print("\ntargets")
    timm_lars = [by[n] for n in ("timm lars (default)", "timm lars foreach")
                 if n in by and by[n].times]
    ours_lars = by.get("ours byollars")
    if timm_lars and ours_lars and ours_lars.times:
        ref = min(timm_lars, key=lambda e: e.ms)
        r = ours_lars.ms / ref.ms
        ok &= r <= 0.5
        print(f"  ours byollars <= 0.5x {ref.name} ({ref.ms:.2f} ms): {r:.2f}x  "
              f"{'holds' if r <= 0.5 else 'MISSED'}")
    for e in table:
        if e.ours:
            if not e.times:
                print(f"  {e.name} <= 1.5x fused AdamW: not measured ({e.error})")
                continue
            r = e.ms / base.ms
            ok &= r <= e.target
            print(f"  {e.name} <= {e.target:g}x fused AdamW: {r:.2f}x  "
                  f"{'holds' if r <= e.target else 'MISSED'}")
    return ok


# ---- part 2: the whole training step (forward, backward, hooks, step) -----------------------
#: (label, config name, base_lr, weight_decay, kwargs, target ratio vs SGD-momentum or None)
TRAIN_STEP = [
    ("torch SGD momentum (baseline)", "momentum", 0.1, 5e-4, {}, None),
    ("ours nsgd", "nsgd", 0.1, 5e-4, {}, 1.15),
    ("ours koalav", "koalav", 1.0, 5e-4, {}, 1.1),
    ("ours koalam", "koalam", 1.0, 5e-4, {}, 1.1),
    ("ours koalam fuse_predict", "koalam", 1.0, 5e-4, {"fuse_predict": True}, 1.1),
    ("ours koalam in place (info)", "koalam", 1.0, 5e-4, {"predict_buffer": False}, None),
    ("ours svi (base sgd momentum)", "svi_momentum", 0.1, 5e-4, {}, 2.0),
    ("ours mbf", "mbf", 0.01, 5e-4, {}, 2.0),
]


def run_train_steps(args) -> list[tuple[str, float, Optional[float], str]]:
    """Median seconds per training step of each optimizer on the same model and batches."""
    import torch.nn.functional as F

    from ssl_suite.config import OptimConfig
    from ssl_suite.optim import create_optimizer, protocol

    device = torch.device(args.device)
    torch.manual_seed(0)
    model0 = timm.create_model("resnet18", num_classes=10).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device),
                torch.randint(0, 10, (args.batch,), generator=g).to(device)) for _ in range(4)]
    runs = []
    for label, name, lr, wd, kwargs, target in TRAIN_STEP:
        try:
            model = copy.deepcopy(model0)
            cfg = OptimConfig(name=name, base_lr=lr, weight_decay=wd, lr_scaling="none",
                              kwargs=dict(kwargs))
            opt = create_optimizer({"encoder": model}, cfg, global_batch=args.batch,
                                   total_steps=10 ** 6)
            runs.append([label, model, opt, protocol.attach(opt, model), [], target, ""])
        except Exception as exc:  # noqa: BLE001
            runs.append([label, None, None, None, [], target,
                         f"{type(exc).__name__}: {exc}".splitlines()[0][:90]])

    def one_step(model, opt, i):
        x, y = batches[i % len(batches)]

        def closure():
            opt.zero_grad(set_to_none=True)
            losses = F.cross_entropy(model(x), y, reduction="none")
            protocol.backward(opt, losses.mean())
            return losses.detach()
        opt.step(closure)

    live = [r for r in runs if r[1] is not None]
    for r in live:  # warm-up (first steps hold one-off work)
        for i in range(args.train_warmup):
            one_step(r[1], r[2], i)
    i = 0
    for _ in range(args.rounds):  # interleaved, so load from other processes spreads
        for r in live:
            for _ in range(max(1, args.train_steps // args.rounds)):
                _sync(device)
                t = time.perf_counter()
                one_step(r[1], r[2], i)
                _sync(device)
                r[4].append(time.perf_counter() - t)
                i += 1
    for r in live:
        r[3].remove()
    return [(r[0], statistics.mean(r[4]) if r[4] else float("nan"), r[5], r[6]) for r in runs]


def report_train(rows, args) -> bool:
    base = rows[0][1]
    print(f"\nwhole training step (forward + backward + hooks + step) on timm resnet18, "
          f"{args.batch}x3x{args.image_size}x{args.image_size}, cross-entropy, "
          f"mean of {args.train_steps} steps after {args.train_warmup} warm-up, interleaved\n")
    print(f"{'optimizer':32s} {'s/step':>9s} {'x SGD-m':>9s} {'target':>8s}")
    ok = True
    for label, sec, target, err in rows:
        if err:
            print(f"{label:32s} {'skipped':>9s}   ({err})")
            continue
        r = sec / base
        verdict = ""
        if target is not None:
            verdict = "holds" if r <= target else "MISSED"
            ok &= r <= target
        print(f"{label:32s} {sec:9.3f} {r:9.2f} {('<= %.2f' % target) if target else '':>8s} "
              f"{verdict}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    ap.add_argument("--rounds", type=int, default=5, help="turns the optimizers take")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--only", nargs="*", default=None,
                    help="step part: only rows whose name contains one of these (plus the baseline)")
    ap.add_argument("--part", choices=["step", "train", "both"], default="both",
                    help="optimizer.step() only, the whole training step, or both")
    ap.add_argument("--batch", type=int, default=32, help="training-step batch")
    ap.add_argument("--image-size", type=int, default=64, help="training-step image size")
    ap.add_argument("--train-steps", type=int, default=20, help="timed training steps each")
    ap.add_argument("--train-warmup", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("step", "both"):
        report(run(args), args)
    if args.part in ("train", "both"):
        report_train(run_train_steps(args), args)


if __name__ == "__main__":
    main()
