"""Flatness of a minimum: local energy and local entropy (Pittorino et al., ICLR 2021).

Pittorino, Lucibello, Feinauer, Perugini, Baldassi, Demyanenko, Zecchina, "Entropic gradient
descent algorithms and wide flat minima", ICLR 2021 (arXiv 2006.07897), section "flatness
measures". Spec: ``shared/algorithms/flat_minima_lr_scaling_generic_adam.md`` §2.1 and §1.1 (the
paper's PDF could not be read; its equation numbers are not quoted here).

**Local energy** (the paper's measure for deep networks; definition [PAPER-R], protocol [CODE]
from the group's sharpness script)::

    dE(w; sigma) = E_{z ~ N(0, I)} [ E(w + sigma * (z ⊙ w)) ] - E(w)

with *multiplicative* noise ``w_i -> w_i (1 + sigma z_i)``, which is invariant to a per-layer
rescaling of the weights. ``E`` is the training error (or loss); any deterministic function of the
model can be used (:func:`local_energy`). As in the reference script the noise goes on **all**
``model.parameters()`` (weights, biases, norm-layer affine parameters; buffers never), with
``exclude_norm_params`` for the third-party variant that skips normalisation layers, and the model
is evaluated in ``eval()`` mode: batch-norm layers use the model's running statistics, which are
*not* re-estimated after the perturbation (``bn="eval"``). ``bn="batch"`` uses batch statistics
instead (running statistics restored afterwards).

**Local entropy** (Chaudhari et al. 2017, spec §1.1; Pittorino et al.'s differentiable form with
an inverse temperature ``beta``, spec §2.1)::

    F(w; gamma) = log ∫ dw' exp( -beta L(w') - (beta gamma / 2) ||w' - w||^2 ).

The paper does not compute it for deep networks (only for the committee machine, by belief
propagation); both estimators here are **[RECONSTRUCTION]**s. They return the normalised local
entropy ``Phi = F - (d/2) log(2 pi / (beta gamma))`` (d = number of perturbed parameters), i.e.
``F`` minus the same integral for a flat loss ``L = 0``. ``Phi -> -beta L(w)`` as
``gamma -> oo``; a wider minimum (lower curvature) has a larger ``Phi`` at every ``gamma``.

* :func:`local_entropy`: the exact identity ``Phi = log E_{eps ~ N(0, I/(beta gamma))}
  exp(-beta L(w + eps))``, estimated by a log-mean-exp over Gaussian draws. Forward passes only;
  consistent but biased low for few samples (Jensen) and degenerate when ``beta * std(L)`` over the
  draws is large (check ``ess``).
* :func:`local_entropy_sgld`: thermodynamic integration in ``gamma``:
  ``gamma dPhi/dgamma = (beta / 2) <(w' - w) . grad L(w')>``, the average under
  ``P(w') ∝ exp(-beta L(w') - beta gamma ||w' - w||^2 / 2)`` sampled by Langevin dynamics (the
  Entropy-SGD inner loop, §1.2) with an exact Ornstein-Uhlenbeck step for the coupling term;
  integrated over a log-spaced ``gamma`` grid from an anchor at the largest ``gamma`` computed with
  :func:`local_entropy`.

The weights are restored bit-exactly (copied back from a snapshot) and every module's
train/eval flag is restored, whatever the function does or raises.

:func:`flatness_job` measures the local-energy curve of a BYOL pretraining run (BYOL loss, and the
leave-one-out kNN train error of the encoder's features) and writes ``RUN/analysis/flatness.csv``
and ``flatness.png``.
"""

from __future__ import annotations

import csv
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

Value = Union[float, torch.Tensor, Mapping[str, Union[float, torch.Tensor]]]
MetricFn = Callable[[nn.Module], Value]

NOISE_KINDS = ("multiplicative", "additive")
BN_MODES = ("eval", "batch", "keep")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------
# which parameters, which mode, restoring them


