"""When an optimizer's per-tensor loop runs under ``torch.compile`` (shared by LARS and
Generic Adam): on CPU from ``COMPILE_MIN_NUMEL`` parameters, anywhere when asked, never when
``compile=False`` or while already compiling."""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch

COMPILE_MIN_NUMEL = 1 << 22  # 4M: below this the compiled step saves less than its compile costs


def wants_compile(flag: Optional[bool], params: Iterable[torch.Tensor]) -> bool:
    """``flag`` is the optimizer's ``compile`` setting (None: decide by device and size)."""
    if flag is False or not hasattr(torch, "compile") or torch.compiler.is_compiling():
        return False
    if flag:
        return True
    params = list(params)
    return (all(p.device.type == "cpu" for p in params)
            and sum(p.numel() for p in params) >= COMPILE_MIN_NUMEL)


class CompiledLoop:
    """A per-tensor update loop compiled once per process (``fullgraph``), on first use.

    Calling it runs the compiled loop and returns True; if compiling fails (e.g. no C++
    compiler) it warns once, naming ``owner``, and returns False so the caller stays eager.
    Compilation errors happen before any tensor is written.
    """

    def __init__(self, loop, owner: str):
        self.loop, self.owner, self.compiled = loop, owner, None

    def __call__(self, work) -> bool:
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.loop, fullgraph=True)
            self.compiled(work)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means: use the eager kernels
            warnings.warn(f"{self.owner}: torch.compile failed ({type(exc).__name__}: {exc}); "
                          "using eager kernels", RuntimeWarning, stacklevel=4)
            return False
