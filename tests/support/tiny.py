"""Tiny real BERT models (random init from a config, real MiniLM tokenizer), a toy sentiment dataset, and
subprocess helpers for `accelerate launch` runs.

Tests that are about fine-tuning use the real pretrained MiniLM (`packaged:minilm`); tests about the
mechanics (cadence, resume, accumulation, distribution) use a tiny BERT so they run in seconds on 2 cores.
"""

from __future__ import annotations

import csv
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_tiny_bert(path: Path, num_labels: int = 2, seed: int = 0, mlm: bool = False, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer, saved as a local pretrained folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

    from scaletune.assets import model_path

    tok = AutoTokenizer.from_pretrained(model_path("packaged:minilm"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    model = (BertForMaskedLM if mlm else BertForSequenceClassification)(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


WORDS_POS = "good great fine superb lovely wonderful brilliant moving".split()
WORDS_NEG = "bad awful dull boring poor terrible weak tedious".split()
WORDS_FILL = "the a movie film plot actor scene story was is very quite".split()


def write_sentiment_csv(path: Path, n: int, seed: int = 0, label_names=("neg", "pos")) -> Path:
    """A learnable toy sentiment task: the label is which word list dominates."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(n):
            y = rng.randint(0, 1)
            words = rng.choices(WORDS_POS if y else WORDS_NEG, k=3) + rng.choices(WORDS_FILL, k=rng.randint(2, 12))
            rng.shuffle(words)
            w.writerow([i, " ".join(words), label_names[y]])
    return path


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600, check: bool = True, cwd=None):
    """Run a command (e.g. accelerate launch) with the test environment; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(args)}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def accelerate_launch(num_processes: int, args: list[str], config_file: str | None = None,
                      script: str | None = None, **kw):
    """`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m scaletune.train ...` (gloo DDP);
    with `script`, that Python file instead of `-m scaletune.train`. A scaletune.train run draws no curves.png
    unless its arguments say `--plot_curves` (as the in-process runs: tests/conftest.py)."""
    if not script:
        args = without_curves(args)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    elif num_processes > 1:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            *([script] if script else ["-m", "scaletune.train"]), *args]
    env = {"ACCELERATE_USE_CPU": "true", **kw.pop("env", {})}
    return run_cli(cmd, env=env, **kw)


def without_curves(args: list[str]) -> list[str]:
    """A scaletune.train command line with `--plot_curves false` unless it sets plot_curves itself."""
    return args if any(str(a).startswith("--plot_curves") for a in args) else [*args, "--plot_curves", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_classifier(model, tokenizer, validation_file: str) -> dict:
    """eval_loss and eval_accuracy of a sequence classifier over a CSV (text, label), computed by hand in one
    process: what a run's distributed evaluation of the same model must report."""
    import pandas as pd
    import torch
    import torch.nn.functional as F

    df = pd.read_csv(validation_file)
    enc = tokenizer(list(df["text"]), padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = torch.tensor([model.config.label2id[str(y)] for y in df["label"]])
    with torch.no_grad():
        logits = model.eval()(**enc).logits.float()
    return {"eval_loss": F.cross_entropy(logits, labels).item(),
            "eval_accuracy": (logits.argmax(-1) == labels).float().mean().item()}
