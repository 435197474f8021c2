"""TrainingState: everything the loop must carry across a restart, besides tensors.

Saved as `trainer_state.json` in every checkpoint (Trainer's file name and field
names), written last so its presence marks a complete checkpoint. Model,
optimizer, scheduler, grad scaler, sampler and per-rank RNG states are saved
next to it by `accelerator.save_state`.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
    max_steps: int = 0
    best_metric: Optional[float] = None
    best_global_step: Optional[int] = None
    best_model_checkpoint: Optional[str] = None
    patience_counter: int = 0
    """Early-stopping counter (Trainer drops it on resume; we keep it)."""
    should_stop: bool = False
    """Early stopping decided; a resumed run must not train on."""
    log_history: list = field(default_factory=list)
    tracker_run_id: Optional[str] = None
    """W&B run id, so a requeued job continues the same run."""
    total_flos: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for k, v in d.items():
            if k in known:
                setattr(self, k, v)

    def save(self, folder: str | Path) -> None:
        # Atomic: a reader (resume, `latest`) sees the old file or the new one, never half of one.
        tmp = Path(folder, STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state_dict(), indent=2))
        os.replace(tmp, Path(folder, STATE_FILE))

    @classmethod
    def load(cls, folder: str | Path) -> "TrainingState":
        state = cls()
        state.load_state_dict(json.loads(Path(folder, STATE_FILE).read_text()))
        return state
