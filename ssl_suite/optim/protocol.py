"""The one protocol every algorithm follows (``../shared/DESIGN.md``), as three helpers.

Every training loop in ssl_suite (BYOL pretraining, fine-tuning, linear evaluation, the demo and
benchmark scripts) drives an optimizer the same way::

    handle = protocol.attach(optimizer, model)      # hooks the algorithm needs (or none)
    for batch in loader:
        def closure():
            optimizer.zero_grad(set_to_none=True)
            losses = per_sample_loss(model, batch)     # shape [N], reduction='none'
            protocol.backward(optimizer, losses.mean(), accelerator)
            return losses.detach()                     # the per-sample loss vector
        optimizer.step(closure)
    handle.remove()

* :func:`attach` calls ``optimizer.attach(model)`` when the algorithm has one (NSGD's layer
  inputs, MBF's per-sample statistics, SVI's activation records) and returns a handle with
  ``remove()``; for every other optimizer the handle does nothing.
* :func:`backward` calls ``optimizer.backward(loss, accelerator)`` when the algorithm replaces the
  backward pass (SVI), otherwise ``accelerator.backward(loss)`` (or ``loss.backward()``).
* The closure returns the **detached per-sample loss vector** (its mean is the minibatch loss).
  Optimizers that need only a scalar (all of torch's and timm's) pass it through; KOALA uses its
  mean and second moment for the measurement noise R. :func:`as_scalar` turns what ``step``
  returned into a float for logging.

Wrappers (accelerate's ``AcceleratedOptimizer``, our Lookahead) are looked through by
:func:`unwrap`, so ``lookahead_nsgd`` attaches NSGD's hooks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class WrapsOptimizer:
    """Mixin for an optimizer that drives another one (``self.optimizer``): its ``param_groups``
    and ``defaults`` *are* the inner optimizer's, so an LR scheduler on the wrapper moves the inner
    LRs (our Lookahead and SVI)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults


class Handle:
    """Removable collection of hook handles (``torch.utils.hooks.RemovableHandle`` or
    anything with ``remove()``)."""

    def __init__(self, handles: Optional[list[Any]] = None):
        self.handles = list(handles or [])

    def add(self, handle: Any) -> Any:
        self.handles.append(handle)
        return handle

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def unwrap(optimizer: Any) -> Any:
    """The optimizer that implements the algorithm, through accelerate's and our wrappers.

    Goes through ``AcceleratedOptimizer.optimizer`` and any wrapper that sets
    ``wraps_optimizer = True`` (our Lookahead) and has no ``attach``/``backward`` of its own."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        if type(optimizer).__name__ == "AcceleratedOptimizer" or (
                getattr(optimizer, "wraps_optimizer", False)
                and not hasattr(type(optimizer), "attach")
                and not hasattr(type(optimizer), "backward")):
            optimizer = inner
            continue
        return optimizer
    return optimizer


def attach(optimizer: Any, model: torch.nn.Module) -> Handle:
    """Install the hooks ``optimizer`` needs on ``model`` (the raw module, not a DDP wrapper).

    Returns a :class:`Handle`; ``handle.remove()`` detaches them."""
    fn = getattr(unwrap(optimizer), "attach", None)
    if fn is None:
        return Handle()
    handle = fn(model)
    if handle is None:
        return Handle()
    if not hasattr(handle, "remove"):
        raise TypeError(f"{type(unwrap(optimizer)).__name__}.attach must return an object "
                        "with remove()")
    return handle if isinstance(handle, Handle) else Handle([handle])


def backward(optimizer: Any, loss: torch.Tensor, accelerator: Any = None) -> None:
    """Backward of the (scalar) minibatch loss as the algorithm wants it."""
    fn = getattr(unwrap(optimizer), "backward", None)
    if fn is not None:
        fn(loss, accelerator)
    elif accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()


def as_scalar(value: Any) -> Optional[float]:
    """A float for logging from what ``step(closure)``/the closure returned (vector or scalar)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


def sample_losses(value: Any, who: str) -> torch.Tensor:
    """The closure's per-sample loss vector, or a one-line error naming ``who`` needs it."""
    if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{who} needs per-sample losses: the closure must return the 1-D vector "
                         f"of per-sample losses (reduction='none'), got {shape}")
    return value.detach()
