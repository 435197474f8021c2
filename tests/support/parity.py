"""The Trainer side of the parity suite (test_parity_*.py): what a `transformers.Trainer` user writes for the
same job, and the outcome fields both sides are compared on.

The Trainer runs here are plain user code on purpose -- `load_dataset` + tokenizer + `Trainer` with
`TrainingArguments`, `EarlyStoppingCallback`, `compute_metrics` -- so the comparison is against what users
migrate from, not against a Trainer configured to look like scaletune. The one shared piece is the data
files (and, for masked-LM, scaletune's content-seeded masking collator, so both sides see the same masks).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Callable, Optional

from safetensors.torch import load_file


def write_rows(path: Path, rows: list[tuple[str, int]]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


def uneven_lines(n: int = 24, seed: int = 5) -> list[str]:
    """Mostly 2-4 word lines with a 40-word line every 8th: masked-token counts per batch differ a lot."""
    from support.tiny import WORDS_FILL, WORDS_NEG, WORDS_POS

    rng = random.Random(seed)
    words = WORDS_POS + WORDS_NEG + WORDS_FILL
    return [" ".join(rng.choices(words, k=40 if i % 8 == 3 else rng.randint(2, 4))) for i in range(n)]


def prepared_mlm(job: dict):
    """scaletune's tokenized masked-LM splits and masking collators for a run config (for the Trainer side)."""
    import contextlib

    from transformers import AutoTokenizer

    from scaletune import data as st_data
    from scaletune.config import load_config
    from scaletune.tasks import get_task

    cfg = load_config(job)
    tok = AutoTokenizer.from_pretrained(job["model_name_or_path"])
    task = get_task("mlm")
    prepared = task.prepare_data(st_data.load_raw_datasets(cfg), tok, cfg, contextlib.nullcontext)
    return prepared, tok, task.collator(tok, cfg, True), task.collator(tok, cfg, False)


def tokenized_classification(model_dir: str, files: dict, max_length: int = 128):
    """The tokenized `DatasetDict` a Trainer user builds (labels as ids, sorted label names as scaletune)."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = datasets.load_dataset("csv", data_files=files)
    names = sorted({str(v) for v in raw["train"]["label"]}) if "train" in raw else None
    to_id = {n: i for i, n in enumerate(names)} if names else None

    def encode(batch):
        out = tok(batch["text"], truncation=True, max_length=max_length)
        out["labels"] = [to_id[str(v)] if to_id else int(v) for v in batch["label"]]
        return out

    return raw.map(encode, batched=True, remove_columns=raw[next(iter(raw))].column_names), tok


def trainer_args(output_dir, **kwargs):
    """TrainingArguments on CPU without trackers or progress bars; everything else as the caller says."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True,
                             **kwargs)


def make_trainer(model_dir: str, output_dir, datasets_, tokenizer, collator=None,
                 compute_metrics: Optional[Callable] = None, early_stopping: Optional[dict] = None, **kwargs):
    """`Trainer(...)` for a classification or masked-LM model folder, as user code would build it.

    `early_stopping`: EarlyStoppingCallback's arguments ({patience, threshold}), or None.
    """
    import transformers
    from transformers import (AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                              DataCollatorWithPadding, EarlyStoppingCallback, Trainer)

    transformers.logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(model_dir)
    is_mlm = any(a.endswith("ForMaskedLM") for a in (config.architectures or []))
    model = (AutoModelForMaskedLM if is_mlm else AutoModelForSequenceClassification).from_pretrained(model_dir)
    callbacks = []
    if early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping["patience"], early_stopping.get("threshold", 0.0)))
    return Trainer(model=model, args=trainer_args(output_dir, **kwargs), train_dataset=datasets_.get("train"),
                   eval_dataset=datasets_.get("validation"),
                   data_collator=collator or DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                   compute_metrics=compute_metrics, callbacks=callbacks)


def scripted_metric(values: list[float], name: str = "score"):
    """A compute_metrics returning the next scripted value at each evaluation, and the list of calls so far.

    Both sides get their own copy; the sequence is keyed by the evaluation count, so the metric a step sees
    depends only on how many evaluations happened before it -- which is what the decisions are about.
    """
    calls: list[float] = []

    def next_value() -> dict:
        v = float(values[min(len(calls), len(values) - 1)])
        calls.append(v)
        return {name: v}

    return next_value, calls


def checkpoints_on_disk(output_dir) -> list[int]:
    """Steps of the checkpoint folders left in output_dir, ascending."""
    return sorted(int(p.name.split("-")[1]) for p in Path(output_dir).glob("checkpoint-*")
                  if p.is_dir() and p.name.split("-")[1].isdigit())


def step_of(checkpoint: Optional[str]) -> Optional[int]:
    return int(Path(checkpoint).name.split("-")[1]) if checkpoint else None


def weights(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest elementwise difference between two state dicts over their shared tensors (tied weights can be
    stored under one name on one side only)."""
    keys = a.keys() & b.keys()
    assert keys, "the two state dicts share no tensor names"
    return max((a[k].float() - b[k].float().to(a[k].device)).abs().max().item() for k in keys)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)
