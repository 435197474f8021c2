"""The two pinned golden-loss jobs, shared by tests/unit/test_golden_loss.py and tests/golden/regenerate.py so
that the numbers are always produced and checked by the same code.

Both jobs accumulate 2 micro-batches per update and end every epoch with a short window (one micro-batch,
and a short one): the case where normalising the loss per micro-batch instead of per whole window gives
different numbers. The masked-LM job adds uneven masked-token counts per micro-batch on top.
"""

from __future__ import annotations

import json
from pathlib import Path

from support.tiny import make_tiny_bert, write_sentiment_csv

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
GOLDEN_FILE = GOLDEN_DIR / "losses.json"
MLM_TEXT = GOLDEN_DIR / "mlm_train.txt"
LOGGED = ("loss", "grad_norm")

COMMON = {
    "gradient_accumulation_steps": 2, "logging_steps": 1, "max_steps": 6, "seed": 1234,
    "learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 1,
    "do_eval": False, "do_predict": False, "eval_strategy": "no", "save_strategy": "no",
    "validation_split_percentage": 0, "report_to": "none", "disable_tqdm": True,
}

# 36 rows in micro-batches of 8: 8+8 | 8+8 | 4 -- three updates per epoch, the third a single half batch.
CLASSIFICATION_ROWS, CLASSIFICATION_BATCH = 36, 8
# 34 lines in micro-batches of 4: four full windows, then one micro-batch of 2 lines.
MLM_BATCH = 4


def classification_config(workdir: Path) -> dict:
    model = make_tiny_bert(workdir / "tiny_bert", seed=0, dropout=0.0)
    train = write_sentiment_csv(workdir / "train.csv", CLASSIFICATION_ROWS, seed=7)
    return {**COMMON, "model_name_or_path": str(model), "train_file": str(train),
            "per_device_train_batch_size": CLASSIFICATION_BATCH, "output_dir": str(workdir / "out")}


def mlm_config(workdir: Path) -> dict:
    model = make_tiny_bert(workdir / "tiny_bert_mlm", seed=0, mlm=True, dropout=0.0)
    return {**COMMON, "task": "mlm", "model_name_or_path": str(model), "train_file": str(MLM_TEXT),
            "line_by_line": True, "max_seq_length": 64, "per_device_train_batch_size": MLM_BATCH,
            "output_dir": str(workdir / "out")}


JOBS = {"classification": classification_config, "mlm": mlm_config}


def run_job(name: str, workdir: Path) -> list[dict]:
    """[{step, loss, grad_norm}, ...] of every logged update of one job, trained in this process."""
    from scaletune.train import run

    workdir.mkdir(parents=True, exist_ok=True)
    result = run(JOBS[name](workdir))
    return [{"step": e["step"], **{k: e[k] for k in LOGGED}} for e in result.log_history if "loss" in e]


def read_golden() -> dict:
    return json.loads(GOLDEN_FILE.read_text())["jobs"]
