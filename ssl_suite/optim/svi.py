"""SVI: training by stochastic variational inequality (Xu, Cheng & Xie, arXiv 2202.08876, v1
"Training neural networks using monotone variational inequality"; NeurIPS 2023 OPT workshop).
Spec: ``shared/algorithms/nsgd_koala_mbf_svi.md`` section 4. Official code:
``hamrel-cxu/SVI-NN-training`` (autograd version at ``f0cf769``, OGB notebooks at ``ef43667``).

The operator (paper; spec 4.2). For a GLM ``E[y|x] = eta(theta^T x)`` with a monotone link eta the
field ``F(theta) = E[x (eta(theta^T x) - y)]`` is monotone (Juditsky & Nemirovski 2019), and SVI
solves ``F(theta*) = 0`` by stochastic approximation. For a network, layer l with parameters
theta_l, input X_l, pre-activation ``X~_{l+1} = f_l(X_l; theta_l)`` and post-activation
``X_{l+1} = sigma_l(X~_{l+1})`` gets::

    F_l(theta) = J_{theta_l} X~_{l+1}(theta_l; sg(X_l))^T . sg(dL/dX_{l+1})           (SVI)
    grad_l     = J_{theta_l} X~_{l+1}^T . (sigma_l'(X~_{l+1}) * dL/dX_{l+1})        (gradient)

i.e. backpropagation in which *each layer's own* activation derivative is replaced by the identity
while the downstream factor dL/dX_{l+1} is the ordinary one. With softmax as the output link and
the MSE loss ``L = (1/N) sum_n ||y_hat_n - y_n||^2`` the last layer gets
``(2/N) (y_hat - y)^T [X_{L-1}, 1]``: the GLM field itself. With cross-entropy on logits (no
output module) the last layer gets its ordinary gradient. The directions go into ``p.grad`` and any
base optimizer steps on them (the paper: SGD with (Nesterov) momentum, Adam).

How it is computed here (one forward, two backward passes; exact, no recompute) -- the general
rule [RECONSTRUCTION for nets outside the paper's FC/GCN/LeNet/VGG class]: *on every path from a
parameter to the loss, the derivative of the first activation module on that path is replaced by
the identity*. ``attach(model)`` puts a forward pre-hook on every activation module (the types in
:data:`ACTIVATION_TYPES`: ReLU, GELU, SiLU, Sigmoid, Tanh, Softmax, ..., torch's and timm's),
which records the gradient edge of the pre-activation X~ and feeds the activation through an
identity *gate*, and a forward hook that records the edge of the output X. Then
``backward(loss)`` runs

  (a) ``g_r = dL/dX_r`` for every recorded activation call r (``torch.autograd.grad`` to the
      output edges; gates open; no parameter gradient is formed, so DDP's hooks do not fire);
  (b) ONE ``torch.autograd.backward`` from the roots ``[L, X~_1, ..., X~_R]`` with the gradients
      ``[1, g_1, ..., g_R]`` while every gate is closed (its backward returns None), so each
      root's gradient reaches exactly the parameters upstream of it *before* the previous
      activation: the sum is ``sum_r J_theta X~_r^T g_r`` plus the ordinary gradient along the
      paths with no activation (e.g. a final Linear). Autograd accumulates it into ``p.grad``, once
      per parameter, so DDP's all-reduce hooks fire as in an ordinary backward and micro-batches
      add up.

For a plain feed-forward net this is the spec's formula exactly: theta_l owns the modules between
activation l-1 and activation l (BN included, with its batch-statistics Jacobian; pooling, dropout
with the *same* mask, flatten), the layers after the last activation get gradients. In a
post-activation ResNet block ``act2(bn2(conv2(act1(.))) + downsample(x))`` conv2, bn2 and the
downsample conv/bn belong to act2 [RECONSTRUCTION: the paper's nets have no residuals]. Where a
parameter also reaches the loss along a path that bypasses its "own" activation (pre-activation
residual streams, transformers), those paths keep their own first activation (or none: the
ordinary derivative); e.g. in a ViT block only fc1 -> GELU is an (f, sigma) pair. The same module
called several times per step (BYOL's two views, an activation module reused in a block) gives
one record per call.

The authors' autograd code (spec 4.2) instead recomputes every layer on a detached input and
backpropagates ``sum_l <X~_l^det, dL/dX_l>``: same directions (``tests/test_svi.py`` checks this
against an independent implementation of it), but the recompute updates BatchNorm running
statistics twice and draws fresh dropout masks (spec 4.3 quirks); here the single forward updates
them once. Cost: one forward, one backward without weight gradients, one backward with them
(conv input gradients are formed again and then dropped at the closed gate); no extra state.

Warm start (spec 4.3, the notebooks' ``pause_SVI``): with ``warm_start_fraction=f`` and
``total_steps=T`` the first ``round(f T)`` steps use SVI directions, the rest plain gradients
(ordinary backward; the hooks then do nothing and the activations' ``inplace`` flags are
restored). The authors rebuild the optimizer at the switch: ``reset_base_state=True`` clears the
base optimizer's state (momentum, Adam moments, step counts); param groups, hence the learning
rate schedule, continue. The notebooks' best vision setting was f = 0.1 (0.05 beyond 20 epochs);
the default ``None`` is SVI throughout, as in the paper's main experiments (OGB, two-moon).

Contract (:mod:`ssl_suite.optim.protocol`): ``attach(model)`` once (returns a handle whose
``remove()`` takes the hooks off and restores ``inplace``); the closure calls
``protocol.backward`` -> :meth:`SVI.backward`; ``step(closure)`` hands the closure to the base
optimizer, which calls it ONCE (every torch/timm optimizer does), then counts the step.
``param_groups`` and ``state`` *are* the base optimizer's (LR schedulers, GradScaler and Lookahead
see them); ``state_dict()`` is the base's plus an ``"svi"`` entry with the step count and whether
the warm start has switched, so a resumed run continues bit-identically. A base optimizer that
has its own ``attach`` (NSGD's input hooks) gets it called too; one with its own ``backward`` is
refused. Gradient-reading hooks of a base (MBF's tensor hooks) would see both passes: not
supported. Activation checkpointing (hooks re-run inside backward) is not supported. An in-place
op on an activation's *input* after the activation ran is not supported (the gate is a view).

Defaults: ``base="sgd"`` is timm's SGD with Nesterov momentum (the OGB/vision notebooks use
Nesterov; the two-moon script plain momentum: ``base="momentum"``), ``momentum=0.9`` (timm's
default; the paper's two-moon setup; OGB 0.95, vision 0.95 with lr 1e-3).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.optim import Optimizer

from . import protocol


def _activation_types() -> tuple[type, ...]:
    names = ["ReLU", "ReLU6", "LeakyReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish",
             "Sigmoid", "Tanh", "Softplus", "Softsign", "Hardswish", "Hardsigmoid", "Hardtanh",
             "Tanhshrink", "Softshrink", "Hardshrink", "LogSigmoid", "Threshold",
             "Softmax", "Softmax2d"]  # softmax: the paper's output link (not elementwise)
    types = [getattr(nn, n) for n in names if hasattr(nn, n)]
    try:  # timm's own activation modules (create_act may return these)
        from timm.layers import activations as ta
        from timm.layers import activations_me as tm
        types += [getattr(ta, n) for n in ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish",
                                           "HardMish", "HardSigmoid", "HardSwish", "Sigmoid",
                                           "Tanh") if hasattr(ta, n)]
        types += [getattr(tm, n) for n in ("SwishMe", "MishMe", "HardMishMe", "HardSigmoidMe",
                                           "HardSwishMe") if hasattr(tm, n)]
    except ImportError:  # pragma: no cover
        pass
    return tuple(dict.fromkeys(types))


#: Modules treated as sigma_l. PReLU is not one (it has parameters): it is part of f. nn.Identity
#: is not one either (timm puts Identity placeholders everywhere), so "no activation" = gradient.
ACTIVATION_TYPES: tuple[type, ...] = _activation_types()


class _Switch:
    """Shared by all gates of one SVI: open = transparent, closed = stop the gradient."""
    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


class _Gate(torch.autograd.Function):
    """Identity in front of an activation; its backward returns None while the switch is closed,
    which cuts every path at the first activation it meets (pass (b))."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, switch: _Switch) -> torch.Tensor:  # type: ignore[override]
        ctx.switch = switch
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return (grad if ctx.switch.open else None), None


