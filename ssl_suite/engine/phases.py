"""Phases that change the model rather than step it, shared by pretraining and fine-tuning.

DESIGN.md ("One protocol for every algorithm"): GradInit runs once before training
(``on_train_start``), GradMax growth runs after chosen optimizer steps (``after_step``) and keeps
the optimizer state consistent when parameters change shape, and SCL reparametrises the weights
with masks whose regulariser joins the loss. The loops call these functions; none of them knows
which algorithm runs.

* :func:`run_gradinit` — Zhu et al., "GradInit", NeurIPS 2021, Eq. 1 / Algorithm 1
  (:mod:`ssl_suite.models.gradinit`): learned multipliers folded into the weights, a progress bar,
  the multipliers per layer in the log and in ``RUN/gradinit.json``.
* :class:`Growth` — Evci et al., "GradMax", ICLR 2022 (:mod:`ssl_suite.models.gradmax`): pairs
  built thin (``start_fraction``), grown ``n_growths`` times back to full width; a BYOL target
  grows with its online network (zero incoming weights, the online network's new outgoing
  weights, so both compute what they computed before and the EMA pairs keep matching).
* :class:`Sparsity` — Tang et al., "Automatic Sparse Connectivity Learning", TNNLS 2023
  (:mod:`ssl_suite.models.scl`; the regulariser and the normalisation are a reconstruction):
  masks on the chosen modules, their own optimizer group, ``lambda * R`` in the loss, sparsity per
  layer in the log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..config import ConfigError, GradInitConfig, GrowthConfig, SparsityConfig

log = logging.getLogger("ssl_suite")

_ADAM_FAMILY = ("adam", "lamb", "lion", "adafactor", "adan", "koala")


# ----------------------------------------------------------------------------------------------
# GradInit


def gradinit_optimizer(cfg: GradInitConfig, run_optimizer: str) -> str:
    """The optimizer A whose first step GradInit simulates: ``auto`` -> ``adam`` for Adam-family
    run optimizers (their first step is about lr * sign(g), the paper's A for Adam), else
    ``sgd``."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    name = run_optimizer.lower()
    return "adam" if any(a in name for a in _ADAM_FAMILY) else "sgd"


def run_gradinit(model: nn.Module, loss_fn, batches: Iterator, cfg: GradInitConfig,
                 run_optimizer: str, run_lr: float, *, also: Iterable[nn.Module] = (),
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 progress: bool = True, out_path: Optional[Path] = None) -> dict[str, float]:
    """Learn GradInit's multipliers on ``model`` and fold them into its weights (and into the
    parameters of the same names in each module of ``also``: a BYOL target built like the online
    network gets the same scales). ``reduce`` averages the multipliers over processes. Returns
    ``{parameter name: multiplier}``; writes them (and the per-step history) to ``out_path``."""
    from ..models.gradinit import fold_scales, gradinit

    algo = gradinit_optimizer(cfg, run_optimizer)
    lr = cfg.lr if cfg.lr is not None else run_lr
    history: list[dict] = []
    try:
        scales = gradinit(model, loss_fn, batches, optimizer=algo, lr=lr, steps=cfg.steps,
                          gamma=cfg.gamma, min_scale=cfg.min_scale, scale_lr=cfg.scale_lr,
                          progress=progress, normalize_grad=cfg.normalize_grad,
                          second_order=cfg.second_order, grad_clip=cfg.grad_clip,
                          history=history)
    except FloatingPointError as e:
        raise ConfigError(f"init.gradinit: {e}; try a smaller init.gradinit.scale_lr or "
                          "lr") from None
    if reduce is not None and scales:
        vec = reduce(torch.tensor(list(scales.values()), dtype=torch.float64))
        scales = dict(zip(scales, vec.tolist()))
    fold_scales(model, scales)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for other in also:
        own = {n: p.shape for n, p in other.named_parameters()}
        fold_scales(other, {n: m for n, m in scales.items() if own.get(n) == shapes[n]})
    branches = [h["branch"] for h in history]
    log.info("GradInit (%s, lr %.3g, %d steps, %d on the gradient-norm constraint): %d "
             "multipliers in [%.3g, %.3g]", algo, lr, len(history),
             branches.count("constraint"), len(scales), min(scales.values(), default=1.0),
             max(scales.values(), default=1.0))
    for name, m in scales.items():
        log.info("  gradinit scale %-48s %.4f", name, m)
    if out_path is not None:
        out_path.write_text(json.dumps({"optimizer": algo, "lr": lr, "scales": scales,
                                        "history": history}, indent=1) + "\n")
    return scales


# ----------------------------------------------------------------------------------------------
# GradMax growth


Pair = tuple[str, Optional[str], str]


def _block_pairs(model: nn.Module) -> list[Pair]:
    """conv1 -> bn1 -> conv2 of every residual block of ``model.encoder`` (conv2 -> bn2 -> conv3
    for bottlenecks, whose conv2 may have a stride GradMax's layer_out cannot have)."""
    enc = getattr(model, "encoder", None)
    if enc is None:
        raise ConfigError("growth.pairs: 'blocks' needs a model with an encoder")
    pairs = []
    for name, m in enc.named_modules():
        convs = [getattr(m, f"conv{i}", None) for i in (1, 2, 3)]
        if not (isinstance(convs[0], nn.Conv2d) and isinstance(convs[1], nn.Conv2d)):
            continue
        i = 2 if isinstance(convs[2], nn.Conv2d) else 1
        has_norm = isinstance(getattr(m, f"bn{i}", None), nn.Module)
        norm = f"encoder.{name}.bn{i}" if has_norm else None
        pairs.append((f"encoder.{name}.conv{i}", norm, f"encoder.{name}.conv{i + 1}"))
    if not pairs:
        raise ConfigError("growth.pairs: 'blocks' found no residual block (conv1 -> bn1 -> conv2) "
                          "in the encoder; name the pairs as 'in,norm,out'")
    return pairs


def resolve_pairs(model: nn.Module, specs: list[str]) -> list[Pair]:
    """``growth.pairs`` entries -> (layer_in, norm or None, layer_out) module names of ``model``."""
    modules = dict(model.named_modules())
    pairs: list[Pair] = []
    for spec in specs:
        if spec == "blocks":
            pairs += _block_pairs(model)
            continue
        if spec in ("projector", "predictor", "head") and spec in modules \
                and isinstance(modules[spec], nn.Sequential):
            pairs.append((f"{spec}.0", f"{spec}.1", f"{spec}.3"))
            continue
        names = [n.strip() for n in spec.split(",")]
        if len(names) not in (2, 3):
            raise ConfigError(f"growth.pairs: {spec!r} is not 'blocks', 'projector', "
                              "'predictor', 'in,out' or 'in,norm,out'")
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ConfigError(f"growth.pairs: no module named {unknown[0]!r} (e.g. "
                              f"{', '.join(list(modules)[1:4])})")
        pairs.append((names[0], names[1] if len(names) == 3 else None, names[-1]))
    for p in pairs:
        if sum(q[0] == p[0] for q in pairs) > 1:
            raise ConfigError(f"growth.pairs: {p[0]} is listed twice")
    return pairs


def use_relu1(model: nn.Module) -> None:
    """Every ``nn.ReLU`` -> :class:`~ssl_suite.models.gradmax.ReLU1`: the same function, but
    derivative 1 at 0, so units with zero incoming weights get a gradient (GradMax code's relu1;
    torch's ReLU has derivative 0 there and the new units would never learn)."""
    from ..models.gradmax import ReLU1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, ReLU1())


