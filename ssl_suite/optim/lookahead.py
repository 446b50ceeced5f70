"""Lookahead: k steps forward, 1 step back (Zhang, Lucas, Hinton & Ba, NeurIPS 2019).

Paper, Algorithm 1, with slow weights phi, fast weights theta and any inner optimizer A::

    phi_0 = theta_0                                  (cached when the wrapper is built)
    for t = 1, 2, ...:
        theta_{t,0} = phi_{t-1}
        theta_{t,i} = theta_{t,i-1} + A(L, theta_{t,i-1}, d)      i = 1..k   (k base steps)
        phi_t = phi_{t-1} + alpha * (theta_{t,k} - phi_{t-1})      (the "step back")
        theta_{t,k} <- phi_t                                        (fast weights reset)

Defaults are the paper's ``k=5, alpha=0.5`` (it reports robustness over k in {5, 10} and alpha in
{0.5, 0.8}); the official code (``michaelrzhang/lookahead``) defaults to ``la_alpha=0.8``.

What happens to the inner optimizer's state at a sync (``pullback_momentum``, the official code's
option; the paper keeps it):

* ``"none"`` (paper): the state is kept as it is.
* ``"reset"``: the momentum buffers are zeroed.
* ``"pullback"``: each momentum buffer m gets a slow copy m_phi (zero at the start) that is
  interpolated like the weights, ``m_phi <- m_phi + alpha (m - m_phi)``, then ``m <- m_phi``.

The buffers touched are the base optimizer's state entries named in ``momentum_keys``: by default
``momentum_buffer`` (torch SGD, :class:`ssl_suite.optim.LARS`) and ``exp_avg`` (Adam/AdamW's first
moment). Second moments (``exp_avg_sq``) and step counts are never touched: zeroing a second moment
would turn the next Adam step into ``m / eps``. The official code only knows ``momentum_buffer``.

Contract: ``param_groups`` *are* the base optimizer's (an LR scheduler on the wrapper moves the
base's ``lr``); ``step(closure)`` hands the closure to the base optimizer, which calls it once, and
returns its loss; ``state`` holds the wrapper's own per-parameter tensors (``slow_param`` = phi and,
with ``"pullback"``, ``slow_<key>``), the base's state stays in ``self.optimizer.state``.
``state_dict()`` is the base optimizer's (same ``state``/``param_groups`` layout, loadable by the
bare base optimizer) plus a ``"lookahead"`` entry with ``k``, ``alpha``, ``pullback_momentum``, the
position in the k-cycle ``la_step`` and the slow tensors by parameter index, so that
``state_dict`` -> fresh ``Lookahead(base)`` -> ``load_state_dict`` continues bit-identically, also
mid-cycle. The official code's ``state_dict`` is the inner optimizer's only, which loses phi and the
cycle position on resume (pytorch_optimizer had the same bug). As with torch optimizers, the loaded
hyper-parameters (``k``, ``alpha``, ``pullback_momentum``) replace the constructor's.

timm's ``timm.optim.Lookahead`` (1.0.31) differs: defaults ``k=6, alpha=0.5``; phi is created lazily
at the first sync from the fast weights, so its first sync is a no-op (phi_1 = theta_{1,k} instead
of phi_0 + alpha (theta_{1,k} - phi_0)); it skips parameters without a gradient; its phi
(``lookahead_slow_buff``) lives in the base optimizer's state and its counters (``lookahead_step``)
in the param groups, so its state_dict does round-trip. Here phi_0 is cached at construction and
kept out of the base's state (torch's Adam initialises a parameter's state only when it is empty).

For BYOL: the target EMA follows what is in the online network, i.e. the fast weights, including
the jump at each sync. :meth:`Lookahead.swap_to_slow` puts phi in the model for an evaluation (the
official README evaluates on the slow weights); :meth:`Lookahead.sync_lookahead` forces a sync.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.optim import Optimizer

from . import protocol

PULLBACK_MODES = ("none", "reset", "pullback")
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class Lookahead(protocol.WrapsOptimizer, Optimizer):
    """Lookahead around any ``torch.optim.Optimizer`` (Zhang et al. 2019, Algorithm 1).

    Args:
        optimizer: the inner (fast) optimizer, already built over its parameter groups.
        k: base steps per sync (paper 5; timm 6).
        alpha: slow step size in (0, 1] (paper 0.5; official code 0.8). ``alpha=1`` is the base
            optimizer alone.
        pullback_momentum: ``"none"`` (paper), ``"reset"`` or ``"pullback"``: see the module doc.
        momentum_keys: base-optimizer state entries that ``"reset"``/``"pullback"`` act on.
    """

    #: :func:`ssl_suite.optim.protocol.unwrap` looks through to the base optimizer, so the base's
    #: ``attach``/``backward`` (NSGD, MBF, SVI) are used under Lookahead too.
    wraps_optimizer = True

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5,
                 pullback_momentum: str = "none", momentum_keys: Sequence[str] = MOMENTUM_KEYS):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Lookahead: {type(optimizer).__name__} is not a torch Optimizer")
        _check(k, alpha, pullback_momentum)
        # Not Optimizer.__init__: it would add the groups again. The fields it sets, by hand.
        self.optimizer = optimizer
        self.k, self.alpha, self.pullback_momentum = int(k), float(alpha), pullback_momentum
        self.momentum_keys = tuple(momentum_keys)
        self._la_step = 0  # base steps since the last sync, in [0, k)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        for p in self._params():
            self.state[p]["slow_param"] = p.detach().clone()  # phi_0 = theta_0

    # -- the base optimizer's groups and defaults, shared, not copied --------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- algorithm -----------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One base step (the base optimizer calls ``closure`` once); a sync every k-th call."""
        loss = self.optimizer.step(closure)
        self._la_step += 1
        if self._la_step >= self.k:
            self.sync_lookahead()
        return loss

    @torch.no_grad()
    def sync_lookahead(self) -> None:
        """phi <- phi + alpha (theta - phi); theta <- phi; momentum policy; new k-cycle."""
        fast = self._params()
        if fast:
            slow = [self.state[p]["slow_param"] for p in fast]
            torch._foreach_lerp_(slow, fast, self.alpha)
            torch._foreach_copy_(fast, slow)
        if self.pullback_momentum != "none":
            bufs, slow_bufs = [], []
            for p in fast:
                base_state = self.optimizer.state.get(p, {})
                for key in self.momentum_keys:
                    buf = base_state.get(key)
                    if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                        bufs.append(buf)
                        if self.pullback_momentum == "pullback":
                            slow_bufs.append(self.state[p].setdefault(f"slow_{key}",
                                                                      torch.zeros_like(buf)))
            if bufs and self.pullback_momentum == "reset":
                torch._foreach_zero_(bufs)
            elif bufs:
                torch._foreach_lerp_(slow_bufs, bufs, self.alpha)
                torch._foreach_copy_(bufs, slow_bufs)
        self._la_step = 0

    @contextmanager
    def swap_to_slow(self) -> Iterator[None]:
        """Within the block the parameters hold phi (e.g. for evaluation); theta after it."""
        fast = self._params()
        with torch.no_grad():
            backup = [p.detach().clone() for p in fast]
            torch._foreach_copy_(fast, [self.state[p]["slow_param"] for p in fast])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(fast, backup)

    # -- Optimizer contract --------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group to the base optimizer; its slow weights start at the current values."""
        self.optimizer.add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self.state[p]["slow_param"] = p.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd["lookahead"] = {
            "k": self.k, "alpha": self.alpha, "pullback_momentum": self.pullback_momentum,
            "la_step": self._la_step,
            "state": {i: dict(self.state[p]) for i, p in enumerate(self._params())},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "lookahead" not in state_dict:
            raise ValueError("Lookahead.load_state_dict: no 'lookahead' entry (saved without "
                             "Lookahead?); load it into .optimizer to keep phi = current weights")
        la = state_dict["lookahead"]
        _check(la["k"], la["alpha"], la["pullback_momentum"])
        params, saved = self._params(), la["state"]
        if len(saved) != len(params):
            raise ValueError(f"Lookahead.load_state_dict: {len(saved)} slow entries for "
                             f"{len(params)} parameters")
        state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        for i, p in enumerate(params):
            entry = saved[i]
            if "slow_param" not in entry:
                raise ValueError(f"Lookahead.load_state_dict: parameter {i} has no slow_param")
            for key, t in entry.items():
                if t.shape != p.shape:
                    raise ValueError(f"Lookahead.load_state_dict: {key} of parameter {i} has "
                                     f"shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
                state[p][key] = t.to(device=p.device, dtype=p.dtype, copy=True)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "lookahead"})
        self.state = state
        self.k, self.alpha = int(la["k"]), float(la["alpha"])
        self.pullback_momentum, self._la_step = la["pullback_momentum"], int(la["la_step"])

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: keep the base optimizer
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __repr__(self) -> str:
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return (f"Lookahead (k={self.k}, alpha={self.alpha}, "
                f"pullback_momentum={self.pullback_momentum!r},\n{inner}\n)")


