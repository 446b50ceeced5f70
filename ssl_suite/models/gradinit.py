"""GradInit: learned per-block multipliers for the initialization.

Zhu, Ni, Xu, Kong, Huang, Goldstein, "GradInit: Learning to Initialize Neural Networks for
Stable and Efficient Training", NeurIPS 2021 (reference code: zhuchen03/gradinit).

Every parameter block i (each weight and each bias tensor, as in the paper) gets a scalar
multiplier m_i, so that θ_m = {m_i θ_i^0}.  The multipliers solve (paper, Eq. 1 and the
constraint of Sec. 3)::

    minimize_m   L(S̃; θ_m − η A[g(S; θ_m)])                                   (objective)
    subject to   ‖g(S; θ_m)‖_{p_A} ≤ γ,   m_i ≥ α (min_scale)                  (constraint)

with g(S; θ) = ∇_θ L(S; θ), A[g] the first update of the chosen optimizer (SGD: A[g] = g,
p_A = 2; Adam: A[g] = ĝ/(|ĝ|+ε) ≈ sign(g), p_A = 1) and S, S̃ two different minibatches.
As in the paper's Algorithm 1 the constraint is handled by alternation, not by projection: when
‖g‖_{p_A} > γ the step minimises ‖g‖_{p_A} itself (a Hessian-vector product through the
multipliers), otherwise it minimises the one-step-lookahead loss.  After each Adam step on m the
multipliers are clamped at the lower bound α (weights) / ``bias_min_scale`` (biases, 0 in the
code).

Paper vs. released code (DESIGN.md: implement the paper, offer the code as an option):

* ``second_order=True`` (paper, default): the lookahead is differentiated through g(S; θ_m).
  ``second_order=False`` reproduces the code, which detaches the step (``gstep.data``).
* ``normalize_grad=False`` (paper): SGD steps along g.  ``True`` reproduces the CIFAR scripts'
  ``--gradinit-normalize-grad``: A[g] = g/‖g‖_2 (the constraint still uses the raw ‖g‖).
* The code divides the objective by η and clips each dm_i to [-c, c] (``grad_clip``, c = 1 in
  the CIFAR scripts); we keep the clip as an option and do not divide by η.  The code also keeps
  separate first moments for the two branches; here one ``torch.optim.Adam`` drives m.
* Zero-norm blocks (zero-initialised biases) cannot be rescaled and are left out, as in the code.

The lookahead is evaluated with :func:`torch.func.functional_call`; the model itself is not
changed until :func:`fold_scales` multiplies the returned multipliers into its weights.
During GradInit dropout is off (``eval()``) and BatchNorm normalises with batch statistics
without touching its running buffers (the code's ``training=True, track_running_stats=False``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

__all__ = ["gradinit", "fold_scales", "lookahead_loss", "first_step", "grad_norm"]

LossFn = Callable[[nn.Module, Any], Tensor]


class _Functional(nn.Module):
    """Stands in for ``model`` inside ``loss_fn`` and runs it with the given parameter tensors."""

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not registered as a submodule
        object.__setattr__(self, "_params", dict(params))

    def forward(self, *args, **kwargs):
        return functional_call(self._model, self._params, args, kwargs)


def first_step(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], optimizer: str = "sgd",
               lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, normalize_grad: bool = False) -> dict[str, Tensor]:
    """The first update η·A[g] of ``torch.optim.SGD`` / ``torch.optim.Adam`` (fresh state).

    SGD: d = g + λθ; the momentum buffer starts at d, so the first step is η·d (Nesterov:
    η·(1+μ)·d).  Adam (Kingma & Ba, Alg. 1, with bias correction): m̂ = d, v̂ = d², step
    η·m̂/(√v̂ + ε) = η·d/(|d| + ε); |d| is used for √v̂ (same value, finite derivative at 0).
    The betas cancel in the first step; they are kept to mirror the optimizer literally.
    """
    d = {n: g + weight_decay * params[n] if weight_decay else g for n, g in grads.items()}
    if optimizer == "sgd":
        if normalize_grad:
            total = torch.sqrt(sum((v * v).sum() for v in d.values()))
            d = {n: v / total.clamp_min(1e-12) for n, v in d.items()}
        mult = lr * (1.0 + momentum) if nesterov else lr
        return {n: mult * v for n, v in d.items()}
    if optimizer == "adam":
        b1, b2 = betas
        out = {}
        for n, v in d.items():
            m_hat = ((1 - b1) * v) / (1 - b1)
            sqrt_v_hat = ((1 - b2) ** 0.5 * v.abs()) / (1 - b2) ** 0.5
            out[n] = lr * m_hat / (sqrt_v_hat + eps)
        return out
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")


def grad_norm(grads: Mapping[str, Tensor], optimizer: str) -> Tensor:
    """‖g‖_{p_A}: the L2 norm for SGD, the L1 norm for Adam (dual norm of A[g], paper Sec. 3)."""
    if optimizer == "adam":
        return sum(g.abs().sum() for g in grads.values())
    return torch.sqrt(sum((g * g).sum() for g in grads.values()))


def _scaled_params(theta0: dict[str, Tensor], scaled: list[str], scales: Tensor) -> dict[str, Tensor]:
    idx = {n: i for i, n in enumerate(scaled)}
    return {n: scales[idx[n]] * p if n in idx else p.clone().requires_grad_(True)
            for n, p in theta0.items()}


def _objectives(model, loss_fn, batch, next_batch, params, opt_kw, second_order):
    """Returns (L(S̃; θ − ηA[g]), ‖g(S; θ)‖_{p_A}) for the parameter dict ``params``."""
    loss0 = loss_fn(_Functional(model, params), batch)
    names = list(params)
    gs = torch.autograd.grad(loss0, [params[n] for n in names], create_graph=True,
                             allow_unused=True)
    grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, gs)}
    gnorm = grad_norm(grads, opt_kw["optimizer"])
    step_grads = grads if second_order else {n: g.detach() for n, g in grads.items()}
    step = first_step(step_grads, params, **opt_kw)
    after = {n: params[n] - step[n] for n in names}
    return (lambda: loss_fn(_Functional(model, after), next_batch)), gnorm


class _GradInitMode:
    """eval() for dropout; BatchNorm on batch statistics without updating running buffers."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = {m: m.training for m in self.model.modules()}
        self.model.eval()
        self.bn = []
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.bn.append((m, m.track_running_stats))
                m.training, m.track_running_stats = True, False

    def __exit__(self, *exc):
        for m, tracked in self.bn:
            m.track_running_stats = tracked
        for m, was in self.training.items():
            m.training = was


