"""Read an offline W&B run (`run-<id>.wandb`) back, for tests.

wandb 0.31 no longer ships a Python reader for its transaction log, but the protobuf definitions are still there
(`wandb.proto.wandb_internal_pb2.Record`). The file is a LevelDB-style log: a 7-byte file header, then 32 KiB
blocks; each chunk has a 7-byte header (crc32 of type+payload, length, type) with type 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST; a block
tail shorter than a header is padding. See /work/shared/notes/wandb-offline.md.

    runs = find_runs(wandb_dir)            # every offline-run-*/run-*.wandb under a WANDB_DIR, oldest first
    run = read_run(runs[0])                # waits for the run's exit record; WandbRun(run_id, project, name, group, tags, config, history, summary)
    run.history                            # [{"_step": 2, "train/loss": 0.5, ...}, ...] in logging order
    run.series("train/loss")               # ([steps], [values])
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7  # <IHB: crc32, length, type
FILE_HEADER_SIZE = 7  # b":W&B" + 2-byte version + 1-byte magic
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_chunks(data: bytes) -> list[bytes]:
    """The payloads of a LevelDB-style log (after the file header), FIRST..LAST chunks joined."""
    out, pending, pos = [], None, FILE_HEADER_SIZE
    while pos + HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < HEADER_SIZE:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER_SIZE])
        payload = data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        pos += HEADER_SIZE + length
        if kind == 0 and length == 0:  # zero-filled preallocated tail
            continue
        if len(payload) < length:
            break  # truncated (a run still being written)
        if zlib.crc32(bytes([kind]) + payload) != crc:  # W&B: plain CRC32 over type byte + payload
            raise ValueError(f"corrupt W&B log: CRC mismatch in chunk at byte {pos - HEADER_SIZE - length}")
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE and pending is not None:
            pending += payload
        elif kind == LAST and pending is not None:
            out.append(pending + payload)
            pending = None
        else:
            raise ValueError(f"corrupt W&B log: chunk type {kind} at byte {pos - HEADER_SIZE - length}")
    return out


def read_records(path) -> list:
    """Every `wandb_internal_pb2.Record` in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B transaction log")
    records = []
    for payload in read_chunks(data):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class WandbRun:
    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list = field(default_factory=list)
    resumed: bool = False
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[list, list]:
        rows = [r for r in self.history if key in r]
        return [r["_step"] for r in rows], [r[key] for r in rows]

    def keys(self) -> set:
        return {k for r in self.history for k in r if not k.startswith("_")}


def read_run(path, timeout: float | None = 60.0) -> WandbRun:
    """Parse a run file, first waiting (up to `timeout` s) for its final `exit` record.

    wandb 0.31's `run.finish()` can return before the Go service has flushed the file (seen: a 7-byte file just
    after finish, complete a moment later), so a test reading right after a run in the same process must wait.
    timeout=None reads what is there now (e.g. a run whose process was killed and never wrote `exit`).
    """
    records = read_records(path) if timeout is None else _wait_for_exit(Path(path), timeout)
    run = WandbRun(path=Path(path))
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.name, run.group = r.run_id, r.project, r.display_name, r.run_group
            run.tags, run.resumed = list(r.tags), r.resume
            for item in r.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
            for item in rec.config.remove:
                run.config.pop(_item_key(item), None)
        elif kind == "history":
            run.history.append({_item_key(item): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
            for item in rec.summary.remove:
                run.summary.pop(_item_key(item), None)
    run.config.pop("_wandb", None)
    return run


def _wait_for_exit(path: Path, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(rec.WhichOneof("record_type") == "exit" for rec in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout:.0f} s ({len(records)} records): the run did "
                               "not finish, or wandb has not flushed it")
        time.sleep(0.2)


def find_runs(wandb_dir) -> list[Path]:
    """The offline run files under a WANDB_DIR (or its `wandb/` folder), oldest first (folder names are timed)."""
    root = Path(wandb_dir)
    return sorted(root.glob("**/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)

