"""When an optimizer's per-tensor loop runs under ``torch.compile`` (shared by LARS and
Generic Adam): on CPU from ``COMPILE_MIN_NUMEL`` parameters, anywhere when asked, never when
``compile=False`` or while already compiling."""

from __future__ import annotations

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