def _check(k: Any, alpha: Any, pullback_momentum: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Lookahead: k must be an int >= 1, got {k!r}")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"Lookahead: alpha must be in (0, 1], got {alpha!r}")
    if pullback_momentum not in PULLBACK_MODES:
        raise ValueError(f"Lookahead: pullback_momentum must be one of {PULLBACK_MODES}, "
                         f"got {pullback_momentum!r}")


def wrap_lookahead(optimizer: Optimizer, k: int = 5, alpha: float = 0.5,
                   pullback_momentum: str = "none",
                   momentum_keys: Sequence[str] = MOMENTUM_KEYS) -> Lookahead:
    """``Lookahead(optimizer, ...)``; refuses an optimizer that is already a Lookahead (ours or
    timm's, e.g. from ``create_optimizer_v2("lookahead_...")``)."""
    from timm.optim.lookahead import Lookahead as TimmLookahead
    if isinstance(optimizer, (Lookahead, TimmLookahead)):
        raise ValueError(f"wrap_lookahead: {type(optimizer).__module__}.Lookahead is already a "
                         "Lookahead; build the base optimizer without the lookahead_ prefix")
    return Lookahead(optimizer, k=k, alpha=alpha, pullback_momentum=pullback_momentum,
                     momentum_keys=momentum_keys)
