"""Weighted k-nearest-neighbour monitor (Wu et al. 2018, InstDisc; lightly's k=200, t=0.1).

Features are L2-normalised encoder outputs; each test image votes with its k most similar
training images, weighting class c by ``sum exp(sim / t)`` over the neighbours of class c.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.loader import iterate_eval


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset, batch_size: int, device: torch.device,
                     transform: Callable[[torch.Tensor], torch.Tensor],
                     autocast: Optional[Callable] = None,
                     progress: bool = False, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32, on ``device``; L2-normalised unless ``normalize=False``) and labels.

    The encoder runs in eval mode (running BN statistics) and is put back in its former mode.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    batches = tqdm(iterate_eval(dataset, batch_size), total=math.ceil(len(dataset) / batch_size),
                   desc="features", leave=False, disable=not progress)
    try:
        for images, lab in batches:
            x = transform(images.to(device, non_blocking=True))
            with (autocast() if autocast is not None else nullcontext()):
                f = encoder(x)
            feats.append(F.normalize(f.float(), dim=-1) if normalize else f.float())
            labels.append(lab.to(device))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def weighted_knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor,
                         test_feats: torch.Tensor, num_classes: int, k: int = 200,
                         temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, C) from cosine-similarity-weighted votes of the k nearest."""
    k = min(k, train_feats.shape[0])
    scores = []
    for i in range(0, test_feats.shape[0], chunk):
        sim = test_feats[i:i + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                 k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy (in [0, 1]) of the weighted kNN classifier."""
    scores = weighted_knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return (scores.argmax(1) == test_labels).float().mean().item()


def evaluate_knn(encoder: nn.Module, train_set, test_set, num_classes: int, device, transform,
                 k: int = 200, temperature: float = 0.1, batch_size: int = 256,
                 autocast: Optional[Callable] = None, progress: bool = False) -> float:
    """Extract features of both splits and return the weighted kNN top-1 accuracy."""
    tr_f, tr_l = extract_features(encoder, train_set, batch_size, device, transform, autocast,
                                  progress)
    te_f, te_l = extract_features(encoder, test_set, batch_size, device, transform, autocast,
                                  progress)
    return knn_accuracy(tr_f, tr_l, te_f, te_l, num_classes, k, temperature)


def knn_job(run_dir: str, cfg, run_cfg, random_init: bool = False) -> dict:
    """The kNN evaluation as a job: weighted kNN (``knn.k``, ``knn.temperature``) with the
    labelled train split as memory bank, top-1 on the test split; appends to results.csv."""
    from .eval_common import append_results, eval_data, result_rows
    from .pretrain import make_accelerator
    from .runs import load_encoder

    accelerator = make_accelerator(cfg.precision)
    result: dict = {}
    if accelerator.is_main_process:
        encoder, _ = load_encoder(run_dir, random_init=random_init)
        encoder.to(accelerator.device)
        data = eval_data(cfg, run_cfg, 0.1, cfg.progress)
        top1 = evaluate_knn(encoder, data.train, data.test, data.num_classes, accelerator.device,
                            data.transform, cfg.knn.k, cfg.knn.temperature, cfg.eval_batch_size,
                            accelerator.autocast, cfg.progress)
        result = {"top1": top1, "k": cfg.knn.k, "temperature": cfg.knn.temperature}
        protocol = f"knn-k{cfg.knn.k}-t{cfg.knn.temperature:g}" + (" (random init)" if random_init else "")
        append_results(run_dir, result_rows("knn", run_cfg, cfg, protocol, {"top1": top1}, run_dir))
    accelerator.wait_for_everyone()
    return result
