"""Time per optimizer update: a bare Accelerate loop (the floor), transformers.Trainer, and scaletune.

    python benchmarks/step_time_vs_trainer.py [--steps 40] [--batch 16] [--seq 128] [--repeats 3] [--bf16]
    python benchmarks/step_time_vs_trainer.py --lockstep --steps 30 --repeats 6   # turns, update by update
    python benchmarks/step_time_vs_trainer.py --tiny          # seconds: a 2-layer BERT, CI's smoke run

Same model (the packaged pretrained MiniLM-L6), same data (packaged Rotten Tomatoes, tokenized once by
scaletune's classification task), same batches (accelerate's seeded sampler, same seed: checked below from
each side's collated token counts), same optimizer (fused AdamW, Trainer's parameter groups), schedule,
clipping (1.0) and precision. Evaluation, saving and start-up are off or untimed on every side.

* bare: `model(**batch).loss`, `accelerator.backward`, `clip_grad_norm_`, `optimizer.step`, `scheduler.step`,
  `zero_grad` -- what any loop must do; nothing else;
* trainer: `transformers.Trainer(...).train()`;
* scaletune: `scaletune.train.run(...)`.

Each side runs in its own process, alternating (bare, trainer, scaletune, bare, ...) `--repeats` times, timed
by the one clock of benchmarks/common.py; the first `--warmup` updates of each process are dropped. Prints
median ms/update, samples/s and (non-padding) tokens/s per side and the two ratios scaletune/Trainer and
scaletune/bare (< 1: scaletune is faster).

`--lockstep` starts the three sides of a repeat at once and lets them take turns, one update each, so only one
computes at a time and update k of every side (the same batch) runs seconds apart: this machine's drift
(a process's 10-update median moves between 485 and 615 ms within a minute) then hits all sides alike. It
also prints the per-update ratios. The scaletune side starts as `python -m scaletune.train` does (its process
settings before torch is imported); the others as their users would write them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (alternate, collated_tokens, conditions, cpu_gaps, gaps, lockstep, median, other_load,
                    paired_ratios, set_threads, step_clock, tiny_bert)

SIDES = ("bare", "trainer", "scaletune")


def job(args, out: str) -> dict:
    return dict(model_name_or_path=args.model, dataset_name="packaged:rotten_tomatoes", max_seq_length=args.seq,
                max_train_samples=args.steps * args.batch, output_dir=out, per_device_train_batch_size=args.batch,
                learning_rate=5e-5, max_steps=args.steps, save_strategy="no", eval_strategy="no", do_eval=False,
                do_predict=False, logging_steps=10, disable_tqdm=True, report_to="none", seed=0, bf16=args.bf16,
                validation_split_percentage=0, max_eval_samples=8, max_predict_samples=8)


def prepared_data(args, out: str):
    """The tokenized training split, exactly as the scaletune side gets it."""
    from transformers import AutoTokenizer

    from scaletune.assets import model_path
    from scaletune.config import load_config
    from scaletune.data import load_raw_datasets
    from scaletune.tasks import get_task

    cfg = load_config(job(args, out))
    tok = AutoTokenizer.from_pretrained(model_path(args.model))
    prepared = get_task("classification").prepare_data(load_raw_datasets(cfg), tok, cfg, contextlib.nullcontext)
    return cfg, tok, prepared


def run_scaletune(args, out: str) -> list:
    from scaletune.train import run

    with step_clock() as stamps:
        run(job(args, out))
    return stamps


def run_trainer(args, out: str) -> list:
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from scaletune.assets import model_path

    _, tok, prepared = prepared_data(args, out)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path(args.model), num_labels=2)
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                              learning_rate=5e-5, save_strategy="no", eval_strategy="no", logging_steps=10,
                              report_to="none", disable_tqdm=True, seed=0, bf16=args.bf16,
                              use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=targs, train_dataset=prepared.train, data_collator=DataCollatorWithPadding(tok))
    with step_clock() as stamps:
        trainer.train()
    return stamps


def run_bare(args, out: str) -> list:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, get_scheduler

    from scaletune.assets import model_path
    from scaletune.optim import build_optimizer

    cfg, tok, prepared = prepared_data(args, out)
    acc = Accelerator(mixed_precision="bf16" if args.bf16 else None,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path(args.model), num_labels=2)
    optimizer = build_optimizer(model, cfg.training)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    loader = DataLoader(prepared.train, batch_size=args.batch, shuffle=True, collate_fn=DataCollatorWithPadding(tok))
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    model.train()
    with step_clock() as stamps:
        done = 0
        while done < args.steps:
            for batch in loader:
                loss = model(**batch).loss
                acc.backward(loss)
                acc.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
                if done == args.steps:
                    break
    return stamps


def one_side(args, name: str) -> dict:
    if name == "scaletune":
        # What `python -m scaletune.train` does before torch is imported (huge pages for large CPU tensors);
        # the other sides run as their users would write them.
        from scaletune.train import cpu_allocator_defaults

        cpu_allocator_defaults()
    from transformers import DataCollatorWithPadding

    set_threads(args.threads)
    with collated_tokens(DataCollatorWithPadding) as batches, tempfile.TemporaryDirectory() as out:
        stamps = {"bare": run_bare, "trainer": run_trainer, "scaletune": run_scaletune}[name](args, out)
    # Loops fetch one batch ahead (accelerate) or not: the first `steps` batches are the ones trained on.
    return {"times": gaps(stamps), "cpu": cpu_gaps(stamps), "batches": batches[:args.steps]}


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: one per core)")
    p.add_argument("--model", default="packaged:minilm")
    p.add_argument("--tiny", action="store_true", help="a 2-layer BERT, 6 steps, in one process: a smoke run")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="shared machine: wait for it to be idle before each side, rerun sides disturbed by others")
    p.add_argument("--lockstep", action="store_true",
                   help="run the sides at once, taking turns update by update (see common.lockstep), "
                        "`--repeats` times; the per-update ratios then compare the same batch seconds apart")
    p.add_argument("--side", choices=SIDES)
    args = p.parse_args()
    if args.side:
        print(json.dumps(one_side(args, args.side)))
        return
    if args.tiny:
        args.model = tiny_bert(Path(tempfile.gettempdir()) / "scaletune_bench_tiny_bert")
        args.steps, args.batch, args.seq, args.warmup, args.repeats = 6, 8, 64, 1, 1
    load_before = other_load()
    side_args = (["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                  "--model", args.model, "--threads", str(args.threads)] + (["--bf16"] if args.bf16 else []))
    if args.lockstep:
        results = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side, result in lockstep(__file__, list(SIDES), side_args, args.steps).items():
                results[side].append(result)
    else:
        results = alternate(__file__, list(SIDES), args.repeats, side_args,
                            in_process=(lambda name: one_side(args, name)) if args.tiny else None,
                            wait_quiet=args.wait_quiet)
    same = all(r["batches"] == results["bare"][0]["batches"] for runs in results.values() for r in runs)
    print(conditions(load_before, results))
    print(f"job: {args.model}, Rotten Tomatoes, batch {args.batch}, seq <= {args.seq}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.steps} updates x {args.repeats} repeats per side, "
          f"first {args.warmup} of each process dropped; same batches on every side: {same}")
    med, cpu = {}, {}
    for side, runs in results.items():
        times, cpus, samples, tokens = [], [], [], []
        for r in runs:
            for t, c, rows in zip(r["times"][args.warmup:], r["cpu"][args.warmup:], r["batches"][args.warmup + 1:]):
                times.append(t)  # gap i ends with update i+1, which trained on batch i+1
                cpus.append(c)
                samples.append(len(rows) / t)
                tokens.append(sum(rows) / t)
        med[side], cpu[side] = median(times), median(cpus)
        per_repeat = ", ".join(f"{median(r['times'][args.warmup:]) * 1000:.1f}" for r in runs)
        print(f"  {side:10s} {med[side] * 1000:8.1f} ms/update  {median(samples):8.1f} samples/s  "
              f"{median(tokens):9.0f} tokens/s  {cpu[side] * 1000:8.1f} CPU-ms/update  ({len(times)} updates; "
              f"per-repeat medians {per_repeat} ms)")
    print(f"ratio scaletune/trainer: {med['scaletune'] / med['trainer']:.3f}")
    print(f"ratio scaletune/bare: {med['scaletune'] / med['bare']:.3f}")
    def side_median(r):
        return median(r["times"][args.warmup:])

    for other in ("trainer", "bare"):
        pairs = paired_ratios(results, "scaletune", other, side_median)
        print(f"per-repeat ratios scaletune/{other}: {', '.join(f'{x:.3f}' for x in pairs)} "
              f"(median {median(pairs):.3f})")
    if args.lockstep:
        for other in ("trainer", "bare"):
            per_update = [a / b for x, y in zip(results["scaletune"], results[other])
                          for a, b in zip(x["times"][args.warmup:], y["times"][args.warmup:])]
            print(f"per-update ratios scaletune/{other} (the same batch, seconds apart): median "
                  f"{median(per_update):.3f}, quartiles {quartiles(per_update)}")
    print(f"CPU-time ratios (robust to other load): scaletune/trainer {cpu['scaletune'] / cpu['trainer']:.3f}, "
          f"scaletune/bare {cpu['scaletune'] / cpu['bare']:.3f}")


if __name__ == "__main__":
    main()
