"""A script that goes on after `run()`, as Trainer scripts do: two fine-tuning stages (the second starts from the
first one's exported model, with other settings), then the script's own collectives. Launched by
tests/e2e/test_run_twice.py on one process and with `accelerate launch` on two.

    python two_stages.py MODEL TRAIN_CSV VALIDATION_CSV OUT_DIR

Prints one JSON line per process: both stages' metrics, the precision accelerate reports after the second stage,
and (under several processes) the script's all_reduce of ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState

from scaletune.train import run


def main() -> None:
    model, train_file, validation_file, out = sys.argv[1:5]
    common = {"train_file": train_file, "validation_file": validation_file, "max_steps": 2, "save_steps": 2,
              "per_device_train_batch_size": 8, "do_predict": False, "disable_tqdm": True, "report_to": "none"}
    first = run({**common, "model_name_or_path": model, "output_dir": str(Path(out) / "stage1")})
    # Stage 2 continues from stage 1's export, with its own precision and accumulation: accelerate keeps
    # one state per process, and the second run must get these settings, not the first run's.
    second = run({**common, "model_name_or_path": first.output_dir, "output_dir": str(Path(out) / "stage2"),
                  "bf16": True, "gradient_accumulation_steps": 2, "learning_rate": 1e-4})
    report = {"stage1": first.metrics, "stage2": second.metrics, "stage2_steps": second.global_step,
              "precision_after": AcceleratorState().mixed_precision}
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        ones = torch.ones(1)
        dist.all_reduce(ones)
        report.update(rank=dist.get_rank(), all_reduce=ones.item())
    # A file per rank: the ranks' lines on one shared stdout pipe can interleave.
    (Path(out) / f"report-{report.get('rank', 0)}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