class Growth:
    """GradMax growth of ``pairs`` of ``model`` (and of the same pairs of ``twins``, e.g. the
    BYOL target) on a schedule of optimizer steps.

    ``start``: each pair's width before the first growth; ``final``: its width after the last;
    ``events``: the optimizer steps after which growth ``j`` (0-based) brings each pair to
    ``start + round((final - start) * (j + 1) / n_growths)``.
    """

    def __init__(self, cfg: GrowthConfig, model: nn.Module, pairs: list[Pair],
                 final: dict[str, int], steps_per_epoch: int,
                 twins: Iterable[nn.Module] = ()):
        from ..models.gradmax import hidden_width
        self.cfg, self.model, self.pairs, self.final = cfg, model, pairs, final
        self.twins = list(twins)
        self.start = {p[0]: hidden_width(self._mods(model, p)[0]) for p in pairs}
        self.first_step = max(1, int(round(cfg.start_epoch * steps_per_epoch)))
        self.every = max(1, int(round(cfg.every_epochs * steps_per_epoch)))
        self.events = [self.first_step + j * self.every for j in range(cfg.n_growths)]

    @classmethod
    def build(cls, cfg: GrowthConfig, model: nn.Module, steps_per_epoch: int,
              twins: Iterable[nn.Module] = (), shrink: bool = True) -> "Growth":
        """Resolve the pairs, switch ReLU -> ReLU1, and (``shrink``, pretraining) cut every pair to
        ``start_fraction`` of its width, the twins identically; without ``shrink`` (fine-tuning)
        the current width is the start and ``width / start_fraction`` the end."""
        from ..models.gradmax import hidden_width, shrink_pair
        twins = list(twins)
        pairs = resolve_pairs(model, cfg.pairs)
        for net in [model] + twins:
            use_relu1(net)
        final = {}
        for p in pairs:
            w = hidden_width(cls._mods(model, p)[0])
            if shrink:
                final[p[0]] = w
                start = max(1, int(round(cfg.start_fraction * w)))
                for net in [model] + [t for t in twins if cls._has(t, p)]:
                    layer_in, norm, layer_out = cls._mods(net, p)
                    shrink_pair(layer_in, layer_out, start, norm)
            else:
                final[p[0]] = max(w, int(round(w / cfg.start_fraction)))
        return cls(cfg, model, pairs, final, steps_per_epoch, twins)

    @staticmethod
    def _mods(net: nn.Module, pair: Pair):
        mods = dict(net.named_modules())
        return mods[pair[0]], (mods[pair[1]] if pair[1] else None), mods[pair[2]]

    @staticmethod
    def _has(net: nn.Module, pair: Pair) -> bool:
        mods = dict(net.named_modules())
        return all(n in mods for n in pair if n)

    def width_after(self, pair: Pair, events_done: int) -> int:
        s, f = self.start[pair[0]], self.final[pair[0]]
        return s + int(round((f - s) * min(events_done, self.cfg.n_growths) / self.cfg.n_growths))

    def widths(self, net: Optional[nn.Module] = None) -> dict[str, int]:
        from ..models.gradmax import hidden_width
        return {p[0]: hidden_width(self._mods(net or self.model, p)[0]) for p in self.pairs}

    def fit_to_state(self, net: nn.Module, state: dict[str, torch.Tensor],
                     prefix: str = "") -> None:
        """Give ``net``'s pairs the widths found in a state dict (zero-padded; the values come
        from the state dict when it is loaded): resuming or evaluating a grown run."""
        from ..models.gradmax import hidden_width, pad_pair
        for p in self.pairs:
            if not self._has(net, p):
                continue
            key = f"{prefix}{p[0]}.weight"
            if key not in state:
                continue
            layer_in, norm, layer_out = self._mods(net, p)
            k = state[key].shape[0] - hidden_width(layer_in)
            if k > 0:
                pad_pair(layer_in, layer_out, k, norm=norm)

    def due(self, step: int) -> bool:
        return step in self.events

    def grow(self, step: int, closure: Callable[[], torch.Tensor],
             optimizer: Optional[torch.optim.Optimizer] = None,
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             seed: int = 0) -> dict[str, int]:
        """The growth event after optimizer step ``step``: every pair grows by its share (GradMax
        on the batch of ``closure``, which runs forward and backward of the mean loss; the
        optimizer's state follows). Returns the new widths."""
        from ..models.gradmax import gradmax_matrices, grow_pair, pad_pair
        j = self.events.index(step)
        todo = [(p, self.width_after(p, j + 1) - self.width_after(p, j)) for p in self.pairs]
        todo = [(p, k) for p, k in todo if k > 0]
        matrices = [None] * len(todo)
        if self.cfg.method == "gradmax" and todo:   # every pair's M from one forward/backward
            mods = [self._mods(self.model, p) for p, _ in todo]
            matrices = gradmax_matrices([(m[0], m[2]) for m in mods], closure)
        grown = {}
        for (p, k), M in zip(todo, matrices):
            layer_in, norm, layer_out = self._mods(self.model, p)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + len(grown))
            out = grow_pair(layer_in, layer_out, k, closure, scale=self.cfg.scale,
                            scale_method=self.cfg.scale_method, norm=norm,
                            method=self.cfg.method, reduce=reduce, generator=gen, M=M)
            new_cols = layer_out.weight.detach()[:, -k:]
            for twin in self.twins:
                if self._has(twin, p):
                    t_in, t_norm, t_out = self._mods(twin, p)
                    pad_pair(t_in, t_out, k, new_out=new_cols.clone(), norm=t_norm)
            if optimizer is not None:
                move_optimizer_state(optimizer, out["replaced"], self.cfg.exp_avg_sq_fill)
            grown[p[0]] = out
        self.model.zero_grad(set_to_none=True)
        widths = self.widths()
        log.info("GradMax growth after step %d (%d of %d): %s", step, j + 1, len(self.events),
                 ", ".join(f"{n} {w}" for n, w in widths.items()))
        return widths


