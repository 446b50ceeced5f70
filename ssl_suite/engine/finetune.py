"""Semi-supervised fine-tuning on a fraction of the labels (Grill et al. 2020, App. C.1).

The pretrained encoder plus a linear classifier are trained end to end (batch-norm in train
mode) on a labelled subset of the training split: a class-balanced ``data.label_fraction``
drawn deterministically from the seed, or the images named in ``data.label_split_file`` (one file
name per line, as the SimCLR ImageNet 1% / 10% lists). Training views are random resized crop +
flip; SGD with Nesterov momentum 0.9, no weight decay, cosine schedule, as the paper. Each LR of
``finetune.lrs`` is scored on a class-balanced held-out part of the training split that is
disjoint from the labelled subset; the best model is reported on the test split (top-1, top-5). Under ``accelerate launch`` the batch is split over processes (DDP).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config, ConfigError, EvalConfig
from ..data import balanced_indices
from ..data.loader import BatchPlan, iterate_epoch, iterate_eval, take
from ..optim import protocol
from . import phases
from .eval_common import (append_results, crop_flip_view, eval_data, eval_optimizer, result_rows,
                          topk_correct)
from .pretrain import average_buffers, make_accelerator, seeded_views
from .runs import load_encoder

log = logging.getLogger("ssl_suite")


def labelled_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced ``fraction`` of the labels (at least one per class),
    identical for the same labels, fraction and seed."""
    num_classes = int(labels.max()) + 1
    count = max(round(fraction * len(labels)), num_classes)
    return balanced_indices(labels, count, seed=seed)


def subset_from_file(dataset, split_file: str) -> torch.Tensor:
    """Indices of the dataset items whose file names are listed in ``split_file``."""
    path = Path(split_file)
    if not path.is_file():
        raise ConfigError(f"data.label_split_file: file not found: {path}")
    if not hasattr(dataset, "path"):
        raise ConfigError("data.label_split_file: needs an imagefolder dataset (file names)")
    wanted = {line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()}
    idx = [i for i in range(len(dataset)) if Path(dataset.path(i)).name in wanted]
    if not idx:
        raise ConfigError(f"data.label_split_file: none of the {len(wanted)} listed files is in "
                          "the training split")
    return torch.tensor(idx)


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, num_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


