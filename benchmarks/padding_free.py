"""Padding-free causal-LM batches vs padded ones: training throughput at the same per-step loss.

    python benchmarks/padding_free.py [--steps 20] [--batch 16] [--seq 128] [--repeats 2]
    python benchmarks/padding_free.py --tiny          # seconds: a 2-layer Llama, CI's smoke run

The real SmolLM2-135M (packaged) fine-tuned on Rotten Tomatoes reviews, one review per example (`line_by_line`,
cut at `--seq` tokens), so a padded batch is as wide as its longest review. The same scaletune job runs with
`padding_free: false` and `true`, each side in its own process, alternating, timed by the one clock of
benchmarks/common.py (the first `--warmup` updates dropped). Attention (`--attn`): flash_attention_2 on a GPU
with the flash-attn package, else transformers' choice (sdpa, which for a flattened row attends over the whole
row under a block mask: the linear layers save the padding, the attention does not). Both sides see the same reviews in the same order (same seed). Each update's real tokens and
examples come from scaletune's logged tokens/s and samples/s x step time; the padding from the padded side's
collated batches.

Prints samples/s and real tokens/s per side, the padding each padded batch carried, the ratio
padding_free/padded of samples/s (> 1: faster) and the largest per-step difference in training loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate, collated_tokens, conditions, cpu_gaps, gaps, other_load, set_threads, step_clock

SIDES = ("padded", "padding_free")


def tiny_llama(folder: Path) -> str:
    """A 2-layer, 64-wide Llama over SmolLM2's tokenizer (random weights: the smoke run tests the mechanics)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scaletune.assets import model_path

    if not (folder / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(model_path("packaged:smollm2"))
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def default_attention() -> str:
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "default"


def one_side(args, side: str) -> dict:
    from scaletune.tasks.clm import PadCollator
    from scaletune.train import run

    set_threads(args.threads)
    with collated_tokens(PadCollator) as padded_rows, tempfile.TemporaryDirectory() as out, step_clock() as stamps:
        result = run(dict(task="clm", model_name_or_path=args.model, dataset_name="packaged:rotten_tomatoes",
                          line_by_line=True, max_seq_length=args.seq, padding_free=side == "padding_free",
                          per_device_train_batch_size=args.batch, learning_rate=5e-5, max_steps=args.steps,
                          max_train_samples=args.steps * args.batch, output_dir=out, save_strategy="no",
                          eval_strategy="no", do_eval=False, do_predict=False, logging_steps=1, sample_prompts=0,
                          disable_tqdm=True, report_to="none", seed=42, bf16=args.bf16,
                          attn_implementation=None if args.attn == "default" else args.attn))
        times, cpu = gaps(stamps), cpu_gaps(stamps)
    steps = [e for e in result.log_history if "loss" in e and "step_time" in e]
    return {"times": times, "cpu": cpu, "losses": [e["loss"] for e in steps],
            "tokens": [e["tokens_per_second"] * e["step_time"] for e in steps],
            "samples": [e["samples_per_second"] * e["step_time"] for e in steps],
            "padded_rows": padded_rows[:args.steps]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: one per core)")
    p.add_argument("--model", default="packaged:smollm2")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--attn", default=None, help="attn_implementation, or `default` for transformers' choice "
                                                "(unset: flash_attention_2 on a GPU with flash-attn, else default)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer Llama, 6 steps, in one process: a smoke run")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="shared machine: wait for it to be idle before each side, rerun sides disturbed by others")
    p.add_argument("--side", choices=SIDES)
    args = p.parse_args()
    if args.side:
        print(json.dumps(one_side(args, args.side)))
        return
    if args.attn is None:
        args.attn = default_attention()
    if args.tiny:
        args.model = tiny_llama(Path(tempfile.gettempdir()) / "scaletune_bench_tiny_llama")
        args.steps, args.warmup, args.batch = 6, 1, 8
    load_before = other_load()
    child_args = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--model",
                  args.model, "--threads", str(args.threads), "--attn", args.attn] + (["--bf16"] if args.bf16 else [])
    results = alternate(__file__, list(SIDES), args.repeats, child_args,
                        in_process=(lambda name: one_side(args, name)) if args.tiny else None,
                        wait_quiet=args.wait_quiet)
    print(conditions(load_before, results))
    print(f"job: {args.model}, Rotten Tomatoes one review per example, batch {args.batch}, max_seq_length "
          f"{args.seq}, {'bf16' if args.bf16 else 'fp32'}, {args.steps} updates x {args.repeats} repeats per side, "
          f"first {args.warmup} of each process dropped")
    print(f"attention: {args.attn}")
    rate, cpu_rate = {}, {}
    for side, runs in results.items():
        seconds = cpu_seconds = samples = tokens = 0.0
        for r in runs:
            # Gap i ends with update i+2, which trained on the batch of logged step i+2.
            for t, c, n, k in zip(r["times"][args.warmup:], r["cpu"][args.warmup:], r["samples"][args.warmup + 1:],
                                  r["tokens"][args.warmup + 1:]):
                seconds, cpu_seconds, samples, tokens = seconds + t, cpu_seconds + c, samples + n, tokens + k
        rate[side], cpu_rate[side] = samples / seconds, samples / cpu_seconds
        rows = [b for r in runs for b in r["padded_rows"]]
        padding = (f"  padding {1 - sum(map(sum, rows)) / sum(max(b) * len(b) for b in rows):6.1%} of the batch"
                   if rows else "  no padding")
        print(f"  {side:13s} {rate[side]:7.2f} samples/s  {tokens / seconds:8.0f} real tokens/s  "
              f"{cpu_rate[side]:7.2f} samples/CPU-s{padding}")
    losses = {side: runs[0]["losses"] for side, runs in results.items()}
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["padding_free"], losses["padded"]))
    print(f"ratio padding_free/padded samples/s: {rate['padding_free'] / rate['padded']:.3f}")
    print(f"CPU-time ratio (robust to other load) padding_free/padded samples per CPU-second: "
          f"{cpu_rate['padding_free'] / cpu_rate['padded']:.3f}")
    print(f"largest per-step training-loss difference padding_free vs padded: {worst:.2e} (relative)")


if __name__ == "__main__":
    main()
