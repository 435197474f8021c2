"""Length-grouped batches vs random order: training throughput and the accuracy reached after the same updates.

    python benchmarks/group_by_length.py [--steps 100] [--batch 8] [--seq 512] [--repeats 1]
    python benchmarks/group_by_length.py --tiny          # seconds: a 2-layer BERT, CI's smoke run

BBC News articles (packaged, 5 topics) are long and uneven: at max_seq_length 512 a third of them are cut at
512 and the rest spread down to ~100 tokens, so a random batch of 8 is padded to its longest article. The same
scaletune job (pretrained MiniLM, batch 8, lr 1e-4, warmup 10%) runs with `train_sampling_strategy: random`
and `group_by_length`, each in its own process, alternating, timed by the one clock of benchmarks/common.py
(the first `--warmup` updates dropped). Throughput is samples over the summed update time (grouped batches
vary in length by design, so a median update would mislead); padding is counted from the collated batches.
Both sides then evaluate on the whole validation split (222 articles).

Prints samples/s, tokens/s and padding per side, the ratio group_by_length/random of samples/s (> 1: faster)
and the accuracy difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (alternate, collated_tokens, conditions, cpu_gaps, gaps, other_load, set_threads, step_clock,
                    tiny_bert)

SIDES = ("random", "group_by_length")


def one_side(args, strategy: str) -> dict:
    from transformers import DataCollatorWithPadding

    from scaletune.train import run

    set_threads(args.threads)
    with (collated_tokens(DataCollatorWithPadding) as batches, tempfile.TemporaryDirectory() as out,
          step_clock() as stamps):
        result = run(dict(model_name_or_path=args.model, dataset_name="packaged:bbc_news", max_seq_length=args.seq,
                          per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
                          learning_rate=1e-4, warmup_steps=0.1, weight_decay=0.01, max_steps=args.steps,
                          train_sampling_strategy=strategy, output_dir=out, save_strategy="no",
                          eval_strategy="no", do_eval=True, do_predict=False, logging_steps=args.steps,
                          disable_tqdm=True, report_to="none", seed=42,
                          max_eval_samples=args.eval_samples, max_train_samples=args.train_samples))
        times, cpu = gaps(stamps), cpu_gaps(stamps)
    return {"times": times, "cpu": cpu, "batches": batches[:args.steps], "accuracy": result.metrics["eval_accuracy"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--eval_samples", type=int, default=None)
    p.add_argument("--train_samples", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: one per core)")
    p.add_argument("--model", default="packaged:minilm")
    p.add_argument("--tiny", action="store_true", help="a 2-layer BERT, 10 steps, in one process: a smoke run")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="shared machine: wait for it to be idle before each side, rerun sides disturbed by others")
    p.add_argument("--side", choices=SIDES)
    args = p.parse_args()
    if args.side:
        print(json.dumps(one_side(args, args.side)))
        return
    if args.tiny:
        args.model = tiny_bert(Path(tempfile.gettempdir()) / "scaletune_bench_tiny_bert_5", num_labels=5)
        args.steps, args.seq, args.warmup, args.eval_samples, args.train_samples = 10, 128, 1, 16, 128
    load_before = other_load()
    child_args = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--model",
                  args.model, "--threads", str(args.threads)] + (["--eval_samples", str(args.eval_samples)] if args.eval_samples else []) + (
                     ["--train_samples", str(args.train_samples)] if args.train_samples else [])
    results = alternate(__file__, list(SIDES), args.repeats, child_args,
                        in_process=(lambda name: one_side(args, name)) if args.tiny else None,
                        wait_quiet=args.wait_quiet)
    print(conditions(load_before, results))
    print(f"job: {args.model}, BBC News, batch {args.batch}, max_seq_length {args.seq}, {args.steps} updates x "
          f"{args.repeats} repeats per side, first {args.warmup} of each process dropped")
    rate, cpu_rate, acc = {}, {}, {}
    for side, runs in results.items():
        seconds = cpu_seconds = samples = tokens = padded = 0.0
        for r in runs:
            for t, c, rows in zip(r["times"][args.warmup:], r["cpu"][args.warmup:], r["batches"][args.warmup + 1:]):
                seconds += t
                cpu_seconds += c
                samples += len(rows)
                tokens += sum(rows)
                padded += max(rows) * len(rows)
        rate[side], cpu_rate[side] = samples / seconds, samples / cpu_seconds
        acc[side] = sum(r["accuracy"] for r in runs) / len(runs)
        accuracies = ", ".join(f"{r['accuracy']:.4f}" for r in runs)
        print(f"  {side:16s} {rate[side]:7.2f} samples/s  {tokens / seconds:8.0f} tokens/s  "
              f"{cpu_rate[side]:7.2f} samples/CPU-s  padding {1 - tokens / padded:6.1%} of the batch  "
              f"eval accuracy {accuracies}")
    print(f"ratio group_by_length/random samples/s: {rate['group_by_length'] / rate['random']:.3f}")
    print(f"CPU-time ratio (robust to other load) group_by_length/random samples per CPU-second: "
          f"{cpu_rate['group_by_length'] / cpu_rate['random']:.3f}")
    print(f"eval accuracy difference group_by_length - random: {acc['group_by_length'] - acc['random']:+.4f}")


if __name__ == "__main__":
    main()