def finetune(run_dir: str, cfg: EvalConfig, run_cfg: Config, random_init: bool = False) -> dict:
    """Run the protocol; returns ``{"lr", "val_top1", "top1", "top5", "labelled", "sweep"}``."""
    fc = cfg.finetune
    accelerator = make_accelerator(cfg.precision)
    device, main, world = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    data = eval_data(cfg, run_cfg, fc.val_fraction, cfg.progress and main)
    if cfg.data.label_split_file:
        labelled_idx = subset_from_file(data.fit, cfg.data.label_split_file)
    else:
        labelled_idx = labelled_subset(data.fit.labels, cfg.data.label_fraction, cfg.seed)
    labelled = data.fit.subset(labelled_idx)
    n = len(labelled)
    batch = min(fc.batch_size, n - n % world) if n >= world else world
    batch -= batch % world
    if batch < fc.batch_size and main:
        log.info("finetune: batch %d capped at %d by the %d labelled images", fc.batch_size, batch, n)
    view = crop_flip_view(fc.crop_scale, data.image_size).to(device)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)

    phases.check_combination(False, fc.growth.enabled, fc.sparsity.enabled)

    def gradinit_batches():
        """GradInit's batches: labelled images with their training views, seeded."""
        g = torch.Generator().manual_seed(cfg.seed * 7_919 + 43)
        while True:
            idx = torch.randint(n, (min(batch, n),), generator=g)
            images, labels = take(labelled, idx)
            x = seeded_views(view, images.to(device), int(torch.randint(2**31, (1,), generator=g)),
                             device)
            yield (x - mean) / std, labels.to(device)

    def train(lr: float) -> nn.Module:
        encoder, _ = load_encoder(run_dir, random_init=random_init)
        torch.manual_seed(cfg.seed)
        model = Classifier(encoder, data.num_classes).to(device)
        plan = BatchPlan(n, batch, cfg.seed, 1, world)
        growth = phases.Growth.build(fc.growth, model, plan.steps_per_epoch, shrink=False) \
            if fc.growth.enabled else None   # GradMax from the loaded widths
        if fc.init.gradinit.enabled:
            phases.run_gradinit(
                model, lambda m, b: nn.functional.cross_entropy(m(b[0]).float(), b[1]),
                gradinit_batches(), fc.init.gradinit, fc.optimizer, lr,
                reduce=(lambda t: accelerator.reduce(t.to(device), reduction="mean").cpu())
                if world > 1 else None, progress=cfg.progress and main)
        sparsity = phases.Sparsity(fc.sparsity, model) if fc.sparsity.enabled else None
        opt, sched = eval_optimizer(model, fc.optimizer, lr, fc.momentum, fc.nesterov,
                                    fc.weight_decay, plan.steps_per_epoch * fc.epochs,
                                    fc.optimizer_kwargs, batch,
                                    extra_groups=[sparsity.param_group()] if sparsity else None)
        if growth is not None:
            phases.check_growth_optimizer(opt, fc.optimizer)
        hooks = protocol.attach(opt, model)  # before prepare: hooks go on the raw modules
        raw = model
        model, opt = accelerator.prepare(model, opt)
        model.train()
        masked_once = sparsity.cached if sparsity is not None else nullcontext
        step = 0
        bar = tqdm(total=fc.epochs, desc=f"finetune lr={lr:g}", leave=False,
                   disable=not (cfg.progress and main))
        for epoch in range(fc.epochs):
            for micro in iterate_epoch(labelled, plan, epoch, 0, accelerator.process_index):
                images, labels = micro[0]
                x = (view(images.to(device)) - mean) / std
                labels = labels.to(device)

                def closure():
                    opt.zero_grad(set_to_none=True)
                    with accelerator.autocast(), masked_once():
                        logits = model(x)
                    losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
                    objective = losses.mean()
                    if sparsity is not None:   # SCL: lambda * R
                        objective = objective + sparsity.penalty()
                    protocol.backward(opt, objective, accelerator)
                    return losses.detach()

                if accelerator.scaler is not None:  # GradScaler does not take closures
                    closure()
                    opt.step()
                else:
                    opt.step(closure)
                sched.step()
                step += 1
                if growth is not None and growth.due(step):   # GradMax on this batch
                    def grow_closure():
                        raw.zero_grad(set_to_none=True)
                        with accelerator.autocast():
                            loss = nn.functional.cross_entropy(raw(x).float(), labels)
                        loss.backward()
                    growth.grow(step, grow_closure, opt, seed=cfg.seed, reduce=(
                        lambda t: accelerator.reduce(t, reduction="mean")) if world > 1 else None)
                    if world > 1:
                        model = accelerator.prepare_model(raw)
            if sparsity is not None:
                bar.set_postfix(sparsity=f"{sparsity.report()['global']:.3f}")
            bar.update(1)
        bar.close()
        hooks.remove()
        average_buffers([raw], accelerator)  # every process then scores the same model
        if sparsity is not None:
            raw.scl_sparsity = sparsity.report()
        return raw

    @torch.no_grad()
    def score(model: nn.Module, dataset) -> tuple[float, float]:
        model.eval()
        hits, total = [0, 0], 0
        for images, labels in iterate_eval(dataset, cfg.eval_batch_size):
            with accelerator.autocast():
                logits = model(data.transform(images.to(device)))
            h = topk_correct(logits.float(), labels.to(device))
            hits = [a + b for a, b in zip(hits, h)]
            total += len(labels)
        model.train()
        return hits[0] / total, hits[1] / total

    sweep, best, best_model = {}, None, None
    for lr in fc.lrs:
        model = train(lr)
        sweep[lr] = score(model, data.val)[0]
        if main:
            log.info("finetune lr=%g: held-out top-1 %.4f", lr, sweep[lr])
        if best is None or sweep[lr] > sweep[best]:
            best, best_model = lr, model
    top1, top5 = score(best_model, data.test)
    result = {"lr": best, "val_top1": sweep[best], "top1": top1, "top5": top5, "labelled": n,
              "sweep": sweep}
    metrics = {"top1": top1, "top5": top5}
    if fc.sparsity.enabled:   # SCL: the fraction of pruned connections of the reported model
        result["sparsity"] = best_model.scl_sparsity
        metrics["sparsity"] = best_model.scl_sparsity["global"]
    if main:
        frac = (Path(cfg.data.label_split_file).name if cfg.data.label_split_file
                else f"{cfg.data.label_fraction:g}")
        name = f"finetune-{frac}" + (" (random init)" if random_init else "")
        append_results(run_dir, result_rows("finetune", run_cfg, cfg, name, metrics, run_dir))
    accelerator.wait_for_everyone()
    return result