class SVI(protocol.WrapsOptimizer, Optimizer):
    """SVI directions (Xu, Cheng & Xie 2022, spec 4.2) fed to any registered base optimizer.

    Args:
        params: parameters or parameter groups (as for any torch optimizer; a module is passed to
            timm, which builds its weight-decay groups).
        lr: learning rate of the base optimizer.
        base: timm registry name of the base optimizer (``"sgd"`` = Nesterov SGD, ``"momentum"``,
            ``"adamw"``, ``"lars"``, ...; ours are known through :mod:`ssl_suite.optim.registry`).
        momentum: passed to the base when it takes momentum (timm's rule).
        weight_decay: passed to the base.
        warm_start_fraction: None (SVI throughout) or f in (0, 1]: SVI for the first
            ``round(f * total_steps)`` steps (at least 1), then plain gradients.
        total_steps: the run's optimizer steps; required with ``warm_start_fraction``.
        reset_base_state: clear the base optimizer's state at the switch (the authors rebuild it).
        **base_kwargs: anything else for the base (``betas``, ``eps``, ``nesterov``, ...).
    """

    #: what :meth:`attach` hooks; extend the tuple to add activation types.
    activation_types: tuple[type, ...] = ACTIVATION_TYPES

    def __init__(self, params, lr: float, base: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 0.0, warm_start_fraction: Optional[float] = None,
                 total_steps: Optional[int] = None, reset_base_state: bool = True,
                 **base_kwargs: Any):
        from timm.optim import create_optimizer_v2

        from . import registry  # noqa: F401  (our names in timm's registry)

        if lr is None or not float(lr) >= 0.0:
            raise ValueError(f"SVI: lr must be >= 0, got {lr!r}")
        if not isinstance(base, str) or not base:
            raise ValueError(f"SVI: base must be an optimizer name, got {base!r}")
        low = base.lower()
        if low.startswith("svi") or low.startswith("lookahead"):
            raise ValueError(f"SVI: base {base!r} cannot be SVI or Lookahead (wrap SVI in "
                             "Lookahead instead: lookahead_svi_<base>)")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"SVI: momentum must be in [0, 1), got {momentum!r}")
        if not float(weight_decay) >= 0.0:
            raise ValueError(f"SVI: weight_decay must be >= 0, got {weight_decay!r}")
        _check_warm_start(warm_start_fraction, total_steps)
        if not isinstance(reset_base_state, bool):
            raise ValueError(f"SVI: reset_base_state must be a bool, got {reset_base_state!r}")
        try:
            optimizer = create_optimizer_v2(params, opt=base, lr=lr, weight_decay=weight_decay,
                                            momentum=momentum, **base_kwargs)
        except (ValueError, KeyError) as e:
            raise ValueError(f"SVI: base {base!r} could not be built: {e}") from None
        if hasattr(type(optimizer), "backward"):
            raise ValueError(f"SVI: base {base!r} replaces the backward pass itself; "
                             "it cannot take SVI directions")
        # Not Optimizer.__init__ (it would add the groups again): its fields, by hand, as Lookahead.
        self.optimizer = optimizer
        self.base = low
        self.warm_start_fraction = (None if warm_start_fraction is None
                                    else float(warm_start_fraction))
        self.total_steps = None if total_steps is None else int(total_steps)
        self.reset_base_state = reset_base_state
        self._svi_step = 0          # base steps taken
        self._switched = False      # warm start over: plain gradients from now on
        self._switch = _Switch()
        self._records: list[tuple[Any, Any, torch.dtype]] = []  # (edge X~, edge X, X~ dtype)
        self._pending: dict[int, tuple[Any, torch.dtype]] = {}  # module id -> (edge X~, dtype)
        self._inplace: list[tuple[nn.Module, bool]] = []  # activations whose inplace we turned off
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # -- the base optimizer's groups, defaults and state, shared ------------------------------
    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def svi_steps(self) -> Optional[int]:
        """Steps that use SVI directions (None: all)."""
        if self.warm_start_fraction is None:
            return None
        return max(1, int(round(self.warm_start_fraction * self.total_steps)))

    @property
    def uses_svi(self) -> bool:
        """True while steps take SVI directions (before the warm-start switch)."""
        return not self._switched

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> protocol.Handle:
        """Gate and record every activation module of ``model`` (see the module doc); turn their
        ``inplace`` off while attached. Calls the base optimizer's ``attach`` too, if it has one."""
        handle = protocol.Handle()
        restore: list[tuple[nn.Module, bool]] = []
        for module in model.modules():
            if not isinstance(module, self.activation_types):
                continue
            handle.add(module.register_forward_pre_hook(self._pre_hook))
            handle.add(module.register_forward_hook(self._post_hook))
            if getattr(module, "inplace", False) is True:
                restore.append((module, True))
        self._inplace.extend(restore)
        if not self._switched:
            for module, _ in restore:
                module.inplace = False
        handle.add(_Restore(self, restore))
        base_attach = getattr(self.optimizer, "attach", None)
        if base_attach is not None:
            inner = base_attach(model)
            if inner is not None:
                handle.add(inner)
        return handle

    def _pre_hook(self, module: nn.Module, args: tuple):
        if self._switched or not torch.is_grad_enabled() or not args:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or not x.requires_grad:
            return None
        self._pending[id(module)] = (get_gradient_edge(x), x.dtype)
        return (_Gate.apply(x, self._switch),) + tuple(args[1:])

    def _post_hook(self, module: nn.Module, args: tuple, output):
        pre = self._pending.pop(id(module), None)
        if pre is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        self._records.append((pre[0], get_gradient_edge(output), pre[1]))
        return None

    # -- backward ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, accelerator: Any = None) -> None:
        """SVI directions of ``loss`` accumulated into ``p.grad`` (plain gradients after the
        warm-start switch). With an accelerator the loss is divided by its
        ``gradient_accumulation_steps`` and scaled by its GradScaler, as ``accelerator.backward``
        does."""
        records, self._records = self._records, []
        self._pending.clear()
        if self._switched or not records:
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            return
        if accelerator is not None:
            kind = str(getattr(accelerator, "distributed_type", ""))
            if "DEEPSPEED" in kind or "MEGATRON" in kind:
                raise ValueError(f"SVI: {kind} runs its own backward; use DDP or a single process")
            steps = getattr(accelerator, "gradient_accumulation_steps", 1)
            if steps != 1:
                loss = loss / steps
            scaler = getattr(accelerator, "scaler", None)
            if scaler is not None:
                loss = scaler.scale(loss)
        # (a) dL/dX_r at every recorded activation output (no parameter gradients formed)
        grads = torch.autograd.grad(loss, [post for _, post, _ in records], retain_graph=True,
                                    allow_unused=True, materialize_grads=False)
        roots: list[Any] = [loss]
        root_grads: list[torch.Tensor] = [torch.ones_like(loss)]
        for (pre, _, dtype), g in zip(records, grads):
            if g is not None:  # None: that activation output does not reach the loss
                roots.append(pre)
                root_grads.append(g if g.dtype == dtype else g.to(dtype))  # e.g. fp32 softmax
        # (b) sum_r J X~_r^T g_r (+ gradient along activation-free paths), gates closed
        self._switch.open = False
        try:
            torch.autograd.backward(roots, root_grads)
        finally:
            self._switch.open = True

    # -- step ----------------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One base step; the base optimizer calls ``closure`` (once, for torch/timm optimizers).
        Returns what the closure returned."""
        loss = self.optimizer.step(closure)
        self._svi_step += 1
        if not self._switched and self.svi_steps is not None and self._svi_step >= self.svi_steps:
            self._switch_to_gradients()
        return loss

    def _switch_to_gradients(self) -> None:
        self._switched = True
        self._records.clear()
        self._pending.clear()
        for module, flag in self._inplace:
            module.inplace = flag
        if self.reset_base_state:
            self.optimizer.state.clear()

    # -- Optimizer contract --------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._records.clear()
        self._pending.clear()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd["svi"] = {"step": self._svi_step, "switched": self._switched, "base": self.base,
                     "warm_start_fraction": self.warm_start_fraction,
                     "total_steps": self.total_steps, "reset_base_state": self.reset_base_state}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "svi" not in state_dict:
            raise ValueError("SVI.load_state_dict: no 'svi' entry (saved without SVI?); load it "
                             "into .optimizer to keep the step count at 0")
        svi = state_dict["svi"]
        if svi["base"] != self.base:
            raise ValueError(f"SVI.load_state_dict: saved with base {svi['base']!r}, this SVI "
                             f"has base {self.base!r}")
        _check_warm_start(svi["warm_start_fraction"], svi["total_steps"])
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "svi"})
        self.warm_start_fraction = svi["warm_start_fraction"]
        self.total_steps = svi["total_steps"]
        self.reset_base_state = bool(svi["reset_base_state"])
        self._svi_step = int(svi["step"])
        switched = bool(svi["switched"])
        if switched and not self._switched:
            reset, self.reset_base_state = self.reset_base_state, False  # state was just loaded
            self._switch_to_gradients()
            self.reset_base_state = reset
        elif not switched and self._switched:
            self._switched = False
            for module, _ in self._inplace:
                module.inplace = False

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: keep the base optimizer
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __repr__(self) -> str:
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return (f"SVI (base={self.base!r}, warm_start_fraction={self.warm_start_fraction}, "
                f"total_steps={self.total_steps}, step={self._svi_step}, "
                f"switched={self._switched},\n{inner}\n)")


class _Restore:
    """Part of :meth:`SVI.attach`'s handle: gives the activations their ``inplace`` back."""

    def __init__(self, svi: SVI, modules: list[tuple[nn.Module, bool]]):
        self.svi, self.modules = svi, modules

    def remove(self) -> None:
        for module, flag in self.modules:
            module.inplace = flag
        ids = {id(m) for m, _ in self.modules}
        self.svi._inplace = [(m, f) for m, f in self.svi._inplace if id(m) not in ids]
        self.modules = []


def _check_warm_start(fraction: Any, total_steps: Any) -> None:
    if fraction is None:
        return
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
            not (0.0 < float(fraction) <= 1.0) or math.isnan(float(fraction)):
        raise ValueError(f"SVI: warm_start_fraction must be None or in (0, 1], got {fraction!r}")
    if total_steps is None:
        raise ValueError("SVI: warm_start_fraction needs total_steps (the run's optimizer steps)")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"SVI: total_steps must be an int >= 1, got {total_steps!r}")