def move_optimizer_state(optimizer, replaced: dict, fill: str) -> None:
    """Swap grown parameters into the optimizer and grow their state (new entries fresh, old
    entries kept), through accelerate's wrapper and any wrapper with state of its own (our
    Lookahead's slow weights)."""
    from ..models.gradmax import grow_optimizer_state
    chain = []
    opt = optimizer
    while opt is not None and opt not in chain:
        chain.append(opt)
        opt = getattr(opt, "optimizer", None)
    chain = [o for o in chain if type(o).__name__ != "AcceleratedOptimizer"]
    for old, (new, dim) in replaced.items():
        for i, opt in enumerate(chain):   # the innermost owns param_groups: swap there
            grow_optimizer_state(opt, old, new, dim, exp_avg_sq_fill=fill,
                                 swap=i == len(chain) - 1)


def check_growth_optimizer(optimizer, name: str) -> None:
    """Growth swaps parameters; optimizers whose state is not elementwise refuse it up front."""
    from ..optim import protocol
    if getattr(protocol.unwrap(optimizer), "supports_growth", True) is False:
        raise ConfigError(f"growth.enabled: optimizer {name} keeps state that is not per element "
                          "(layer statistics, curvature blocks or replicas) and cannot follow a "
                          "change of width; use an elementwise optimizer (sgd, lars, adamw, ...)")


