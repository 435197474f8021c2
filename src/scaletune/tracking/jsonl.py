"""output_dir/metrics.jsonl: one JSON record per log or eval event, the run's complete metric history.

It is the sink that never gets dropped: W&B and TensorBoard may fail mid-run, this file is still whole, and the
curves PNG is drawn from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def to_python(value: Any) -> Any:
    """Numbers from torch/numpy -> Python scalars (JSON, W&B and TensorBoard all accept those)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()  # a 0-d tensor on a GPU makes this a host-device sync; the loop passes floats
        except (ValueError, RuntimeError):
            return value
    return value


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_jsonl_until(path: Path, step: int) -> None:
    """Drop the records after `step` (atomically): a resumed attempt logs those steps again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