def _setup(model: nn.Module, scales: Mapping[str, float] | None = None):
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    scaled = [n for n, p in theta0.items() if p.norm() > 0]
    init = torch.tensor([float(scales.get(n, 1.0)) if scales else 1.0 for n in scaled],
                        dtype=next(iter(theta0.values())).dtype)
    return theta0, scaled, init


def lookahead_loss(model: nn.Module, loss_fn: LossFn, batch, next_batch,
                   scales: Mapping[str, float] | None = None, *, optimizer: str = "sgd",
                   lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, normalize_grad: bool = False) -> tuple[float, float]:
    """Evaluate (L(S̃; θ_m − ηA[g(S; θ_m)]), ‖g(S; θ_m)‖_{p_A}) for multipliers ``scales``
    (missing names count as 1) under the GradInit mode, without changing ``model``."""
    opt_kw = dict(optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, betas=betas,
                  eps=eps, weight_decay=weight_decay, normalize_grad=normalize_grad)
    theta0, scaled, init = _setup(model, scales)
    with _GradInitMode(model):
        params = _scaled_params(theta0, scaled, init.requires_grad_(True))
        loss_after, gnorm = _objectives(model, loss_fn, batch, next_batch, params, opt_kw, False)
        return float(loss_after().detach()), float(gnorm.detach())


