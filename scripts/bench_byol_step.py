"""Images/s of one full BYOL training step: ssl_suite vs a lightly loop vs a bare loop.

All three run in this process on the same backbone (timm ResNet-18, CIFAR stem), 32x32 inputs,
batch 64, the same projector/predictor sizes, LARS-style optimizer and EMA target:

* ``ssl_suite``: the engine's step: kornia batched views on the device (both views, per-sample
  parameters), online(v1, v2), target(v1), target(v2), summed loss, ``optimizer.step(closure)``
  with the foreach LARS, per-step schedule, foreach EMA.
* ``lightly``: the same step assembled from lightly's BYOL modules the way its examples do:
  ``BYOLTransform`` (torchvision, per sample) for the two views, ``BYOLProjectionHead`` /
  ``BYOLPredictionHead``, ``NegativeCosineSimilarity``, ``update_momentum`` and
  ``lightly.utils.lars.LARS``; augmentation runs in the main process as ours does.
* ``bare``: forward/backward/step of the same networks on ready-made view tensors, plain
  ``torch.optim.SGD``, no augmentation, no EMA: the floor under any framework.

Precision: fp32, and bf16 autocast (``torch.autocast``; Accelerate's ``bf16`` does the same).
Printed ratios are against lightly's fp32 loop measured in the same run, plus the share of the
step spent in augmentation and in the EMA update.

    python scripts/bench_byol_step.py [--steps 20] [--batch 64] [--device cpu|cuda]

Needs ``pip install -e ".[bench]"`` (lightly is a benchmark-only dependency).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def autocast_ctx(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ------------------------------------------------------------------------------------------------
# ssl_suite


def build_ours(batch: int, device: torch.device, precision: str):
    from ssl_suite.augment import BYOLAugment
    from ssl_suite.config import build_config
    from ssl_suite.models import build_byol, byol_loss, ema_update_, tau_schedule
    from ssl_suite.optim import create_optimizer, warmup_cosine_scheduler

    cfg = build_config({}, ["model.cifar_stem=true", "augment.image_size=32",
                            "optim.base_lr=1.0", "optim.trust_coeff=0.02"])
    online, target = build_byol(cfg.model)
    online.to(device)
    target.to(device)
    opt = create_optimizer({"encoder": online.encoder, "projector": online.projector,
                            "predictor": online.predictor}, cfg.optim, batch)
    sched = warmup_cosine_scheduler(opt, 10, 10_000)
    augment = BYOLAugment(cfg.augment, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).to(device)
    tgt, src = target.ema_pairs(online)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    state = {"k": 0}

    def step():
        def closure():
            opt.zero_grad(set_to_none=True)
            v1, v2 = augment(images)
            with autocast_ctx(device, precision):
                q1, q2 = online(v1, v2)
                z1, z2 = target(v1), target(v2)
            loss = byol_loss(q1, q2, z1, z2)
            loss.backward()
            return loss
        opt.step(closure)
        sched.step()
        ema_update_(tgt, src, tau_schedule(state["k"], 10_000, 0.99))
        state["k"] += 1

    return step, (lambda: augment(images)), (lambda: ema_update_(tgt, src, 0.99))


# ------------------------------------------------------------------------------------------------
# lightly


def build_lightly(batch: int, device: torch.device, precision: str):
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import (BYOLTransform, BYOLView1Transform,
                                                   BYOLView2Transform)
    from lightly.utils.lars import LARS as LightlyLARS
    from PIL import Image

    from ssl_suite.models import create_backbone

    class LightlyBYOL(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = create_backbone("resnet18", cifar_stem=True)
            self.projection_head = BYOLProjectionHead(512, 4096, 256)
            self.prediction_head = BYOLPredictionHead(256, 4096, 256)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    model = LightlyBYOL().to(device)
    criterion = NegativeCosineSimilarity()
    params = [p for n, p in model.named_parameters() if "momentum" not in n]
    opt = LightlyLARS(params, lr=1.0, momentum=0.9, weight_decay=1.5e-6, trust_coefficient=0.02)
    transform = BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0),
                              BYOLView2Transform(input_size=32, gaussian_blur=0.0))
    pil = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
           for _ in range(batch)]

    def make_views():
        pairs = [transform(im) for im in pil]
        x0 = torch.stack([p[0] for p in pairs]).to(device)
        x1 = torch.stack([p[1] for p in pairs]).to(device)
        return x0, x1

    def ema():
        update_momentum(model.backbone, model.backbone_momentum, m=0.99)
        update_momentum(model.projection_head, model.projection_head_momentum, m=0.99)

    def step():
        x0, x1 = make_views()
        ema()
        with autocast_ctx(device, precision):
            p0, p1 = model(x0), model(x1)
            z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
        loss = 2 * (criterion(p0.float(), z1.float()) + criterion(p1.float(), z0.float()))
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step, make_views, ema


# ------------------------------------------------------------------------------------------------
# bare


def build_bare(batch: int, device: torch.device, precision: str):
    from ssl_suite.models import MLPHead, create_backbone

    enc = create_backbone("resnet18", cifar_stem=True)
    online = nn.Sequential(enc, MLPHead(512), MLPHead(256)).to(device)
    target = nn.Sequential(create_backbone("resnet18", cifar_stem=True), MLPHead(512)).to(device)
    target.requires_grad_(False)
    opt = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9)
    v1 = torch.randn(batch, 3, 32, 32, device=device)
    v2 = torch.randn(batch, 3, 32, 32, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(device, precision):
            q1, q2 = online(v1), online(v2)
            with torch.no_grad():
                z1, z2 = target(v1), target(v2)
        loss = (2 - 2 * F.cosine_similarity(q1.float(), z2.float())).mean() + \
               (2 - 2 * F.cosine_similarity(q2.float(), z1.float())).mean()
        loss.backward()
        opt.step()

    return step, None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"BYOL step benchmark: ResNet-18 (CIFAR stem), 32x32, batch {args.batch}, "
          f"proj/pred 4096-256, device {name}, torch {torch.__version__}")

    results: dict[tuple[str, str], float] = {}
    extras: dict[str, float] = {}
    for precision in args.precisions.split(","):
        for label, builder in (("ssl_suite", build_ours), ("lightly", build_lightly),
                               ("bare", build_bare)):
            step, aug, ema = builder(args.batch, device, precision)
            sec = timed(step, args.steps, args.warmup, device)
            results[(label, precision)] = args.batch / sec
            print(f"  {label:10s} {precision}: {args.batch / sec:8.1f} images/s "
                  f"({sec * 1e3:.1f} ms/step)", flush=True)
            if aug is not None:
                extras[f"{label}_aug_{precision}"] = timed(aug, args.steps, 2, device) / sec
                extras[f"{label}_ema_{precision}"] = timed(ema, args.steps * 5, 5, device) / sec

    base = results[("lightly", "fp32")]
    print("\nratios (images/s against lightly's fp32 loop, same run):")
    for (label, precision), ips in results.items():
        print(f"  {label:10s} {precision}: {ips / base:5.2f}x")
    for precision in args.precisions.split(","):
        ours, bare = results[("ssl_suite", precision)], results[("bare", precision)]
        print(f"  ssl_suite / bare ({precision}): {ours / bare:5.2f}x")
    print("\nshare of one ssl_suite step (targets: augmentation <= 10%, EMA <= 1%):")
    for precision in args.precisions.split(","):
        print(f"  {precision}: augmentation (both views) {100 * extras[f'ssl_suite_aug_{precision}']:5.1f}%,"
              f" EMA update {100 * extras[f'ssl_suite_ema_{precision}']:5.2f}%"
              f"   | lightly: augmentation {100 * extras[f'lightly_aug_{precision}']:5.1f}%, "
              f"EMA {100 * extras[f'lightly_ema_{precision}']:5.2f}%")


if __name__ == "__main__":
    main()
