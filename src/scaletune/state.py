"""TrainingState: everything the loop must carry across a restart, besides tensors.

Saved as `trainer_state.json` in every checkpoint (Trainer's file name and field names) by
`checkpoint.write_trainer_state`, the one writer. Model, optimizer, scheduler, grad scaler, sampler and
per-rank RNG states are saved next to it by `accelerator.save_state`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

STATE_FILE = "trainer_state.json"


@dataclass
class TrainingState:
    global_step: int = 0
    """Optimizer updates done."""
    epoch: float = 0.0
    """Fractional epochs done (Trainer's `epoch`)."""
    epochs_completed: int = 0
    """Whole epochs finished; the data position is (epochs_completed, batches_in_epoch)."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (per rank); resume skips exactly these."""
    best_metric: Optional[float] = None
    best_global_step: Optional[int] = None
    """Step of the best evaluation (recorded even when nothing is saved, §27)."""
    best_checkpoint_step: Optional[int] = None
    """Step of the checkpoint that holds the best model, if it was saved. Stored as a step, not a path, so a
    moved or copied output dir still finds it."""
    patience_counter: int = 0
    """Early-stopping counter (Trainer drops it on resume; we keep it, §13)."""
    should_stop: bool = False
    """Early stopping decided; a resumed run must not train on."""
    skipped_updates: int = 0
    """Updates dropped because the loss or gradient norm was not finite (on_nonfinite=skip)."""
    num_input_tokens_seen: int = 0
    """Non-padding input tokens trained on, all processes (counted with include_num_input_tokens_seen)."""
    world_size: int = 1
    """Processes that wrote this state: `batches_in_epoch` is per rank, so a resume on another count converts it."""
    log_history: list = field(default_factory=list)
    tracker_run_id: Optional[str] = None
    """W&B run id, so a requeued job continues the same run."""

    def state_dict(self) -> dict:
        out = dataclasses.asdict(self)
        # Trainer's field, relative to the output dir (Trainer writes an absolute path, which breaks on a move).
        out["best_model_checkpoint"] = checkpoint_name(self.best_checkpoint_step)
        return out

    def load_state_dict(self, d: dict) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for k, v in d.items():
            if k in known:
                setattr(self, k, v)
        if "best_checkpoint_step" not in d:  # written by v0.1: an absolute best_model_checkpoint path
            self.best_checkpoint_step = checkpoint_step(d.get("best_model_checkpoint"))

    @classmethod
    def load(cls, folder: str | Path) -> "TrainingState":
        state = cls()
        state.load_state_dict(json.loads(Path(folder, STATE_FILE).read_text()))
        return state


def checkpoint_name(step: Optional[int]) -> Optional[str]:
    return None if step is None else f"checkpoint-{step}"


def checkpoint_step(name: Optional[str]) -> Optional[int]:
    """`.../checkpoint-12` -> 12; anything else -> None."""
    match = re.search(r"checkpoint-(\d+)/?$", name or "")
    return int(match.group(1)) if match else None
