"""Linear evaluation of a pretrained encoder (Grill et al. 2020, App. C.1).

The encoder is frozen: its weights get no gradient and its batch-norm layers stay in eval mode
(running statistics are neither used from the batch nor updated). A linear classifier on the
pooled features is trained with cross-entropy, SGD with Nesterov momentum 0.9, no weight decay
and a cosine schedule. Two modes:

* ``cached`` (default): features of the un-augmented images are extracted once and the classifier
  trains on them: seconds for small data. Standard for CIFAR-scale reports.
* ``augmented``: random resized crop + flip of every training image in every epoch, the features
  recomputed each time: the paper's ImageNet protocol (80 epochs, batch 1024).

Each learning rate of ``linear.lrs`` is tried on a class-balanced held-out part of the training
split (``linear.val_fraction``); the best is retrained on the whole training split and reported
on the test split (top-1 and top-5). Runs on the main process; other processes wait.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config, EvalConfig
from .eval_common import (EvalData, append_results, crop_flip_view, eval_data, result_rows,
                          topk_correct, train_classifier)
from .knn import extract_features
from .pretrain import make_accelerator
from .runs import load_encoder

log = logging.getLogger("ssl_suite")


def _feature_batches(feats: torch.Tensor, labels: torch.Tensor, batch: int, seed: int):
    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        perm = torch.randperm(len(labels), generator=g).to(feats.device)
        for i in range(0, len(perm) - batch + 1 if len(perm) >= batch else 1, batch):
            idx = perm[i:i + batch]
            yield feats[idx], labels[idx]
    return batches


def _augmented_batches(encoder, dataset, view, tf_norm, batch: int, seed: int, device, autocast):
    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        perm = torch.randperm(len(dataset), generator=g)
        for i in range(0, max(len(perm) - batch + 1, 1), batch):
            idx = perm[i:i + batch]
            images = dataset.images[idx] if getattr(dataset, "in_memory", False) else \
                torch.stack([dataset[j][0] for j in idx.tolist()])
            labels = dataset.labels[idx].to(device)
            with torch.no_grad(), autocast():
                x = tf_norm(view(images.to(device)))
                f = encoder(x).float()
            yield f, labels
    return batches


def _steps(n: int, batch: int) -> int:
    return max(n // batch, 1)


@torch.no_grad()
def _accuracy(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top1, top5 = topk_correct(head(feats).float(), labels)
    return top1 / len(labels), top5 / len(labels)


def linear_eval(run_dir: str, cfg: EvalConfig, run_cfg: Config, random_init: bool = False) -> dict:
    """Run the protocol; returns ``{"lr", "val_top1", "top1", "top5", "sweep"}``."""
    lc = cfg.linear
    accelerator = make_accelerator(cfg.precision)
    device, main = accelerator.device, accelerator.is_main_process
    result: dict = {}
    if main:
        encoder, _ = load_encoder(run_dir, random_init=random_init)
        encoder.to(device).eval().requires_grad_(False)
        snapshot = {k: v.clone() for k, v in encoder.state_dict().items()}
        data = eval_data(cfg, run_cfg, lc.val_fraction, cfg.progress)
        feat = lambda ds: extract_features(encoder, ds, cfg.eval_batch_size, device,  # noqa: E731
                                           data.transform, accelerator.autocast, cfg.progress,
                                           normalize=False)
        fit_f, fit_y = feat(data.fit)
        val_f, val_y = feat(data.val)
        test_f, test_y = feat(data.test)
        train_f, train_y = torch.cat([fit_f, val_f]), torch.cat([fit_y, val_y])
        dim = fit_f.shape[1]

        def fit(lr: float, feats, labels, dataset) -> nn.Module:
            torch.manual_seed(cfg.seed)
            head = nn.Linear(dim, data.num_classes).to(device)
            batch = min(lc.batch_size, len(labels))
            if lc.mode == "cached":
                batches = _feature_batches(feats, labels, batch, cfg.seed)
            else:
                view = crop_flip_view(lc.crop_scale, data.image_size).to(device)
                norm = _normalizer(data, device)
                batches = _augmented_batches(encoder, dataset, view, norm, batch, cfg.seed,
                                             device, accelerator.autocast)
            bar = tqdm(total=lc.epochs, desc=f"linear lr={lr:g}", leave=False,
                       disable=not cfg.progress)
            train_classifier(head, batches, _steps(len(labels), batch), lc.epochs, lr,
                             lc.momentum, lc.nesterov, lc.weight_decay, progress=bar,
                             optimizer=lc.optimizer, optimizer_kwargs=lc.optimizer_kwargs)
            bar.close()
            return head

        sweep = {}
        for lr in lc.lrs:
            head = fit(lr, fit_f, fit_y, data.fit)
            sweep[lr] = _accuracy(head, val_f, val_y)[0]
            log.info("linear eval lr=%g: held-out top-1 %.4f", lr, sweep[lr])
        best = max(sweep, key=lambda k: (sweep[k], -k))
        head = fit(best, train_f, train_y, data.train)
        top1, top5 = _accuracy(head, test_f, test_y)
        for k, v in encoder.state_dict().items():  # frozen means frozen
            if not torch.equal(v, snapshot[k]):
                raise RuntimeError(f"linear evaluation changed the encoder tensor {k}")
        result = {"lr": best, "val_top1": sweep[best], "top1": top1, "top5": top5, "sweep": sweep}
        protocol = f"linear-{lc.mode}" + (" (random init)" if random_init else "")
        append_results(run_dir, result_rows("linear-eval", run_cfg, cfg, protocol,
                                            {"top1": top1, "top5": top5}, run_dir))
    accelerator.wait_for_everyone()
    return result


def _normalizer(data: EvalData, device):
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
    return lambda x: (x - mean) / std