def gradinit(model: nn.Module, loss_fn: LossFn, batches: Iterator, optimizer: str = "sgd",
             lr: float = 0.1, momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
             steps: int = 390, gamma: float = 1.0, min_scale: float = 0.01,
             scale_lr: float = 1e-2, progress: bool = True, *, nesterov: bool = False,
             eps: float = 1e-8, weight_decay: float = 0.0, bias_min_scale: float = 0.0,
             normalize_grad: bool = False, second_order: bool = True,
             grad_clip: float | None = 1.0, scale_betas: tuple[float, float] = (0.9, 0.999),
             history: list | None = None) -> dict[str, float]:
    """Learn one multiplier per parameter block (Zhu et al. 2021, Eq. 1 / Algorithm 1).

    Args:
        model: the freshly initialised network θ^0; it is not modified (see :func:`fold_scales`).
        loss_fn: ``loss_fn(module, batch) -> scalar``; must run the network only by calling
            ``module(...)`` (a stand-in evaluates it with ``functional_call``).
        batches: iterator; each GradInit step draws two batches, S then S̃.
        optimizer, lr, momentum, nesterov, betas, eps, weight_decay: the optimizer whose first
            step A is simulated (``"sgd"`` or ``"adam"``), with its hyperparameters η, ...
        steps: T iterations. gamma: γ, bound on ‖g‖_{p_A}.  min_scale: α, lower bound on the
            multipliers of non-bias blocks; ``bias_min_scale`` for names ending in ``bias``.
        scale_lr, scale_betas: Adam on m (the paper's τ).  grad_clip: clip each ∂/∂m_i to
            [-c, c] (code's ``gradinit_grad_clip``; None disables).
        second_order, normalize_grad: paper (default) vs. code behaviour, see module docstring.
        history: if a list is given, one dict per step is appended: ``branch``
            (``"objective"``/``"constraint"``), ``loss`` (the minimised quantity), ``gnorm``.

    Returns:
        ``{parameter name: learned m_i}`` for every block with non-zero initial norm.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    opt_kw = dict(optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, betas=betas,
                  eps=eps, weight_decay=weight_decay, normalize_grad=normalize_grad)
    theta0, scaled, init = _setup(model)
    scales = init.clone().requires_grad_(True)
    lower = torch.tensor([bias_min_scale if n.endswith("bias") else min_scale for n in scaled],
                         dtype=scales.dtype)
    scale_opt = torch.optim.Adam([scales], lr=scale_lr, betas=scale_betas)
    bar = tqdm(range(steps), desc="gradinit", disable=not progress)
    with _GradInitMode(model):
        for _ in bar:
            batch, next_batch = next(batches), next(batches)
            params = _scaled_params(theta0, scaled, scales)
            loss_after, gnorm = _objectives(model, loss_fn, batch, next_batch, params, opt_kw,
                                            second_order)
            if gnorm.item() > gamma:       # constraint violated: descend on ‖g‖_{p_A}
                branch, obj = "constraint", gnorm
            else:                          # descend on the one-step-lookahead loss
                branch, obj = "objective", loss_after()
            if not torch.isfinite(obj):
                raise FloatingPointError(f"gradinit: non-finite {branch} value {obj.item()}")
            scale_opt.zero_grad(set_to_none=True)
            obj.backward()
            if grad_clip is not None:
                scales.grad.clamp_(-grad_clip, grad_clip)
            scale_opt.step()
            with torch.no_grad():
                scales.copy_(torch.maximum(scales, lower))
            if history is not None:
                history.append({"branch": branch, "loss": obj.item(), "gnorm": gnorm.item()})
            bar.set_postfix(branch=branch[:4], obj=f"{obj.item():.4g}",
                            s_min=f"{scales.min().item():.3g}", s_max=f"{scales.max().item():.3g}")
    return {n: float(s) for n, s in zip(scaled, scales.detach())}


@torch.no_grad()
def fold_scales(model: nn.Module, scales: Mapping[str, float]) -> nn.Module:
    """θ_i ← m_i θ_i in place (the code's final state after RescaleAdam); returns ``model``."""
    params = dict(model.named_parameters())
    unknown = set(scales) - set(params)
    if unknown:
        raise KeyError(f"fold_scales: no parameter named {sorted(unknown)}")
    for n, m in scales.items():
        params[n].mul_(m)
    return model
