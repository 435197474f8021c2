"""Masked-LM step time: vocabulary logits at the labelled positions only vs at every position.

    python benchmarks/mlm_sparse_logits.py [--steps 30] [--batch 16] [--seq 128] [--repeats 3]
    python benchmarks/mlm_sparse_logits.py --tiny          # seconds: a 2-layer BERT, CI's smoke run

The same scaletune masked-LM job (pretrained MiniLM continuing MLM on BBC News, blocks of `--seq` tokens,
15% masked) runs twice per repeat, each in its own process, alternating:

* full: the head projects every position onto the 30,522-token vocabulary (`MaskedLMTask.sparse_logits =
  False`, the path before issue #14), and the loss reads the labelled positions out of B x T x V logits;
* sparse: the head gathers the ~15% labelled positions' hidden states first (`tasks/mlm.py` SparseHead),
  so its logits are N x V.

Same data, masks, dropout stream and optimizer on both sides, so the logged per-step losses must agree to
float rounding. Timed by the one clock of benchmarks/common.py (first `--warmup` updates dropped). Prints the
median ms/update per side, the ratio sparse/full (< 1: faster) and the largest relative loss difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (alternate, conditions, cpu_gaps, gaps, median, other_load, paired_ratios, set_threads, step_clock,
                    tiny_bert)

SIDES = ("full", "sparse")


def one_side(args, side: str) -> dict:
    from scaletune.tasks.mlm import MaskedLMTask
    from scaletune.train import run

    set_threads(args.threads)
    MaskedLMTask.sparse_logits = side == "sparse"
    try:
        with tempfile.TemporaryDirectory() as out, step_clock() as stamps:
            data = {"train_file": args.train_file} if args.train_file else {"dataset_name": "packaged:bbc_news"}
            result = run(dict(task="mlm", model_name_or_path=args.model, **data, validation_split_percentage=10,
                              max_seq_length=args.seq, per_device_train_batch_size=args.batch,
                              per_device_eval_batch_size=args.batch, max_train_samples=args.steps * args.batch,
                              max_eval_samples=args.batch * 2, learning_rate=2e-4, max_steps=args.steps,
                              output_dir=out, save_strategy="no", eval_strategy="no", do_eval=True,
                              do_predict=False, logging_steps=1, disable_tqdm=True, report_to="none", seed=42))
            times, cpu = gaps(stamps), cpu_gaps(stamps)
    finally:
        MaskedLMTask.sparse_logits = True
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    return {"times": times, "cpu": cpu, "losses": losses, "eval_loss": result.metrics["eval_loss"]}


def tiny_text(path: Path) -> str:
    """A few hundred lines of words, enough for the tiny run's blocks (BBC News takes seconds to tokenize)."""
    import random

    rng = random.Random(0)
    words = "the market film match election phone team music shares court season album vote player".split()
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(8, 40))) for _ in range(400)) + "\n")
    return str(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: one per core)")
    p.add_argument("--model", default="packaged:minilm")
    p.add_argument("--train_file", default=None, help="a text file instead of BBC News")
    p.add_argument("--tiny", action="store_true", help="a 2-layer BERT, 6 steps, in one process: a smoke run")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="shared machine: wait for it to be idle before each side, rerun sides disturbed by others")
    p.add_argument("--side", choices=SIDES)
    args = p.parse_args()
    if args.side:
        print(json.dumps(one_side(args, args.side)))
        return
    if args.tiny:
        args.model = tiny_bert(Path(tempfile.gettempdir()) / "scaletune_bench_tiny_bert_mlm", mlm=True)
        args.steps, args.batch, args.seq, args.warmup, args.repeats = 6, 4, 32, 1, 1
        args.train_file = tiny_text(Path(tempfile.gettempdir()) / "scaletune_bench_tiny_mlm.txt")
    load_before = other_load()
    results = alternate(__file__, list(SIDES), args.repeats,
                        ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                         "--model", args.model, "--threads", str(args.threads)] + (
                            ["--train_file", args.train_file] if args.train_file else []),
                        in_process=(lambda name: one_side(args, name)) if args.tiny else None,
                        wait_quiet=args.wait_quiet)
    print(conditions(load_before, results))
    print(f"job: {args.model} masked-LM on BBC News, batch {args.batch}, blocks of {args.seq} tokens, "
          f"{args.steps} updates x {args.repeats} repeats per side, first {args.warmup} of each process dropped")
    med, cpu = {}, {}
    for side, runs in results.items():
        times = [t for r in runs for t in r["times"][args.warmup:]]
        med[side] = median(times)
        cpu[side] = median([c for r in runs for c in r["cpu"][args.warmup:]])
        per_repeat = ", ".join(f"{median(r['times'][args.warmup:]) * 1000:.1f}" for r in runs)
        print(f"  {side:7s} {med[side] * 1000:8.1f} ms/update  {cpu[side] * 1000:8.1f} CPU-ms/update  ({len(times)} "
              f"updates; per-repeat medians {per_repeat} ms)  final train loss {runs[0]['losses'][-1]:.6f}  "
              f"eval loss {runs[0]['eval_loss']:.6f}")
    worst = max(abs(a - b) / abs(b) for f, s in zip(results["full"], results["sparse"])
                for a, b in zip(s["losses"], f["losses"]))
    eval_diff = max(abs(s["eval_loss"] - f["eval_loss"]) / abs(f["eval_loss"])
                    for f, s in zip(results["full"], results["sparse"]))
    print(f"ratio sparse/full ms/update: {med['sparse'] / med['full']:.3f}")
    pairs = paired_ratios(results, "sparse", "full", lambda r: median(r["times"][args.warmup:]))
    print(f"per-repeat ratios sparse/full: {', '.join(f'{x:.3f}' for x in pairs)} (median {median(pairs):.3f})")
    print(f"CPU-time ratio (robust to other load) sparse/full: {cpu['sparse'] / cpu['full']:.3f}")
    print(f"largest relative difference of the per-step train loss: {worst:.2e}; of the eval loss: {eval_diff:.2e}")


if __name__ == "__main__":
    main()
