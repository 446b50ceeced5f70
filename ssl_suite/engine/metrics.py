"""``metrics.jsonl``: one JSON object per logged step, appended by the main process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator


class MetricsWriter:
    """Append-only JSON-lines log; ``truncate_after(step)`` drops lines from a killed run."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (used when resuming from a checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a metrics file; a torn last line (killed mid-write) is skipped."""
    with Path(path).open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