# ----------------------------------------------------------------------------------------------
# SCL sparsity


class Sparsity:
    """SCL masks on ``parts`` of a model (and of its twins, e.g. the BYOL target, so the EMA
    pairs keep matching and the target's mask is the EMA of the online mask variables)."""

    def __init__(self, cfg: SparsityConfig, model: nn.Module, twins: Iterable[nn.Module] = ()):
        from ..models.scl import apply_scl
        self.cfg, self.model = cfg, model
        mods = dict(model.named_children())
        unknown = [m for m in cfg.modules if m not in mods]
        if unknown:
            raise ConfigError(f"sparsity.modules: {unknown[0]!r} is not a part of the model "
                              f"(parts: {', '.join(mods)})")
        norm = None if cfg.norm == "none" else cfg.norm
        self.names: list[str] = []
        for net in [model] + list(twins):
            parts = dict(net.named_children())
            for part in cfg.modules:
                if part not in parts:
                    continue
                exclude = [e[len(part) + 1:] for e in cfg.exclude if e.startswith(part + ".")]
                try:
                    handle = apply_scl(parts[part], layers=cfg.layers, init=cfg.init,
                                       exclude=exclude, norm=norm)
                except ValueError as e:
                    raise ConfigError(f"sparsity: {e}") from None
                if net is model:
                    self.names += [f"{part}.{n}" for n in handle.names]
        if not self.names:
            raise ConfigError("sparsity.enabled: no conv/linear layer was masked (check "
                              "sparsity.modules, sparsity.layers and sparsity.exclude)")

    def masks(self) -> list[torch.nn.Parameter]:
        from ..models.scl import mask_parameters
        return mask_parameters(self.model)

    def param_group(self) -> dict:
        """The mask variables' optimizer group: their own LR, no weight decay, no trust ratio."""
        return {"params": self.masks(), "lr": self.cfg.mask_lr, "weight_decay": 0.0,
                "lars_adapt": False}

    def penalty(self) -> torch.Tensor:
        """``lambda * R`` (R the live-connection count, or its fraction with ``normalize``)."""
        from ..models.scl import scl_regularizer
        return self.cfg.weight * scl_regularizer(self.model, normalize=self.cfg.normalize)

    def report(self) -> dict[str, float]:
        """``global`` (pruned fraction over all masked weights) and the fraction per layer."""
        from ..models.scl import scl_layers, sparsity_report
        per_layer = sparsity_report(self.model)
        sizes = {n: m.weight.numel() for n, m in scl_layers(self.model).items()}
        pruned = sum(per_layer[n] * sizes[n] for n in per_layer)
        return {"global": pruned / max(sum(sizes.values()), 1), **per_layer}

    @staticmethod
    def cached():
        """Compute each masked weight once per forward (two BYOL views share it), so the mask
        gradient normalisation sees the summed gradient (see :mod:`ssl_suite.models.scl`)."""
        from torch.nn.utils import parametrize
        return parametrize.cached()


def check_combination(weight_norm: bool, growth: bool, sparsity: bool, wrs: bool = False,
                      log_elr: bool = False) -> None:
    """Combinations that cannot work together, refused with one line before anything runs."""
    if growth and (wrs or log_elr):
        raise ConfigError(f"growth.enabled with {'optim.wrs' if wrs else 'train.log_elr'}: "
                          "they follow a fixed set of weight tensors; choose one")
    if sparsity and weight_norm:
        raise ConfigError("sparsity.enabled with model.weight_norm: both reparametrise the same "
                          "weights; choose one")
    if sparsity and growth:
        raise ConfigError("sparsity.enabled with growth.enabled: growing a masked layer is not "
                          "supported; choose one")
    if growth and weight_norm:
        raise ConfigError("growth.enabled with model.weight_norm: growing a weight-normalised "
                          "layer is not supported; choose one")

