"""Weight rescaling (WRS) and effective-learning-rate monitoring for scale-invariant weights.

**WRS** (Liu, Cui, Wan, Mao & Chan, "Weight Rescaling: Effective and Robust Regularization for Deep
Neural Networks with Batch Normalization", arXiv 2102.03497v2, 2022): instead of weight decay, the
norm of each weight in front of a BatchNorm is *explicitly rescaled to the unit norm*, which keeps
the effective learning rate (ELR) from drifting (abstract). The paper body and code were not
available; the procedure below is the spec's reconstruction (``shared/algorithms/
init_prune_norm_largebatch.md`` Sec. 4.2, [RECON]): after every ``every``-th optimizer step::

    per="unit":    W_j <- target_norm * W_j / ||W_j||_2      for each output filter j  (default)
    per="tensor":  W   <- target_norm * W / ||W||_F

applied to the scale-invariant (SI) weights only, so the network function (train-mode BN) does not
change: ``f(c w) = f(w)``. With ``||w|| = 1`` the ELR of SGD is ``lr / ||w||^2 = lr`` (Kodryan et al.
2022, Sec. 2; van Laarhoven 2017), so WRS pins the ELR to the LR schedule; it equals projected SGD
on per-filter unit spheres (the ``fix_all_elr`` mode of the three-regimes code with radius 1). Use
weight decay 0 on the WRS weights (:attr:`WeightRescaling.params`).

**ELR** (Kodryan, Lobacheva, Nakhodnov & Vetrov, NeurIPS 2022, Sec. 2): for an SI tensor ``w``,
``grad L(w)`` is orthogonal to ``w`` and ``grad L(w / ||w||) = ||w|| grad L(w)``, so an SGD step
``w' = w - lr g`` moves the direction ``w / ||w||`` exactly like a step on the unit sphere with
``ELR = lr / ||w||^2``::

    tan angle(w, w') = lr ||g|| / ||w|| = (lr / ||w||^2) * ||grad L(w_hat)||.

:class:`ELRMonitor` measures, for any optimizer, the nominal ELR ``lr / ||w||^2`` and the measured
one ``tan angle(w_t, w_{t+1}) / ||P_w grad L(w_hat)||`` (``P_w``: projection onto the tangent space),
which agree for plain SGD and equal the configured lr for :class:`~ssl_suite.optim.sphere.SphereSGD`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..analysis.scale_invariance import WEIGHT_LAYERS, scale_invariant_info
from . import protocol

__all__ = ["WeightRescaling", "ELRMonitor", "unit_view"]


def unit_view(w: torch.Tensor) -> torch.Tensor:
    """``w`` as ``[out, -1]`` rows (one per output filter); a 1-D tensor is one row."""
    return w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)


def _unit_norms(w: torch.Tensor) -> torch.Tensor:
    """Per-filter L2 norms, shaped to broadcast against ``w`` (``[out, 1, ...]``)."""
    n = torch.linalg.vector_norm(unit_view(w), dim=1)
    return n.view(-1, *([1] * (w.ndim - 1))) if w.ndim > 1 else n.view(())


def _resolve_named(params_or_model, example_input_fn, layer_types, per):
    """(name, param, mode) triples for WeightRescaling / ELRMonitor."""
    if isinstance(params_or_model, nn.Module):
        model = params_or_model
        modules, params = dict(model.named_modules()), dict(model.named_parameters())
        out = []
        for s in scale_invariant_info(model, example_input_fn):
            layer = modules[s.module]
            if not isinstance(layer, tuple(layer_types)):
                continue
            mode = per
            if isinstance(per, dict):
                mode = next((v for t, v in per.items() if isinstance(layer, t)), None)
                if mode is None:
                    continue
            # per-filter rescaling is function-preserving only under a per-channel norm
            if mode == "unit" and s.granularity != "unit":
                mode = "tensor"
            out.append((s.name, params[s.name], mode))
        return out
    if isinstance(per, dict):
        raise ValueError("per as a {layer type: mode} dict needs a model, not a parameter list")
    items = list(params_or_model)
    out = []
    for i, item in enumerate(items):
        name, p = item if isinstance(item, tuple) else (str(i), item)
        out.append((name, p, per))
    return out


class WeightRescaling:
    """WRS callback: ``after_step()`` rescales the chosen weights to norm ``target_norm``.

    ``params_or_model``: a model (the SI weights of ``layer_types`` are chosen by
    :func:`~ssl_suite.analysis.scale_invariance.scale_invariant_info`, traced through
    ``example_input_fn()`` when given, else by module order), or an iterable of parameters or
    ``(name, parameter)`` pairs (taken as they are). ``per``: ``"unit"`` (per output filter, the
    spec's default), ``"tensor"``, or a ``{layer type: mode}`` dict (types left out are skipped);
    a weight that is only SI as a whole (LayerNorm/GroupNorm after it) falls back to
    ``"tensor"``. ``every``: rescale after every k-th step. ``on_train_start`` rescales once, so the
    first step already runs at ELR = lr / target_norm^2.

    ``scale_momentum`` (with ``optimizer``): multiply the optimizer's ``momentum_buffer`` /
    ``exp_avg`` of each rescaled weight by the same factor, which keeps the angular size of the
    buffered step; off by default (spec: the per-step factor is ``1 + O(lr^2 ||g||^2)``).

    The rescale is two multi-tensor (foreach) operations: ``torch._foreach_norm`` for the
    per-tensor norms and ``torch._foreach_mul_`` with per-tensor (or per-filter) factors."""

    def __init__(self, params_or_model: Union[nn.Module, Iterable[Any]],
                 example_input_fn: Optional[Callable[[], Any]] = None,
                 layer_types: Iterable[type] = WEIGHT_LAYERS, target_norm: float = 1.0,
                 per: Union[str, dict] = "unit", every: int = 1,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 scale_momentum: bool = False):
        modes = set(per.values()) if isinstance(per, dict) else {per}
        if not modes <= {"unit", "tensor"}:
            raise ValueError(f"per must be 'unit' or 'tensor' (or a dict of them), got {per!r}")
        if target_norm <= 0 or every < 1:
            raise ValueError("target_norm must be > 0 and every >= 1")
        if scale_momentum and optimizer is None:
            raise ValueError("scale_momentum needs the optimizer")
        chosen = _resolve_named(params_or_model, example_input_fn, layer_types, per)
        if not chosen:
            raise ValueError("WeightRescaling: no scale-invariant weight to rescale")
        self.names = [n for n, _, _ in chosen]
        self.params = [p for _, p, _ in chosen]
        self.modes = {n: m for n, _, m in chosen}
        self.target_norm, self.every = float(target_norm), int(every)
        self.optimizer, self.scale_momentum = optimizer, scale_momentum
        self.steps = 0

    @torch.no_grad()
    def rescale(self) -> list[torch.Tensor]:
        """Rescale now; returns the factor applied to each weight (0-d or ``[out, 1, ...]``)."""
        tensor = [p for p, n in zip(self.params, self.names) if self.modes[n] == "tensor"]
        unit = [p for p, n in zip(self.params, self.names) if self.modes[n] == "unit"]
        factors: dict[int, torch.Tensor] = {}
        if tensor:
            norms = torch._foreach_norm(tensor)
            f = [torch.where(n > 0, self.target_norm / n, torch.ones_like(n)) for n in norms]
            torch._foreach_mul_(tensor, f)
            factors.update(zip(map(id, tensor), f))
        if unit:
            norms = [_unit_norms(p) for p in unit]
            f = [torch.where(n > 0, self.target_norm / n, torch.ones_like(n)) for n in norms]
            torch._foreach_mul_(unit, f)
            factors.update(zip(map(id, unit), f))
        if self.scale_momentum:
            state = protocol.unwrap(self.optimizer).state
            for p in self.params:
                st = state.get(p, {})
                for key in ("momentum_buffer", "exp_avg"):
                    if isinstance(st.get(key), torch.Tensor) and st[key].shape == p.shape:
                        st[key].mul_(factors[id(p)])
        return [factors[id(p)] for p in self.params]

    def on_train_start(self) -> None:
        self.rescale()

    def after_step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.rescale()

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])


def _angle(before: torch.Tensor, after: torch.Tensor) -> float:
    """Angle between two tensors, ``atan2(||a_perp||, <a, u>)`` (accurate for tiny angles)."""
    nb = before.norm()
    if nb == 0 or after.norm() == 0:
        return float("nan")
    u = before / nb
    along = torch.sum(after * u)
    perp = (after - along * u).norm()
    return float(torch.atan2(perp, along))


class ELRMonitor:
    """Effective learning rate and angular update of SI tensors, for any optimizer.

    Call :meth:`before_step` before ``optimizer.step`` and :meth:`after_step` after it (with the
    gradients still in ``.grad``); ``after_step`` returns the aggregated statistics on logging steps
    (every ``every``-th; None otherwise; the snapshot is only taken when due). Per tracked tensor
    ``w_t`` (Kodryan et al. 2022, Sec. 2):

    * ``elr = lr / ||w_t||^2`` with the lr of the tensor's param group (the nominal ELR of SGD);
    * ``angle = angle(w_t, w_{t+1})`` in radians (the effective step on the sphere);
    * ``elr_measured = tan(angle) / ||P grad L(w_hat)||`` with ``grad L(w_hat) = ||w_t|| g_t`` and
      ``P`` the projection onto the tangent space at ``w_t``: the ELR the optimizer actually used.

    The result has ``<stat>_mean`` and ``<stat>_median`` over tensors for ``elr``, ``elr_measured``,
    ``angle`` and ``w_norm``, plus the same for the concatenated SI vector (the paper's ELR, with
    the lr of the first tracked tensor): ``elr_joint = lr / sum ||w||^2``, ``angle_joint`` and
    ``elr_measured_joint``. Per-tensor values stay in
    :attr:`last`. Weight rescaling between the two calls does not change a per-tensor angle
    (``per="tensor"``), so the order relative to :class:`WeightRescaling` is free."""

    def __init__(self, model_or_params: Union[nn.Module, Iterable[Any]],
                 names: Optional[list[str]] = None,
                 example_input_fn: Optional[Callable[[], Any]] = None, every: int = 1):
        if isinstance(model_or_params, nn.Module):
            params = dict(model_or_params.named_parameters())
            if names is None:
                names = [s.name for s in scale_invariant_info(model_or_params, example_input_fn)]
            self.named = [(n, params[n]) for n in names]
        else:
            self.named = [n_p if isinstance(n_p, tuple) else (str(i), n_p)
                          for i, n_p in enumerate(model_or_params)]
            if names is not None:
                self.named = [(n, p) for (_, p), n in zip(self.named, names)]
        if not self.named:
            raise ValueError("ELRMonitor: no tensor to monitor")
        self.every, self.calls = int(every), 0
        self._before: Optional[list[torch.Tensor]] = None
        self.last: dict[str, dict[str, float]] = {}

    @torch.no_grad()
    def before_step(self) -> None:
        self._before = None
        if self.calls % self.every == 0:
            self._before = [p.detach().clone() for _, p in self.named]

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> Optional[dict[str, float]]:
        self.calls += 1
        if self._before is None:
            return None
        lrs = {}
        for group in protocol.unwrap(optimizer).param_groups:
            for p in group["params"]:
                lrs[id(p)] = float(group["lr"])
        per: dict[str, dict[str, float]] = {}
        before = self._before
        for (name, p), w0 in zip(self.named, before):
            norm = float(w0.norm())
            lr = lrs.get(id(p), float("nan"))
            row = {"w_norm": norm, "elr": lr / norm ** 2 if norm > 0 else float("nan"),
                   "angle": _angle(w0, p.detach())}
            g = p.grad
            if g is not None and norm > 0:
                u = w0 / norm
                g_perp = (g - torch.sum(g * u) * u).norm() * norm   # ||P grad L(w_hat)||
                row["elr_measured"] = (math.tan(row["angle"]) / float(g_perp)
                                       if g_perp > 0 else float("nan"))
            per[name] = row
        self.last, self._before = per, None
        out: dict[str, float] = {}
        for key in ("elr", "elr_measured", "angle", "w_norm"):
            vals = [r[key] for r in per.values() if key in r and math.isfinite(r[key])]
            if vals:
                out[f"{key}_mean"] = statistics.fmean(vals)
                out[f"{key}_median"] = statistics.median(vals)
        total = sum(r["w_norm"] ** 2 for r in per.values())
        first_lr = lrs.get(id(self.named[0][1]), float("nan"))
        out["elr_joint"] = first_lr / total if total > 0 else float("nan")
        out.update(self._joint(before, total))
        return out

    def _joint(self, before: list[torch.Tensor], total: float) -> dict[str, float]:
        """Angle and measured ELR of the concatenated SI vector (the paper's joint sphere)."""
        if total <= 0:
            return {}
        n0 = math.sqrt(total)
        after = [p.detach() for _, p in self.named]
        along = sum(float(torch.sum(w1 * w0)) for w0, w1 in zip(before, after)) / n0
        perp = math.sqrt(sum(float((w1 - along * w0 / n0).square().sum())
                             for w0, w1 in zip(before, after)))
        out = {"angle_joint": math.atan2(perp, along)}
        grads = [p.grad for _, p in self.named]
        if all(g is not None for g in grads):
            radial = sum(float(torch.sum(g * w0)) for g, w0 in zip(grads, before)) / n0
            g_perp = n0 * math.sqrt(sum(float((g - radial * w0 / n0).square().sum())
                                        for g, w0 in zip(grads, before)))
            if g_perp > 0:
                out["elr_measured_joint"] = math.tan(out["angle_joint"]) / g_perp
        return out
