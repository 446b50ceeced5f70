"""Checkpoints that survive kills and never need unpickling.

Layout of one checkpoint (a directory under ``RUN_DIR/checkpoints``)::

    step_00001200/
        online.safetensors     online network state (parameters and buffers)
        target.safetensors     target network state
        state.pt               optimizer, scheduler, counters, scaler (torch.load weights_only)
        rng_rank0.pt ...       per-process RNG states (torch.load weights_only)

A checkpoint is written to ``step_XXXXXXXX.tmp`` and renamed when complete, so a kill while
writing leaves the previous checkpoint as the latest valid one. Older checkpoints beyond
``keep`` are deleted only after the new one is in place.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and Python RNG states as weights_only-loadable objects."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def begin_save(run_dir: str | Path, step: int, create: bool = True) -> Path:
    """The temporary directory of the checkpoint for ``step``, created empty if ``create``."""
    tmp = checkpoint_dir(run_dir) / f"step_{step:08d}.tmp"
    if create:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def save_main(tmp: Path, online: dict, target: dict, state: dict) -> None:
    """Files written by the main process: model states (safetensors) and training state."""
    save_file(_tensors(online), str(tmp / "online.safetensors"))
    save_file(_tensors(target), str(tmp / "target.safetensors"))
    torch.save(state, tmp / "state.pt")


def save_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


def finish_save(tmp: Path, keep: int) -> Path:
    """Atomically publish ``tmp`` as a checkpoint and prune old ones (main process)."""
    final = tmp.with_name(tmp.name[:-len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_pt(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unreadable file
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable "
                              f"({type(e).__name__}); nothing was changed") from None


def _load_st(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable "
                              f"({type(e).__name__}); nothing was changed") from None


def load_checkpoint(path: str | Path, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint directory: ``online``, ``target``, ``state`` and ``rng`` (or None)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--resume: no checkpoint directory at {path}")
    rng_file = path / f"rng_rank{rank}.pt"
    return {
        "online": _load_st(path / "online.safetensors"),
        "target": _load_st(path / "target.safetensors"),
        "state": _load_pt(path / "state.pt"),
        "rng": _load_pt(rng_file) if rng_file.is_file() else None,
    }


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error on a mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {what} does not match the model: {first}") from None
