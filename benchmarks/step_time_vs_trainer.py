"""Training step time: scaletune vs transformers.Trainer on the same job, measured in the same run.

    python benchmarks/step_time_vs_trainer.py [--steps 40] [--batch 16] [--seq 64] [--repeats 2]

Same model (the packaged pretrained MiniLM), same data (packaged Rotten Tomatoes), same batch size,
sequence length, optimizer, schedule and precision (fp32 here; the device decides). Each side runs in its
own process, alternating, `--repeats` times; the first `--warmup` steps are excluded. Evaluation, saving
and start-up are off on both sides. Both sides are timed the same way: torch's global optimizer-step hook
records the wall clock after every `optimizer.step()`, and a step's time is the gap between two of them
(data loading, forward, backward, clipping, update and the loop's own bookkeeping all included).

Prints the median step time of each side and their ratio (scaletune / Trainer: < 1 means faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def common(args, out):
    return dict(model_name_or_path="packaged:minilm", dataset_name="packaged:rotten_tomatoes",
                max_seq_length=args.seq, max_train_samples=args.steps * args.batch, output_dir=out,
                per_device_train_batch_size=args.batch, learning_rate=5e-5, max_steps=args.steps,
                save_strategy="no", eval_strategy="no", do_eval=False, do_predict=False, logging_steps=1,
                disable_tqdm=True, report_to="none", seed=0)


def step_clock() -> list[float]:
    """Wall-clock time after every optimizer step of any optimizer in this process."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    return stamps


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_scaletune(args) -> list[float]:
    from scaletune.train import run

    stamps = step_clock()
    with tempfile.TemporaryDirectory() as out:
        run({**common(args, out), "logging_steps": 10})  # Trainer's default cadence is coarser still
    return gaps(stamps)


def run_trainer(args) -> list[float]:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    from scaletune.assets import model_path
    from scaletune.config import load_config
    from scaletune.data import load_raw_datasets
    from scaletune.tasks import get_task

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(common(args, out))
        task = get_task("classification")
        tok = AutoTokenizer.from_pretrained(model_path("packaged:minilm"))
        prepared = task.prepare_data(load_raw_datasets(cfg), tok, cfg, _nullcontext)
        model = AutoModelForSequenceClassification.from_pretrained(model_path("packaged:minilm"), num_labels=2)
        stamps = step_clock()
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                  learning_rate=5e-5, save_strategy="no", eval_strategy="no", logging_steps=10,
                                  report_to="none", disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available())
        Trainer(model=model, args=targs, train_dataset=prepared.train,
                data_collator=DataCollatorWithPadding(tok)).train()
    return gaps(stamps)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--side", choices=["scaletune", "trainer"])
    args = p.parse_args()
    if args.side:  # child process: one side, step times as JSON on the last line
        times = run_scaletune(args) if args.side == "scaletune" else run_trainer(args)
        print(json.dumps(times))
        return
    results: dict[str, list[float]] = {"scaletune": [], "trainer": []}
    for _ in range(args.repeats):
        for side in ("trainer", "scaletune"):
            cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[side] += json.loads(proc.stdout.strip().splitlines()[-1])[args.warmup:]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"device: {device}; MiniLM-L6, batch {args.batch}, seq <= {args.seq}, {args.steps} steps x {args.repeats}")
    for side, m in med.items():
        print(f"  {side:10s} median step time {m * 1000:8.1f} ms  ({len(results[side])} steps)")
    print(f"  ratio scaletune/trainer: {med['scaletune'] / med['trainer']:.3f}")


if __name__ == "__main__":
    main()
