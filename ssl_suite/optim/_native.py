"""Small C kernels for CPU optimizer steps (KOALA, MBF): compiled once with the system C compiler,
cached, loaded with ctypes, checked against torch before use.

An optimizer module gives its C source and a ``make()`` that loads and self-checks the kernels;
:func:`load_once` builds them on first use (thread-safe) and records why not where they cannot be
had (no compiler, a failed build or self-check, or the module's environment switch set to ``0``),
so the optimizer falls back to torch ops and warns once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Callable, Optional, Sequence

#: flags tried in order until one builds (OpenMP and -march=native where the compiler has them)
ATTEMPTS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])


def cache_dir() -> str:
    """``$SSL_SUITE_CACHE``, else ``$XDG_CACHE_HOME/ssl_suite`` or ``~/.cache/ssl_suite``; a
    per-user temporary folder where that cannot be created."""
    root = os.environ.get("SSL_SUITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "ssl_suite")
    try:
        os.makedirs(root, exist_ok=True)
        return root
    except OSError:
        root = os.path.join(tempfile.gettempdir(), f"ssl_suite_{os.getuid()}")
        os.makedirs(root, exist_ok=True)
        return root


def cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def build(name: str, src: str, base: Sequence[str]) -> str:
    """Compile ``src`` to a shared object (or find it compiled) and return its path. The cache key
    covers the source, the compiler, the flags and the CPU; the file appears atomically, so
    processes building at the same time are fine."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    base = list(base)
    key = hashlib.sha256("\0".join([src, cc, repr(base), repr(ATTEMPTS), cpu_id(),
                                    platform.machine()]).encode()).hexdigest()[:20]
    root = cache_dir()
    path = os.path.join(root, f"{name}_kernels_{key}.so")
    if os.path.exists(path):
        return path
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        c_file, so_file = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, f"{name}.so")
        with open(c_file, "w") as f:
            f.write(src)
        for extra in ATTEMPTS:
            res = subprocess.run([cc, *base, *extra, c_file, "-o", so_file, "-lm"],
                                 capture_output=True, text=True, timeout=300)
            if res.returncode == 0:
                fd, staged = tempfile.mkstemp(dir=root, suffix=".so.tmp")
                os.close(fd)
                shutil.copyfile(so_file, staged)
                os.chmod(staged, 0o644)
                os.replace(staged, path)
                return path
            errors.append(res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"])
    raise RuntimeError(f"{cc} failed: {errors[0][0]}")


def load_once(state: dict, lock: threading.Lock, env_var: str,
              make: Callable[[], Any]) -> Optional[Any]:
    """``state["kernels"]``: ``make()``'s kernels, built on the first call; None where they cannot
    be had, with ``state["error"]`` saying why and ``state["warn"]`` set unless ``env_var=0``
    asked for it."""
    if "kernels" not in state:
        with lock:
            if "kernels" not in state:
                kernels = None
                if os.environ.get(env_var, "1") == "0":
                    state["error"] = f"{env_var}=0"                # asked: no warning
                else:
                    try:
                        kernels = make()
                    except Exception as exc:  # noqa: BLE001 - any failure: torch ops
                        kernels = None
                        state["error"], state["warn"] = f"{type(exc).__name__}: {exc}", True
                state["kernels"] = kernels
    return state["kernels"]