def noise_parameters(model: nn.Module, exclude_norm_params: bool = False,
                     trainable_only: bool = False) -> list[nn.Parameter]:
    """The parameters that receive noise: all ``model.parameters()`` (the reference script),
    without those of normalisation layers if ``exclude_norm_params``, without frozen ones if
    ``trainable_only``. Shared parameters appear once."""
    skip: set[int] = set()
    if exclude_norm_params:
        for m in model.modules():
            if isinstance(m, _NORM_TYPES):
                skip.update(id(p) for p in m.parameters(recurse=False))
    return [p for p in model.parameters()
            if id(p) not in skip and (p.requires_grad or not trainable_only)]


def _check_params(params: Optional[Sequence[torch.Tensor]], model: nn.Module,
                  exclude_norm_params: bool, trainable_only: bool = False) -> list[torch.Tensor]:
    chosen = list(params) if params is not None else noise_parameters(
        model, exclude_norm_params, trainable_only)
    if not chosen:
        raise ValueError("flatness: the model has no parameters to perturb")
    if not all(p.is_floating_point() for p in chosen):
        raise ValueError("flatness: every perturbed parameter must be a floating-point tensor")
    return chosen


@contextmanager
def evaluation_mode(model: nn.Module, bn: str = "eval") -> Iterator[None]:
    """``bn="eval"``: ``model.eval()`` (running BN statistics, dropout off; the reference
    protocol). ``"batch"``: eval, but batch-norm layers use batch statistics (their running
    statistics are restored on exit). ``"keep"``: leave the modes alone. Every module's training
    flag is restored on exit."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(BN_MODES)}; got {bn!r}")
    flags = [(m, m.training) for m in model.modules()]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if bn != "keep":
            model.eval()
        if bn == "batch":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    saved += [(b, b.detach().clone()) for b in m.buffers(recurse=False)]
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
        for m, flag in flags:
            m.training = flag


@contextmanager
def restored(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Snapshot ``params``; yields the snapshot; copies it back on exit (bit-exact)."""
    snapshot = [p.detach().clone() for p in params]
    try:
        yield snapshot
    finally:
        with torch.no_grad():
            for p, w in zip(params, snapshot):
                p.copy_(w)


