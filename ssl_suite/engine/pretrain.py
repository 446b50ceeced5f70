"""BYOL pretraining loop (Grill et al. 2020) on Hugging Face Accelerate.

One optimizer step, as the data path in DESIGN.md draws it::

    uint8 batch -> device -> augment (T, T') -> online(v1, v2) -> q1, q2
                                             -> target(v1), target(v2) -> z1, z2 (no grad)
    loss = L(q1, z2) + L(q2, z1) -> backward -> optimizer.step(closure) -> EMA(target, tau_k)

The engine always calls ``optimizer.step(closure)`` (:mod:`ssl_suite.optim.protocol`): the
optimizer's hooks are attached to the online network once (``protocol.attach``); the closure zeroes
the gradients, runs the ``grad_accum_steps`` micro-batches of this step (forward +
``protocol.backward``, DDP gradient sync only on the last one) and returns the per-image loss
vector of the whole step. Optimizers that call the closure several times per step on *fresh*
batches (``fresh_batches = True``: Entropy-SGD's inner loop, Replicated SGD's replicas) get the
planned batch on the first call and a new batch (:func:`~ssl_suite.data.loader.extra_batch`,
augmented anew) on each later call. The LR schedule and tau advance once per optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from ..augment import BYOLAugment, eval_transform
from ..config import Config, ConfigError, save_yaml, to_dict
from ..data import build_data
from ..data.loader import BatchPlan, extra_batch, iterate_epoch, take
from ..errors import CheckpointError, NonFiniteLossError
from ..models import build_byol, byol_loss, ema_update_, tau_schedule
from ..optim import build_scheduler, create_optimizer, protocol
from . import checkpoint as ckpt
from . import phases
from .knn import evaluate_knn
from .metrics import MetricsWriter

log = logging.getLogger("ssl_suite")

GROWTH_CALL = 1_000_003   # extra_batch call index of GradMax's growth batch (apart from closures)


@dataclass
class PretrainResult:
    run_dir: Path
    step: int
    knn_init: Optional[float]
    knn_final: Optional[float]
    final_loss: Optional[float]
    online: Any = None   # the unwrapped online network (encoder, projector, predictor)
    target: Any = None   # the target network


def native_bf16() -> bool:
    """Whether bf16 runs natively here: a CUDA device with bf16, or a CPU with AMX tiles or
    AVX512-BF16 (elsewhere torch emulates bf16 matrix products, which can be 100x slower than
    float32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(c() for c in checks if c is not None)


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``no``; an explicit ``bf16`` on a CPU
    without bf16 units is kept but warned about."""
    if precision == "auto":
        return "bf16" if native_bf16() else "no"
    if precision == "bf16" and not torch.cuda.is_available() and not native_bf16():
        log.warning("train.precision=bf16: this CPU has no AMX or AVX512-BF16, so bf16 is emulated "
                    "and much slower than float32; train.precision=auto picks float32 here")
    return precision


def make_accelerator(precision: str = "no", trackers: Optional[list[str]] = None,
                     project_dir: Optional[Path] = None, comm_hook: str = "none") -> Accelerator:
    """An Accelerator for this process; under torchrun without CUDA it joins a gloo group.

    Accelerate only forms a multi-process CPU group when asked with ``cpu=True``; ``accelerate
    launch --cpu`` asks through the environment, a plain ``torchrun`` does not.
    """
    precision = resolve_precision(precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 on a CPU")
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = multi_process and not torch.cuda.is_available()
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", state.get("mixed_precision")) != precision:
        # Accelerate keeps one state per process; a second run in the same process (a notebook,
        # a comparison of several configs) may ask for another precision. The process group
        # (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    handlers = []
    if comm_hook != "none":
        from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs
        handlers.append(DistributedDataParallelKwargs(
            comm_hook=DDPCommunicationHookType(comm_hook)))
    try:
        return Accelerator(mixed_precision=precision, cpu=cpu, log_with=trackers or None,
                           project_dir=str(project_dir) if project_dir else None,
                           kwargs_handlers=handlers)
    except ValueError as e:
        if trackers and "logging capability" in str(e):
            raise ConfigError(f"train.trackers: {e}") from None
        raise


@torch.no_grad()
def average_buffers(modules: list[torch.nn.Module], accelerator: Accelerator) -> None:
    """Average floating buffers (BN running statistics) over processes: without SyncBN (CPU
    processes) each process's statistics come from its own part of the batch."""
    if accelerator.num_processes == 1:
        return
    for m in modules:
        for b in m.buffers():
            if b.is_floating_point():
                b.copy_(accelerator.reduce(b.detach().clone(), reduction="mean"))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if not resume and ckpt.list_checkpoints(run_dir):
        raise ConfigError(f"run_dir: {run_dir} already holds checkpoints; continue it with "
                          f"--resume {run_dir} or choose another run_dir")


def pretrain(cfg: Config, resume_dir: Optional[str] = None,
             accelerator: Optional[Accelerator] = None) -> PretrainResult:
    """Run (or continue) BYOL pretraining described by ``cfg``; returns the final numbers."""
    run_dir = Path(resume_dir or cfg.run_dir)
    tc = cfg.train
    if accelerator is None:
        accelerator = make_accelerator(tc.precision, tc.trackers, run_dir, tc.ddp_comm_hook)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    if main:
        _check_run_dir(run_dir, resume_dir is not None)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_dir is None:
            save_yaml(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()

    # ---- data, plan, models (identical initial weights on every process) -----------------
    data = build_data(cfg.data, show_progress=main and tc.progress)
    try:
        plan = BatchPlan(len(data.pretrain), tc.batch_size, cfg.seed, tc.grad_accum_steps, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    steps_per_epoch = plan.steps_per_epoch
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)

    loaded = None
    if resume_dir is not None:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(f"--resume: {run_dir} has no complete checkpoint")
        loaded = ckpt.load_checkpoint(latest, rank)

    _seed_all(cfg.seed)
    online, target = build_byol(cfg.model)
    phases.check_combination(cfg.model.weight_norm, cfg.growth.enabled, cfg.sparsity.enabled,
                             wrs=cfg.optim.wrs, log_elr=tc.log_elr)
    growth = None   # GradMax: pairs start thin (the target too) and grow after chosen steps
    if cfg.growth.enabled:
        growth = phases.Growth.build(cfg.growth, online, steps_per_epoch, twins=[target])
        if loaded is not None:   # the widths the run had reached
            growth.fit_to_state(online, loaded["online"])
            growth.fit_to_state(target, loaded["target"])
    if cfg.model.weight_norm and cfg.model.weight_norm_init == "data" and resume_dir is None:
        _weight_norm_init(online, target, cfg, data, plan.micro_batch, device)
    if cfg.init.gradinit.enabled and resume_dir is None:
        _gradinit(online, target, cfg, data, plan.micro_batch, accelerator,
                  run_dir / "gradinit.json" if main else None)
    sparsity = phases.Sparsity(cfg.sparsity, online, twins=[target]) \
        if cfg.sparsity.enabled else None   # SCL masks on online and target alike
    if tc.grad_checkpointing:
        if not hasattr(online.encoder, "set_grad_checkpointing"):
            raise ConfigError(f"train.grad_checkpointing: {cfg.model.backbone} does not support it")
        online.encoder.set_grad_checkpointing(True)
    if tc.sync_bn and world > 1 and device.type == "cpu":
        if main:
            log.warning("train.sync_bn: torch's SyncBatchNorm needs GPUs; on CPU processes each "
                        "batch-norm layer uses its own process's batch statistics")
    elif tc.sync_bn and world > 1:
        online = torch.nn.SyncBatchNorm.convert_sync_batchnorm(online)
        target = torch.nn.SyncBatchNorm.convert_sync_batchnorm(target)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    online.to(memory_format=memory_format)
    target.to(device=device, memory_format=memory_format)

    optimizer = create_optimizer({"encoder": online.encoder, "projector": online.projector,
                                  "predictor": online.predictor}, cfg.optim, tc.batch_size,
                                 num_samples=len(data.pretrain), epochs=total_steps / steps_per_epoch,
                                 total_steps=total_steps,
                                 extra_groups=[sparsity.param_group()] if sparsity else None)
    if growth is not None:
        phases.check_growth_optimizer(optimizer, cfg.optim.name)
    scheduler = None   # lanczos: built below, once the augmentation exists
    if cfg.schedule.name != "lanczos":
        scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch, total_steps)
    online, optimizer = accelerator.prepare(online, optimizer)
    raw_online = accelerator.unwrap_model(online)
    ema_target, ema_online = target.ema_pairs(raw_online)
    hooks = protocol.attach(optimizer, raw_online)  # NSGD/MBF/SVI hooks; a no-op for the others
    algo = protocol.unwrap(optimizer)
    fresh = bool(getattr(algo, "fresh_batches", False))   # a new batch on every closure call
    if accelerator.scaler is not None and getattr(algo, "requires_closure", False):
        hooks.remove()
        raise ConfigError(f"train.precision: fp16 steps through GradScaler, which cannot pass the "
                          f"closure {type(algo).__name__} needs; use bf16 or fp32")

    wrs = monitor = None   # weight rescaling (a callback after each step); the ELR monitor
    if cfg.optim.wrs:
        from ..optim.wrs import WeightRescaling
        wrs = WeightRescaling(raw_online, per=cfg.optim.wrs_per,
                              target_norm=cfg.optim.wrs_target_norm)
        if resume_dir is None:
            wrs.on_train_start()
    if tc.log_elr:
        from ..optim.wrs import ELRMonitor
        monitor = ELRMonitor(raw_online, every=tc.log_every)

    augment = BYOLAugment(cfg.augment, data.mean, data.std).to(device)
    if cfg.schedule.name == "lanczos":
        scheduler = _lanczos_scheduler(algo, cfg, raw_online, target, augment, data.pretrain,
                                       steps_per_epoch, device)
    mean = cfg.augment.mean or data.mean
    std = cfg.augment.std or data.std
    eval_tf = partial(eval_transform, image_size=cfg.augment.image_size, mean=mean, std=std)

    # ---- state: fresh or resumed -----------------------------------------------------------
    step, knn_init = 0, None
    wall_offset = 0.0   # training seconds of the run before this process (resume)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=main)
    if loaded is not None:
        ckpt.load_module_state(raw_online, loaded["online"], f"{latest}/online.safetensors")
        ckpt.load_module_state(target, loaded["target"], f"{latest}/target.safetensors")
        state = loaded["state"]
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if accelerator.scaler is not None and state.get("scaler"):
                accelerator.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {latest}/state.pt does not match this run: "
                                  f"{type(e).__name__}: {e}") from None
        step, knn_init = int(state["step"]), state.get("knn_init")
        wall_offset = float(state.get("wall_s", 0.0))
        if loaded["rng"] is not None and state.get("world") == world:
            ckpt.set_rng_state(loaded["rng"])
        else:
            log.warning("resuming with %d processes from a %s-process checkpoint: augmentation "
                        "RNG streams restart", world, state.get("world"))
            _seed_all(cfg.seed + 1 + rank + step)
        metrics.truncate_after(step)
        if main:
            log.info("resumed %s at step %d", latest, step)
    else:
        _seed_all(cfg.seed + 1 + rank)  # augmentation streams differ per process

    if tc.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat(to_dict(cfg)))

    def sync_buffers() -> None:
        average_buffers([raw_online, target], accelerator)

    def run_knn() -> Optional[float]:
        sync_buffers()
        if tc.knn_every < 0 or data.knn_train is None or data.knn_test is None or data.num_classes < 2:
            return None
        acc = None
        if main:
            acc = evaluate_knn(raw_online.encoder, data.knn_train, data.knn_test,
                               data.num_classes, device, eval_tf, tc.knn_k, tc.knn_temperature,
                               tc.eval_batch_size, accelerator.autocast, progress=tc.progress)
        accelerator.wait_for_everyone()
        return acc

    if step == 0:  # the same encoder at random initialisation, for comparison
        knn_init = run_knn()
        if main and knn_init is not None:
            metrics.write({"step": 0, "epoch": 0, "knn_top1": knn_init, "wall_s": 0.0})
            log.info("kNN top-1 at initialisation: %.4f", knn_init)

    # ---- the loop -----------------------------------------------------------------------------
    accum = tc.grad_accum_steps
    use_scaler = accelerator.scaler is not None
    last_good: Optional[Path] = ckpt.latest_checkpoint(run_dir)
    loss_sum = torch.zeros((), device=device)
    loss_count, last_loss = 0, None
    t_last, images_since = time.perf_counter(), 0
    t_start = t_last

    def wall() -> float:   # seconds since the run began (kNN monitors included), across resumes
        return wall_offset + time.perf_counter() - t_start

    bar = tqdm(total=total_steps, initial=step, disable=not (main and tc.progress),
               desc="pretrain", unit="step", dynamic_ncols=True)

    def check_finite(at_step: int) -> Optional[float]:
        nonlocal loss_sum, loss_count, last_loss
        if loss_count == 0:
            return last_loss
        mean_loss = accelerator.reduce(loss_sum / loss_count, reduction="mean").item()
        loss_sum, loss_count = torch.zeros((), device=device), 0
        if not math.isfinite(mean_loss):
            bar.close()
            where = f"{last_good}" if last_good is not None else "none was written yet"
            raise NonFiniteLossError(
                f"loss became {mean_loss} by step {at_step}; stopped. Last good checkpoint: "
                f"{where}. Try a lower optim.base_lr or train.precision=no")
        last_loss = mean_loss
        return mean_loss

    def save(at_step: int) -> None:
        nonlocal last_good
        check_finite(at_step)
        sync_buffers()
        tmp = ckpt.begin_save(run_dir, at_step, create=main)
        accelerator.wait_for_everyone()
        if main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "step": at_step, "world": world, "knn_init": knn_init, "wall_s": wall(),
                     "config": to_dict(cfg),
                     "scaler": accelerator.scaler.state_dict() if use_scaler else None}
            ckpt.save_main(tmp, raw_online.state_dict(), target.state_dict(), state)
        ckpt.save_rng(tmp, rank)
        accelerator.wait_for_everyone()
        if main:
            last_good = ckpt.finish_save(tmp, tc.keep_checkpoints)
        accelerator.wait_for_everyone()

    masked_once = sparsity.cached if sparsity is not None else nullcontext

    def grow(at_step: int) -> None:
        """GradMax growth on a fresh batch; then the EMA pairs and the DDP wrapper follow."""
        nonlocal online, ema_target, ema_online
        batches = extra_batch(data.pretrain, plan, at_step, GROWTH_CALL, rank)

        def loss_closure():
            raw_online.zero_grad(set_to_none=True)
            if tc.grad_checkpointing:   # GradMax's hooks pair each forward with its backward
                raw_online.encoder.set_grad_checkpointing(False)
            for images, _ in batches:
                v1, v2 = augment(images.to(device))
                with accelerator.autocast():
                    q1, q2 = raw_online(v1, v2)
                    z1, z2 = target(v1), target(v2)
                (byol_loss(q1, q2, z1, z2) / len(batches)).backward()
            if tc.grad_checkpointing:
                raw_online.encoder.set_grad_checkpointing(True)

        reduce = (lambda t: accelerator.reduce(t, reduction="mean")) if world > 1 else None
        widths = growth.grow(at_step, loss_closure, optimizer, reduce=reduce, seed=cfg.seed)
        ema_target, ema_online = target.ema_pairs(raw_online)
        if world > 1:
            online = accelerator.prepare_model(raw_online)
        metrics.write({"step": at_step, "epoch": at_step / steps_per_epoch,
                       "growth_widths": widths, "wall_s": wall()})

    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        end = min(steps_per_epoch, start + (total_steps - step))
        for micro_batches in iterate_epoch(data.pretrain, plan, epoch, start, rank,
                                           num_workers=cfg.data.num_workers,
                                           pin_memory=device.type == "cuda", end_step=end):
            holder: dict[str, torch.Tensor] = {}
            calls = [0]

            def closure() -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                batches = micro_batches
                if calls[0] and fresh:   # Entropy-SGD's inner steps, Replicated SGD's replicas
                    batches = extra_batch(data.pretrain, plan, step, calls[0], rank)
                calls[0] += 1
                per_image = []
                for i, (images, _) in enumerate(batches):
                    images = images.to(device, non_blocking=True)
                    v1, v2 = augment(images)
                    if tc.channels_last:
                        v1 = v1.contiguous(memory_format=torch.channels_last)
                        v2 = v2.contiguous(memory_format=torch.channels_last)
                    sync = accelerator.no_sync(online) if i < accum - 1 else nullcontext()
                    with sync:
                        with accelerator.autocast(), masked_once():
                            q1, q2 = online(v1, v2)
                            z1, z2 = target(v1), target(v2)
                        losses = byol_loss(q1, q2, z1, z2, reduction="none")
                        objective = losses.mean() / accum
                        if sparsity is not None and i == 0:   # SCL: lambda * R, once a step
                            objective = objective + sparsity.penalty()
                        protocol.backward(optimizer, objective, accelerator)
                    per_image.append(losses.detach())
                losses = torch.cat(per_image)
                holder.setdefault("loss", losses.mean())   # the planned batch's loss is logged
                return losses

            if monitor is not None:
                monitor.before_step()
            if use_scaler:  # GradScaler does not take closures
                closure()
                optimizer.step()
            else:
                optimizer.step(closure)
            if wrs is not None:
                wrs.after_step()
            elr = monitor.after_step(algo) if monitor is not None else None
            scheduler.step()
            ema_update_(ema_target, ema_online, tau_schedule(step, total_steps, cfg.byol.tau_base))
            step += 1
            images_since += tc.batch_size
            loss_sum += holder["loss"]
            loss_count += 1
            bar.update(1)
            if growth is not None and growth.due(step):
                grow(step)

            if step % tc.log_every == 0 or step == total_steps:
                loss_val = check_finite(step)
                now = time.perf_counter()
                rec = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_val,
                       "lr": optimizer.param_groups[0]["lr"],
                       "tau": tau_schedule(step, total_steps, cfg.byol.tau_base),
                       "images_per_s": images_since / max(now - t_last, 1e-9),
                       "wall_s": wall()}
                if elr:
                    rec.update({k: v for k, v in elr.items() if isinstance(v, (int, float))})
                if sparsity is not None:   # SCL: fraction of pruned connections
                    report = sparsity.report()
                    rec["sparsity"] = report.pop("global")
                    if main:
                        (run_dir / "sparsity.json").write_text(json.dumps(
                            {"step": step, "global": rec["sparsity"], "layers": report},
                            indent=1) + "\n")
                t_last, images_since = now, 0
                metrics.write(rec)
                if tc.trackers:
                    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.3g}",
                                tau=f"{rec['tau']:.4f}", img_s=f"{rec['images_per_s']:.0f}",
                                **({"sparsity": f"{rec['sparsity']:.3f}"} if sparsity else {}))
            if step % tc.checkpoint_every == 0 and step < total_steps:
                save(step)
        epoch_done = step % steps_per_epoch == 0
        if epoch_done and tc.knn_every > 0 and (step // steps_per_epoch) % tc.knn_every == 0 \
                and step < total_steps:
            acc = run_knn()
            if main and acc is not None:
                metrics.write({"step": step, "epoch": step // steps_per_epoch, "knn_top1": acc,
                               "wall_s": wall()})
                bar.write(f"epoch {step // steps_per_epoch}: kNN top-1 {acc:.4f}")
            t_last, images_since = time.perf_counter(), 0  # keep evaluation out of images/s
    bar.close()
    hooks.remove()
    if getattr(algo, "recompute_bn_after_training", False) and tc.bn_recompute_batches > 0:
        _recompute_bn(raw_online, augment, accelerator, data.pretrain, plan, total_steps, rank,
                      tc.bn_recompute_batches)

    save(total_steps)
    knn_final = run_knn()
    if main and knn_final is not None:
        metrics.write({"step": total_steps, "epoch": total_steps / steps_per_epoch,
                       "knn_top1": knn_final, "wall_s": wall()})
    if tc.trackers:
        accelerator.end_training()
    return PretrainResult(run_dir, total_steps, knn_init, knn_final, last_loss, raw_online, target)


def seeded_views(transform, images: torch.Tensor, seed: int, device: torch.device):
    """``transform(images)`` without gradients under its own RNG stream seeded by ``seed`` (the
    run's global streams untouched): the same views on every process and in every resume."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            return transform(images)


def _weight_norm_init(online, target, cfg: Config, data, n: int, device) -> None:
    """Salimans & Kingma's data-dependent initialisation (§3) of the weight-normalised networks
    from one batch of ``n`` pretraining images (a micro-batch) and their views T, T', drawn from
    generators seeded by the run's seed, so every process computes the same initial weights and
    the global RNG streams of the run are untouched. The target gets the same treatment on the
    same views (or the online weights, with ``model.target_init=copy``)."""
    from ..models.weight_norm import data_dependent_init

    g = torch.Generator().manual_seed(cfg.seed * 7_919 + 3)
    idx = torch.randperm(len(data.pretrain), generator=g)[:n]
    images = take(data.pretrain, idx)[0].to(device)
    augment = BYOLAugment(cfg.augment, data.mean, data.std).to(device)
    v1, v2 = seeded_views(augment, images, cfg.seed * 7_919 + 5, device)
    online.to(device).train()
    data_dependent_init(online, lambda: online(v1, v2))
    if cfg.model.target_init == "copy" or cfg.model.pretrained:
        target.encoder.load_state_dict(online.encoder.state_dict())
        target.projector.load_state_dict(online.projector.state_dict())
    else:
        target.to(device).train()
        data_dependent_init(target, lambda: (target(v1), target(v2)))


def _gradinit(online, target, cfg: Config, data, n: int, accelerator, out_path) -> None:
    """GradInit (Zhu et al. 2021) on the online network's BYOL loss before the first step.

    Each GradInit batch: ``init.gradinit.batch_size`` (or ``n``) pretraining images drawn from a
    generator seeded by the run's seed (the same on every process; the multipliers are averaged
    over processes all the same), their two views, and the target's projections of them (batch
    statistics, running statistics untouched). The simulated optimizer's LR defaults to the
    run's scaled LR. The target, built like the online network, gets the same multipliers (or a
    copy of the online weights with ``model.target_init=copy``)."""
    from ..analysis.hessian import batch_statistics_only
    from ..optim.factory import scaled_lr

    gc, device = cfg.init.gradinit, accelerator.device
    size = min(gc.batch_size or n, len(data.pretrain))
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + 41)
    augment = BYOLAugment(cfg.augment, data.mean, data.std).to(device)
    online.to(device)
    target.to(device)

    def batches():
        while True:
            idx = torch.randperm(len(data.pretrain), generator=g)[:size]
            images = take(data.pretrain, idx)[0].to(device)
            v1, v2 = seeded_views(augment, images, int(torch.randint(2**31, (1,), generator=g)),
                                  device)
            with torch.no_grad(), batch_statistics_only(target):
                z1, z2 = target(v1), target(v2)
            yield v1, v2, z1, z2   # outside no_grad: a suspended generator would keep it off

    def loss_fn(model, batch):
        v1, v2, z1, z2 = batch
        return byol_loss(*model(v1, v2), z1, z2)

    copy_target = cfg.model.target_init == "copy" or cfg.model.pretrained
    reduce = ((lambda t: accelerator.reduce(t.to(device), reduction="mean").cpu())
              if accelerator.num_processes > 1 else None)
    phases.run_gradinit(online, loss_fn, batches(), gc, cfg.optim.name,
                        scaled_lr(cfg.optim.base_lr, cfg.train.batch_size, cfg.optim.lr_scaling),
                        also=[] if copy_target else [target], reduce=reduce,
                        progress=accelerator.is_main_process and cfg.train.progress,
                        out_path=out_path)
    if copy_target:
        target.encoder.load_state_dict(online.encoder.state_dict())
        target.projector.load_state_dict(online.projector.state_dict())


def _lanczos_scheduler(optimizer, cfg: Config, online, target, augment, dataset,
                       steps_per_epoch: int, device):
    """``schedule.name=lanczos``: :class:`ssl_suite.analysis.lr_rules.LanczosLR` on the BYOL loss.

    The curvature function is fixed for the whole run, as in Granziol et al.'s code (20 Lanczos
    steps on a fixed set of examples): ``schedule.lanczos_images`` pretraining images drawn once
    from the run's seed, their two views drawn once; at each estimate the current target's
    projections are recomputed (no grad) and the Hessian of the online network's BYOL loss (all
    its parameters, BN with batch statistics and running statistics left alone, float32, no
    autocast) goes through ``schedule.lanczos_steps`` Lanczos iterations. Every process computes
    the same estimate on the same images. Before ``schedule.warmup_epochs`` the LR stays at the
    factory's (base) LR; afterwards every param group gets the learned LR (times
    ``lanczos_lr_scale``; per-group LR multipliers do not apply) and, where the optimizer has a
    momentum, the learned momentum."""
    from ..analysis.hessian import HessianOperator, batch_statistics_only, lanczos
    from ..analysis.lr_rules import LanczosLR

    sc = cfg.schedule
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + 17)
    idx = torch.randint(len(dataset), (sc.lanczos_images,), generator=g)
    images = take(dataset, idx)[0].to(device)
    v1, v2 = seeded_views(augment, images, cfg.seed * 7_919 + 29, device)
    params = [p for grp in optimizer.param_groups for p in grp["params"] if p.requires_grad]

    def estimate():
        with torch.no_grad(), batch_statistics_only(target):
            z1, z2 = target(v1), target(v2)
        with batch_statistics_only(online):
            op = HessianOperator(params, lambda: byol_loss(*online(v1, v2), z1, z2))
            return lanczos(op, sc.lanczos_steps, seed=cfg.seed)

    has_momentum = all("momentum" in grp for grp in optimizer.param_groups)
    return LanczosLR(optimizer, estimate,
                     every=max(1, int(round(sc.lanczos_every_epochs * steps_per_epoch))),
                     warmstart=int(round(sc.warmup_epochs * steps_per_epoch)),
                     variant=sc.lanczos_variant, lr_scale=sc.lanczos_lr_scale,
                     set_momentum=has_momentum)


def _recompute_bn(online, augment, accelerator, dataset, plan: BatchPlan, step: int, rank: int,
                  n: int) -> None:
    """The final model of an averaging optimizer (Replicated SGD's centre) never ran forward
    itself: re-estimate the online network's BatchNorm statistics as the plain average over
    ``n`` fresh augmented batches (Pittorino et al. 2021 average the replicas' buffers instead;
    see :func:`ssl_suite.optim.replica_sgd.recompute_bn_stats`). Every process averages its own
    slice; the checkpoint averages the processes' buffers."""
    from ..optim.replica_sgd import recompute_bn_stats

    def batches():
        for k in range(1, n + 1):
            for images, _ in extra_batch(dataset, plan, step, k, rank):
                yield images.to(accelerator.device, non_blocking=True)

    def forward(model, images):
        v1, v2 = augment(images)
        with accelerator.autocast():
            model(v1, v2)
    recompute_bn_stats(online, batches(), forward=forward)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def resume_config(run_dir: str, overrides: Optional[list[str]] = None) -> Config:
    """The config saved in a run directory, for ``--resume`` (overrides e.g. train.epochs)."""
    from .runs import run_config
    return run_config(run_dir, overrides, flag="--resume")
