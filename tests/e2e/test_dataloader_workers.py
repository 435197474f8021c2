"""Real runs with DataLoader workers (issue 21, item 4): a run with workers is the run without them, step for step
and bit for bit (same order, same masks, same dropout stream), and it resumes exactly mid-epoch and at an epoch
start. MLM masks, re-drawn each epoch, reach the workers too.

The auto rule and the loader's own order are in tests/unit/test_dataloader_worker_rule.py.
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from scaletune.train import run
from support.faults import max_weight_diff
from support.golden import MLM_TEXT
from support.tiny import make_tiny_bert

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

QUIET = {"do_predict": False, "disable_tqdm": True, "report_to": "none", "logging_steps": 1, "learning_rate": 1e-3}


def train_logs(result) -> dict:
    return {e["step"]: (e["loss"], e["grad_norm"]) for e in result.log_history if "loss" in e}


def resolved_workers(out) -> int:
    return yaml.safe_load((out / "config.yaml").read_text())["resolved"]["dataloader_num_workers"]


def resume_from(source, step: int, cfg: dict, out):
    """A run interrupted after `step` updates: the uninterrupted run's own checkpoint, in a fresh output dir."""
    shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return run({**cfg, "output_dir": str(out), "resume_from_checkpoint": "latest"})


@pytest.fixture(scope="module")
def classification(tiny_bert, sentiment_files, tmp_path_factory):
    """Dropout on; 12 batches of 8 per epoch, 2 per update: step 6 ends epoch 0; evaluation every 3 steps (its
    loader starts workers too, and its iterator start draws from the same global RNG)."""
    root = tmp_path_factory.mktemp("workers_cls")
    cfg = {**QUIET, "model_name_or_path": tiny_bert, **sentiment_files, "per_device_train_batch_size": 8,
           "gradient_accumulation_steps": 2, "per_device_eval_batch_size": 16, "max_steps": 9,
           "eval_strategy": "steps", "eval_steps": 3, "save_steps": 3}
    plain = run({**cfg, "output_dir": str(root / "auto")})  # unset on CPU: loads in the process
    workers = run({**cfg, "dataloader_num_workers": 2, "output_dir": str(root / "workers")})
    return {"root": root, "cfg": cfg, "plain": plain, "workers": workers}


def test_a_run_with_workers_equals_the_run_without(classification):
    root, plain, workers = classification["root"], classification["plain"], classification["workers"]
    assert (resolved_workers(root / "auto"), resolved_workers(root / "workers")) == (0, 2)
    assert sorted(train_logs(workers)) == list(range(1, 10))
    assert train_logs(workers) == train_logs(plain)  # exactly: same batches, same dropout masks
    assert workers.metrics["eval_loss"] == plain.metrics["eval_loss"]
    assert max_weight_diff(root / "auto", root / "workers") == 0.0


@pytest.mark.parametrize("step, saved_by", [(3, "auto"), (6, "workers")], ids=["mid_epoch", "epoch_start"])
def test_a_run_with_workers_resumes_exactly(classification, step, saved_by, tmp_path):
    """Resumed with 2 workers from a checkpoint saved with 2 (and, mid-epoch, with 0: the number may change)."""
    root, cfg = classification["root"], {**classification["cfg"], "dataloader_num_workers": 2}
    resumed = resume_from(root / saved_by, step, cfg, tmp_path / "resumed")
    full = train_logs(classification["workers"])
    after = {s: v for s, v in train_logs(resumed).items() if s > step}
    assert sorted(after) == list(range(step + 1, 10))
    assert after == {s: full[s] for s in after}
    assert resumed.metrics["eval_loss"] == classification["workers"].metrics["eval_loss"]
    assert max_weight_diff(root / "workers", tmp_path / "resumed") == 0.0


def test_mlm_masks_follow_the_epoch_in_workers_and_resume_exactly(tmp_path):
    """34 lines in batches of 4, 2 per update (the 5th update takes the last one): epoch 1 starts at step 6, with
    masks re-drawn by `set_epoch` in this process; workers started at each epoch collate with them (persistent
    ones would keep epoch 0's). Checkpoint 6 is mid-epoch 1."""
    model = make_tiny_bert(tmp_path / "tiny_mlm", mlm=True)  # dropout on
    cfg = {**QUIET, "task": "mlm", "model_name_or_path": str(model), "train_file": str(MLM_TEXT),
           "line_by_line": True, "max_seq_length": 64, "validation_split_percentage": 0, "eval_strategy": "no",
           "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 7, "save_steps": 6}
    plain = run({**cfg, "dataloader_num_workers": 0, "output_dir": str(tmp_path / "plain")})
    workers = run({**cfg, "dataloader_num_workers": 2, "output_dir": str(tmp_path / "workers")})
    assert train_logs(workers) == train_logs(plain)
    resumed = resume_from(tmp_path / "workers", 6, {**cfg, "dataloader_num_workers": 2}, tmp_path / "resumed")
    assert train_logs(resumed)[7] == train_logs(workers)[7]
    assert max_weight_diff(tmp_path / "workers", tmp_path / "resumed") == 0.0
