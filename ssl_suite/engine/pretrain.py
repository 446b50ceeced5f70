"""BYOL pretraining loop (Grill et al. 2020) on Hugging Face Accelerate.

One optimizer step, as the data path in DESIGN.md draws it::

    uint8 batch -> device -> augment (T, T') -> online(v1, v2) -> q1, q2
                                             -> target(v1), target(v2) -> z1, z2 (no grad)
    loss = L(q1, z2) + L(q2, z1) -> backward -> optimizer.step(closure) -> EMA(target, tau_k)

The engine always calls ``optimizer.step(closure)``; the closure zeroes the gradients, runs the
``grad_accum_steps`` micro-batches of this step (forward + backward, DDP gradient sync only on the
last one) and returns the mean loss. The LR schedule and tau advance once per optimizer step.
"""

from __future__ import annotations

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
from ..data.loader import BatchPlan, iterate_epoch
from ..errors import CheckpointError, NonFiniteLossError
from ..models import build_byol, byol_loss, ema_update_, tau_schedule
from ..optim import build_scheduler, create_optimizer
from . import checkpoint as ckpt
from .knn import evaluate_knn
from .metrics import MetricsWriter

log = logging.getLogger("ssl_suite")


@dataclass
class PretrainResult:
    run_dir: Path
    step: int
    knn_init: Optional[float]
    knn_final: Optional[float]
    final_loss: Optional[float]
    online: Any = None   # the unwrapped online network (encoder, projector, predictor)
    target: Any = None   # the target network


def make_accelerator(precision: str = "no", trackers: Optional[list[str]] = None,
                     project_dir: Optional[Path] = None, comm_hook: str = "none") -> Accelerator:
    """An Accelerator for this process; under torchrun without CUDA it joins a gloo group.

    Accelerate only forms a multi-process CPU group when asked with ``cpu=True``; ``accelerate
    launch --cpu`` asks through the environment, a plain ``torchrun`` does not.
    """
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

    _seed_all(cfg.seed)
    online, target = build_byol(cfg.model)
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
                                 num_samples=len(data.pretrain), epochs=total_steps / steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch, total_steps)
    online, optimizer = accelerator.prepare(online, optimizer)
    raw_online = accelerator.unwrap_model(online)
    ema_target, ema_online = target.ema_pairs(raw_online)

    augment = BYOLAugment(cfg.augment, data.mean, data.std).to(device)
    mean = cfg.augment.mean or data.mean
    std = cfg.augment.std or data.std
    eval_tf = partial(eval_transform, image_size=cfg.augment.image_size, mean=mean, std=std)

    # ---- state: fresh or resumed -----------------------------------------------------------
    step, knn_init = 0, None
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=main)
    if resume_dir is not None:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(f"--resume: {run_dir} has no complete checkpoint")
        loaded = ckpt.load_checkpoint(latest, rank)
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
            metrics.write({"step": 0, "epoch": 0, "knn_top1": knn_init})
            log.info("kNN top-1 at initialisation: %.4f", knn_init)

    # ---- the loop -----------------------------------------------------------------------------
    accum = tc.grad_accum_steps
    use_scaler = accelerator.scaler is not None
    last_good: Optional[Path] = ckpt.latest_checkpoint(run_dir)
    loss_sum = torch.zeros((), device=device)
    loss_count, last_loss = 0, None
    t_last, images_since = time.perf_counter(), 0
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
                     "step": at_step, "world": world, "knn_init": knn_init,
                     "config": to_dict(cfg),
                     "scaler": accelerator.scaler.state_dict() if use_scaler else None}
            ckpt.save_main(tmp, raw_online.state_dict(), target.state_dict(), state)
        ckpt.save_rng(tmp, rank)
        accelerator.wait_for_everyone()
        if main:
            last_good = ckpt.finish_save(tmp, tc.keep_checkpoints)
        accelerator.wait_for_everyone()

    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        end = min(steps_per_epoch, start + (total_steps - step))
        for micro_batches in iterate_epoch(data.pretrain, plan, epoch, start, rank,
                                           num_workers=cfg.data.num_workers,
                                           pin_memory=device.type == "cuda", end_step=end):
            holder: dict[str, torch.Tensor] = {}

            def closure() -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                total = torch.zeros((), device=device)
                for i, (images, _) in enumerate(micro_batches):
                    images = images.to(device, non_blocking=True)
                    v1, v2 = augment(images)
                    if tc.channels_last:
                        v1 = v1.contiguous(memory_format=torch.channels_last)
                        v2 = v2.contiguous(memory_format=torch.channels_last)
                    sync = accelerator.no_sync(online) if i < accum - 1 else nullcontext()
                    with sync:
                        with accelerator.autocast():
                            q1, q2 = online(v1, v2)
                            z1, z2 = target(v1), target(v2)
                        loss = byol_loss(q1, q2, z1, z2)
                        accelerator.backward(loss / accum)
                    total = total + loss.detach()
                holder["loss"] = total / accum
                return holder["loss"]

            if use_scaler:  # GradScaler does not take closures
                closure()
                optimizer.step()
            else:
                optimizer.step(closure)
            scheduler.step()
            ema_update_(ema_target, ema_online, tau_schedule(step, total_steps, cfg.byol.tau_base))
            step += 1
            images_since += tc.batch_size
            loss_sum += holder["loss"]
            loss_count += 1
            bar.update(1)

            if step % tc.log_every == 0 or step == total_steps:
                loss_val = check_finite(step)
                now = time.perf_counter()
                rec = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_val,
                       "lr": optimizer.param_groups[0]["lr"],
                       "tau": tau_schedule(step, total_steps, cfg.byol.tau_base),
                       "images_per_s": images_since / max(now - t_last, 1e-9)}
                t_last, images_since = now, 0
                metrics.write(rec)
                if tc.trackers:
                    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.3g}",
                                tau=f"{rec['tau']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            if step % tc.checkpoint_every == 0 and step < total_steps:
                save(step)
        epoch_done = step % steps_per_epoch == 0
        if epoch_done and tc.knn_every > 0 and (step // steps_per_epoch) % tc.knn_every == 0 \
                and step < total_steps:
            acc = run_knn()
            if main and acc is not None:
                metrics.write({"step": step, "epoch": step // steps_per_epoch, "knn_top1": acc})
                bar.write(f"epoch {step // steps_per_epoch}: kNN top-1 {acc:.4f}")
            t_last, images_since = time.perf_counter(), 0  # keep evaluation out of images/s
    bar.close()

    save(total_steps)
    knn_final = run_knn()
    if main and knn_final is not None:
        metrics.write({"step": total_steps, "epoch": total_steps / steps_per_epoch,
                       "knn_top1": knn_final})
    if tc.trackers:
        accelerator.end_training()
    return PretrainResult(run_dir, total_steps, knn_init, knn_final, last_loss, raw_online, target)


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