def _draw(params: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One standard-normal tensor per parameter, drawn on the CPU (reproducible on any device)."""
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            for p in params]


def _as_metrics(value: Value) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError("flatness: the metric function must return a scalar or a dict of "
                             f"scalars, got a tensor of shape {tuple(value.shape)}")
        return {"value": float(value)}
    return {"value": float(value)}


def _check_sigmas(sigmas: Sequence[float]) -> list[float]:
    try:
        out = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise ValueError(f"sigmas must be a sequence of numbers, got {sigmas!r}") from None
    if not out or any(not math.isfinite(s) or s < 0 for s in out):
        raise ValueError(f"sigmas must be a non-empty list of finite numbers >= 0, got {sigmas!r}")
    return list(dict.fromkeys(out))   # duplicates once, order kept


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# local energy


@dataclass
class LocalEnergy:
    """A local-energy curve: for each metric, the mean and std over ``samples`` noise draws at
    each ``sigma``, and ``base`` = the metric at the unperturbed weights."""

    sigmas: list[float]
    base: dict[str, float]
    mean: dict[str, list[float]]
    std: dict[str, list[float]]
    samples: int
    noise: str = "multiplicative"

    @property
    def metrics(self) -> list[str]:
        return list(self.base)

    def delta(self, metric: Optional[str] = None) -> list[float]:
        """``dE(sigma) = E_z[E(w(1 + sigma z))] - E(w)`` for ``metric`` (the only one if None)."""
        name = self._name(metric)
        return [m - self.base[name] for m in self.mean[name]]

    def stderr(self, metric: Optional[str] = None) -> list[float]:
        """Monte-Carlo standard error of the mean at each sigma."""
        name = self._name(metric)
        return [s / math.sqrt(self.samples) for s in self.std[name]]

    def _name(self, metric: Optional[str]) -> str:
        if metric is None:
            if len(self.base) != 1:
                raise ValueError(f"name a metric: {', '.join(self.base)}")
            return next(iter(self.base))
        if metric not in self.base:
            raise ValueError(f"unknown metric {metric!r}; have {', '.join(self.base)}")
        return metric

    def rows(self) -> list[dict]:
        """One row per (metric, sigma): what :func:`flatness_job` writes to the CSV."""
        out = []
        for name in self.base:
            for i, s in enumerate(self.sigmas):
                n = 1 if s == 0 else self.samples
                out.append({"metric": name, "sigma": s, "samples": n,
                            "mean": self.mean[name][i], "std": self.std[name][i],
                            "stderr": self.std[name][i] / math.sqrt(n),
                            "delta": self.mean[name][i] - self.base[name],
                            "base": self.base[name]})
        return out


def local_energy(model: nn.Module, loss_or_error_fn: MetricFn, sigmas: Sequence[float],
                 samples: int = 10, seed: int = 0, *,
                 params: Optional[Sequence[torch.Tensor]] = None,
                 noise: str = "multiplicative", exclude_norm_params: bool = False,
                 bn: str = "eval", progress: bool = False) -> LocalEnergy:
    """Local energy of Pittorino et al. (ICLR 2021, §2 "flatness measures"; spec §2.1):
    ``E_z[E(w + sigma z ⊙ w)]`` over ``samples`` draws ``z ~ N(0, I)``, for each sigma.

    Args:
        model: the network; its parameters are perturbed in place and restored bit-exactly.
        loss_or_error_fn: ``fn(model)`` -> a number, a scalar tensor, or a dict of numbers (several
            metrics from the same forward passes, e.g. ``{"loss": ..., "error": ...}``). It must be
            deterministic (fixed data), or the curve measures its noise too. Called under
            ``torch.no_grad()``.
        sigmas: noise levels (>= 0). ``sigma = 0`` is evaluated once (the noise vanishes).
        samples: noise draws per sigma (the reference script's M2; 100 there).
        seed: seeds the noise. Draw k uses the same ``z`` at every sigma (common random numbers:
            the curve is smooth in sigma, and the same seed gives the same numbers).
        params: the tensors to perturb; default :func:`noise_parameters` (all parameters).
        noise: ``"multiplicative"`` (``w (1 + sigma z)``, the paper's) or ``"additive"``
            (``w + sigma z``, the script's default option).
        exclude_norm_params: skip normalisation-layer parameters (a third-party variant).
        bn: ``"eval"`` (default, the reference protocol: running BN statistics, not re-estimated),
            ``"batch"`` (batch statistics) or ``"keep"`` (the caller's modes); see
            :func:`evaluation_mode`.
        progress: a tqdm bar over the evaluations.
    """
    sigmas = _check_sigmas(sigmas)
    _check_count("samples", samples)
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {', '.join(NOISE_KINDS)}; got {noise!r}")
    params = _check_params(params, model, exclude_norm_params)
    from tqdm.auto import tqdm

    nonzero = [s for s in sigmas if s > 0]
    bar = tqdm(total=1 + samples * len(nonzero) + (len(nonzero) < len(sigmas)),
               disable=not progress, desc="local energy", leave=False)
    values: dict[float, list[dict[str, float]]] = {s: [] for s in sigmas}
    with evaluation_mode(model, bn), restored(params) as w0, torch.no_grad():
        base = _as_metrics(loss_or_error_fn(model))
        bar.update(1)

        def evaluate(sigma: float, z: list[torch.Tensor]) -> dict[str, float]:
            for p, w, zi in zip(params, w0, z):
                p.copy_(w)
                if noise == "multiplicative":
                    p.addcmul_(w, zi, value=sigma)   # w + sigma z w = w (1 + sigma z)
                else:
                    p.add_(zi, alpha=sigma)
            out = _as_metrics(loss_or_error_fn(model))
            if out.keys() != base.keys():
                raise ValueError("flatness: the metric function returned different keys "
                                 f"({sorted(out)} vs {sorted(base)})")
            bar.update(1)
            return out

        if len(nonzero) < len(sigmas):
            zero = evaluate(0.0, [torch.zeros_like(w) for w in w0])
            values[0.0].append(zero)
        g = torch.Generator().manual_seed(int(seed))
        for _ in range(samples if nonzero else 0):
            z = _draw(params, g)
            for s in nonzero:
                values[s].append(evaluate(s, z))
    bar.close()

    mean: dict[str, list[float]] = {k: [] for k in base}
    std: dict[str, list[float]] = {k: [] for k in base}
    for s in sigmas:
        for k in base:
            t = torch.tensor([v[k] for v in values[s]], dtype=torch.float64)
            mean[k].append(float(t.mean()))
            std[k].append(float(t.std()) if t.numel() > 1 else 0.0)
    return LocalEnergy(sigmas, base, mean, std, samples, noise)


# ---------------------------------------------------------------------------------------------
# local entropy [RECONSTRUCTION]


@dataclass
class LocalEntropy:
    """Normalised local entropy ``Phi(w; gamma) = F(w; gamma) - (d/2) log(2 pi/(beta gamma))``
    at each ``gamma`` (see the module docstring); ``loss`` is ``L(w)``, so ``Phi + beta * loss``
    is the entropy relative to the point (<= 0 near a minimum of a convex loss)."""

    gammas: list[float]
    phi: list[float]
    stderr: list[float]
    beta: float
    num_params: int
    loss: float
    method: str
    ess: list[float] = field(default_factory=list)   # effective sample size (Gaussian method)

    def free_entropy(self) -> list[float]:
        """``F(w; gamma)`` itself: ``Phi + (d/2) log(2 pi / (beta gamma))``."""
        return [p + 0.5 * self.num_params * math.log(2 * math.pi / (self.beta * g))
                for p, g in zip(self.phi, self.gammas)]


def _scalar(value: Value, who: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.reshape(())
    if isinstance(value, (int, float)):
        return torch.tensor(float(value))
    raise ValueError(f"{who}: loss_fn must return a scalar (a number or a one-element tensor)")


def _gaussian_phi(model: nn.Module, loss_fn: MetricFn, params: Sequence[torch.Tensor],
                  w0: Sequence[torch.Tensor], gamma: float, beta: float, samples: int,
                  generator: torch.Generator) -> tuple[float, float, float]:
    """(Phi, its delta-method standard error, effective sample size) at one gamma."""
    std = 1.0 / math.sqrt(beta * gamma)
    logw = torch.empty(samples, dtype=torch.float64)
    with torch.no_grad():
        for k in range(samples):
            for p, w, zi in zip(params, w0, _draw(params, generator)):
                p.copy_(w).add_(zi, alpha=std)
            logw[k] = -beta * float(_scalar(loss_fn(model), "local_entropy"))
    phi = float(torch.logsumexp(logw, 0) - math.log(samples))
    ratios = (logw - logw.max()).exp()                 # weights up to a common factor
    ess = float(ratios.sum() ** 2 / (ratios ** 2).sum())
    rel = float(ratios.std() / ratios.mean()) if samples > 1 else float("inf")
    return phi, rel / math.sqrt(samples), ess


def _check_gammas(gammas: Sequence[float], beta: float) -> list[float]:
    try:
        out = [float(g) for g in gammas]
    except (TypeError, ValueError):
        raise ValueError(f"gammas must be a sequence of numbers, got {gammas!r}") from None
    if not out or any(not math.isfinite(g) or g <= 0 for g in out):
        raise ValueError(f"gammas must be a non-empty list of finite numbers > 0, got {gammas!r}")
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return out


def local_entropy(model: nn.Module, loss_fn: MetricFn, gammas: Sequence[float],
                  beta: float = 1.0, samples: int = 1000, seed: int = 0, *,
                  params: Optional[Sequence[torch.Tensor]] = None,
                  exclude_norm_params: bool = False, bn: str = "eval") -> LocalEntropy:
    """Local entropy (Chaudhari et al. 2017 §1.1 / Pittorino et al. 2021 §2.1) by Gaussian
    smoothing **[RECONSTRUCTION]**: completing the square in
    ``F = log ∫ exp(-beta L(w') - beta gamma ||w' - w||^2 / 2) dw'`` gives exactly

        Phi(w; gamma) = F - (d/2) log(2 pi / (beta gamma))
                      = log E_{eps ~ N(0, I / (beta gamma))} exp(-beta L(w + eps)),

    estimated by log-mean-exp over ``samples`` additive Gaussian draws (forward passes only).
    ``loss_fn(model)`` returns the scalar loss L (deterministic data). The estimate is biased low
    by O(1/samples) and unreliable when the effective sample size (``ess``) is small: large
    ``beta``, small ``gamma`` or many parameters; then use :func:`local_entropy_sgld`.
    Parameters, ``bn`` and restoring: as :func:`local_energy`.
    """
    gammas = _check_gammas(gammas, beta)
    _check_count("samples", samples, 2)
    params = _check_params(params, model, exclude_norm_params)
    phis, errs, esss = [], [], []
    with evaluation_mode(model, bn), restored(params) as w0:
        with torch.no_grad():
            loss0 = float(_scalar(loss_fn(model), "local_entropy"))
        for i, gamma in enumerate(gammas):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
            phi, err, ess = _gaussian_phi(model, loss_fn, params, w0, gamma, beta, samples, g)
            phis.append(phi)
            errs.append(err)
            esss.append(ess)
    d = sum(p.numel() for p in params)
    return LocalEntropy(gammas, phis, errs, float(beta), d, loss0, "gaussian", esss)


def local_entropy_sgld(model: nn.Module, loss_fn: MetricFn, gammas: Sequence[float],
                       beta: float = 1.0, steps: int = 500, burn_in: int = 100,
                       lr: float = 1e-3, seed: int = 0, anchor_samples: int = 256, *,
                       params: Optional[Sequence[torch.Tensor]] = None,
                       exclude_norm_params: bool = False, bn: str = "eval",
                       progress: bool = False) -> LocalEntropy:
    """Local entropy by Langevin thermodynamic integration over gamma **[RECONSTRUCTION]**.

    Differentiating ``F(w; gamma)`` (spec §1.1) in gamma gives
    ``dF/dgamma = -(beta/2) <||w' - w||^2>`` under ``P(w') ∝ exp(-beta L(w') - beta gamma
    ||w' - w||^2 / 2)``, and integrating ``<(w' - w) . grad log P(w')> = -d`` by parts removes
    the O(d) cancellation with the Gaussian normalisation: for
    ``Phi = F - (d/2) log(2 pi/(beta gamma))``::

        gamma dPhi/dgamma = d/2 - (beta gamma / 2) <||w' - w||^2>
                          = (beta / 2) <(w' - w) . grad L(w')>

    (the "virial" form, exactly zero for a flat loss). The average comes from ``steps`` Langevin
    steps at each gamma of the grid (the Entropy-SGD inner loop, Chaudhari et al. Alg. 1, at
    thermal noise 1/beta and without its averaging), the first ``burn_in`` discarded, each gamma
    warm-started from the previous (larger) one; use a grid dense in log gamma (the trapezoid
    rule's error) from the gamma of interest up to one where ``L`` barely varies over the noise
    radius ``1/sqrt(beta gamma)``. With ``x = w' - w`` and ``c = beta gamma`` a step is the
    exponential integrator of ``dx = -(c x + beta grad L(w + x)) dt + sqrt(2) dB``::

        x <- e^{-c lr} x - (1 - e^{-c lr})/c beta grad L(w + x) + sqrt((1 - e^{-2 c lr})/c) xi

    exact for the coupling term, so ``lr`` need only resolve the curvature of ``beta L``. The
    slope is integrated (trapezoid in log gamma) down from the largest gamma, where Phi is
    anchored by :func:`local_entropy` with ``anchor_samples`` draws. ``loss_fn(model)`` returns
    a differentiable scalar (it may draw a fresh minibatch per call, which adds gradient noise to
    the chain). Noise goes on the trainable parameters; ``bn`` as in :func:`local_energy`.
    """
    grid = sorted(set(_check_gammas(gammas, beta)))
    if len(grid) < 2:
        raise ValueError("local_entropy_sgld needs at least two distinct gammas to integrate")
    _check_count("steps", steps)
    _check_count("burn_in", burn_in, 0)
    if burn_in >= steps:
        raise ValueError(f"burn_in ({burn_in}) must be smaller than steps ({steps})")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    _check_count("anchor_samples", anchor_samples, 2)
    params = _check_params(params, model, exclude_norm_params, trainable_only=True)
    if not all(p.requires_grad for p in params):
        raise ValueError("local_entropy_sgld: every perturbed parameter must require grad")
    from tqdm.auto import tqdm

    d = sum(p.numel() for p in params)
    slopes: dict[float, float] = {}
    bar = tqdm(total=steps * len(grid), disable=not progress, desc="local entropy", leave=False)
    with evaluation_mode(model, bn), restored(params) as w0:
        with torch.no_grad():
            loss0 = float(_scalar(loss_fn(model), "local_entropy_sgld"))
        g = torch.Generator().manual_seed(int(seed))
        anchor, anchor_err, anchor_ess = _gaussian_phi(
            model, loss_fn, params, w0, grid[-1], beta, anchor_samples,
            torch.Generator().manual_seed(int(seed) * 1_000_003 + 7))
        x = [torch.zeros_like(w) for w in w0]
        for gamma in reversed(grid):
            c = beta * gamma
            decay = math.exp(-c * lr)
            kick = -(1.0 - decay) / c * beta
            noise_std = math.sqrt((1.0 - decay * decay) / c)
            total, count = 0.0, 0
            for t in range(steps):
                with torch.no_grad():
                    for p, w, xi in zip(params, w0, x):
                        p.copy_(w).add_(xi)
                with torch.enable_grad():
                    loss = _scalar(loss_fn(model), "local_entropy_sgld")
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    if t >= burn_in:   # the virial (w' - w) . grad L(w') at the current w'
                        total += float(sum((xi.double() * gr.double()).sum()
                                           for xi, gr in zip(x, grads) if gr is not None))
                        count += 1
                    for xi, gr, z in zip(x, grads, _draw(params, g)):
                        xi.mul_(decay)
                        if gr is not None:
                            xi.add_(gr, alpha=kick)
                        xi.add_(z, alpha=noise_std)
                bar.update(1)
            slopes[gamma] = 0.5 * beta * total / count
    bar.close()
    phis = [0.0] * len(grid)
    phis[-1] = anchor
    for i in range(len(grid) - 2, -1, -1):
        du = math.log(grid[i + 1]) - math.log(grid[i])
        phis[i] = phis[i + 1] - 0.5 * du * (slopes[grid[i]] + slopes[grid[i + 1]])
    errs = [anchor_err] * len(grid)   # the anchor's; the chain's error is not estimated
    return LocalEntropy(grid, phis, errs, float(beta), d, loss0, "sgld", [anchor_ess])


# ---------------------------------------------------------------------------------------------
# the job: local energy of a BYOL run


def _loo_knn_error(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
                   temperature: float) -> float:
    """Leave-one-out error of the weighted kNN classifier (the monitor of
    :mod:`ssl_suite.engine.knn`) on L2-normalised ``feats``: each image is classified by the
    ``k`` most similar *other* images."""
    sim = feats @ feats.T
    sim.fill_diagonal_(-float("inf"))
    k = min(k, feats.shape[0] - 1)
    top_sim, top_idx = sim.topk(k, dim=1)
    votes = torch.zeros(feats.shape[0], num_classes, dtype=feats.dtype, device=feats.device)
    votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
    return float((votes.argmax(1) != labels).float().mean())


def _images(dataset, idx: torch.Tensor) -> torch.Tensor:
    if getattr(dataset, "in_memory", False):
        return dataset.images[idx]
    return torch.stack([dataset[int(i)][0] for i in idx])


def _write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot_local_energy(curves: Union[LocalEnergy, Mapping[str, LocalEnergy]], path: str | Path,
                      title: str = "", labels: Optional[Mapping[str, str]] = None) -> None:
    """One panel per metric: ``dE(sigma)`` with a band of +-2 Monte-Carlo standard errors, one
    line per curve when ``curves`` maps names (e.g. optimizers) to curves of the same metrics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"": curves} if isinstance(curves, LocalEnergy) else dict(curves)
    first = next(iter(runs.values()))
    names = first.metrics
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        label = (labels or {}).get(name, name)
        for run, curve in runs.items():
            d = torch.tensor(curve.delta(name))
            e = torch.tensor(curve.stderr(name))
            legend = run or None
            if len(runs) == 1:
                ax.set_title(f"{label} at sigma=0: {curve.base[name]:.4g}", fontsize=9)
            else:
                legend = f"{run} (sigma=0: {curve.base[name]:.3g})"
            ax.plot(curve.sigmas, d.tolist(), marker="o", ms=3, label=legend)
            ax.fill_between(curve.sigmas, (d - 2 * e).tolist(), (d + 2 * e).tolist(), alpha=0.2)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("sigma (multiplicative weight noise)" if first.noise == "multiplicative"
                      else "sigma (additive weight noise)")
        ax.set_ylabel(f"delta {label}")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def flatness_job(run_dir: str, sigmas: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1),
                 samples: int = 4, batch_size: int = 256, num_batches: int = 4, seed: int = 0,
                 out: Optional[str] = None, progress: bool = True, bn: str = "eval",
                 device: Optional[str] = None) -> dict:
    """Local-energy curve (Pittorino et al. 2021, spec §2.1, §2.7) of a BYOL pretraining run.

    Loads the run's latest checkpoint (online and target networks, built as
    :func:`ssl_suite.engine.pretrain.pretrain` builds them) and measures, for each sigma, the mean
    over ``samples`` draws of multiplicative noise on **all online-network parameters** (encoder,
    projector, predictor; :func:`local_energy`) of:

    * ``byol_loss``: the symmetric BYOL loss (:func:`ssl_suite.models.byol_loss`) on
      ``num_batches`` x ``batch_size`` pretraining images (a seeded draw without replacement). The
      two views of each batch are drawn **once** with ``seed``, and the frozen target's projections
      are computed once (target in train mode, batch statistics, as in training), so the function
      is deterministic. The online network runs in ``bn`` mode (default ``"eval"``: the reference
      protocol, running BN statistics; ``"batch"`` reproduces the training-time normalisation).
    * ``knn_train_error`` (when the run's data has labels): leave-one-out weighted-kNN error of the
      L2-normalised encoder features of the same number of labelled train images (eval
      transform; ``train.knn_k``, ``train.knn_temperature`` of the run). It is the SSL stand-in for
      the paper's train error (spec §2.7): no classifier has to be trained, and it costs one
      encoder forward per evaluation. (A linear probe would need fitting once and would then
      measure the probe's, not the representation's, sensitivity.)

    Writes ``flatness.csv`` (one row per metric and sigma: mean, std, standard error, delta from
    sigma = 0) and ``flatness.png`` to ``out`` (a directory; default ``RUN/analysis``). Returns
    ``{"sigmas", "metrics": {name: {"base", "mean", "std", "stderr", "delta"}}, "step",
    "num_images", "samples", "csv", "png"}``. Bad input raises ``ValueError`` (one line).
    """
    from ..augment import BYOLAugment, eval_transform
    from ..config import ConfigError
    from ..data import DataError, build_data
    from ..engine.runs import load_networks
    from ..errors import CheckpointError
    from ..models import byol_loss

    sig = sorted(set(_check_sigmas(sigmas)) | {0.0})
    _check_count("samples", samples)
    _check_count("batch_size", batch_size)
    _check_count("num_batches", num_batches)
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(BN_MODES)}; got {bn!r}")
    if not Path(run_dir).is_dir():
        raise ValueError(f"--run: {run_dir} is not a directory")
    try:
        cfg, online, target, state, latest = load_networks(run_dir)
        data = build_data(cfg.data, show_progress=False)
    except (CheckpointError, ConfigError, DataError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    step = int(state.get("step", 0)) if isinstance(state, dict) else 0
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    online.to(dev)
    target.to(dev)

    # ---- the fixed data: seeded images, views drawn once, target projections once ----------
    n = min(batch_size * num_batches, len(data.pretrain))
    if n < 2:
        raise ValueError(f"--run: the run's dataset has {len(data.pretrain)} images; need >= 2")
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.pretrain), generator=g)[:n]
        augment = BYOLAugment(cfg.augment, data.mean, data.std).to(dev)
        batches = []
        for b in idx.split(batch_size):
            v1, v2 = augment(_images(data.pretrain, b).to(dev))
            with torch.no_grad():
                target.train()
                z1, z2 = target(v1), target(v2)
            batches.append((v1, v2, z1, z2))
        knn = None
        if data.knn_train is not None and data.num_classes >= 2 and len(data.knn_train) >= 2:
            m = min(batch_size * num_batches, len(data.knn_train))
            kidx = torch.randperm(len(data.knn_train), generator=g)[:m]
            mean, std = cfg.augment.mean or data.mean, cfg.augment.std or data.std
            x = eval_transform(_images(data.knn_train, kidx).to(dev), cfg.augment.image_size,
                               mean, std)
            knn = (x.split(batch_size), data.knn_train.labels[kidx].to(dev))
    del target

    def metrics(model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for v1, v2, z1, z2 in batches:
            q1, q2 = model(v1, v2)
            total += float(byol_loss(q1, q2, z1, z2, reduction="none").double().sum())
            count += v1.shape[0]
        out = {"byol_loss": total / count}
        if knn is not None:
            feats = torch.cat([F.normalize(model.encoder(x).float(), dim=-1) for x in knn[0]])
            out["knn_train_error"] = _loo_knn_error(feats, knn[1], data.num_classes,
                                                    cfg.train.knn_k, cfg.train.knn_temperature)
        return out

    curve = local_energy(online, metrics, sig, samples, seed, bn=bn, progress=progress)

    out_dir = Path(out) if out is not None else Path(run_dir) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "flatness.csv", out_dir / "flatness.png"
    _write_csv([{**r, "step": step} for r in curve.rows()], csv_path)
    try:
        plot_local_energy(curve, png_path,
                          title=f"{Path(run_dir).name} step {step}: local energy, {samples} noise "
                                f"draws, {n} images, BN {bn}",
                          labels={"byol_loss": "BYOL loss",
                                  "knn_train_error": "kNN train error (LOO)"})
        png: Optional[str] = str(png_path)
    except ImportError:
        png = None   # matplotlib missing: CSV only (pip install 'ssl_suite[plots]')
    return {
        "sigmas": curve.sigmas, "step": step, "num_images": n, "samples": samples, "bn": bn,
        "metrics": {k: {"base": curve.base[k], "mean": curve.mean[k], "std": curve.std[k],
                        "stderr": curve.stderr(k), "delta": curve.delta(k)}
                    for k in curve.metrics},
        "csv": str(csv_path), "png": png,
    }
