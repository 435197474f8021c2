"""The GPU suite: tokens/s and MFU of a bare loop, transformers.Trainer and scaletune, then scaletune's options.

    bash benchmarks/gpu_suite.sh                 # one H100/H200: about 6 minutes, writes gpu_suite_results.md
    bash benchmarks/gpu_suite.sh --tiny --cpu    # a 2-layer BERT on CPU in under a minute (CI's smoke run)

Model: BERT-base (12 layers, 768 wide, 110M parameters) initialised from its config (random weights: the
speed does not depend on them), sequence classification on BBC News (packaged; 5 topics; articles cut at
`seq` tokens). Every case runs the same batches (accelerate's seeded sampler) for `--steps` updates after
`--warmup`, timed by the one clock of benchmarks/common.py. Rows:

1. bare / trainer / scaletune  x  seq 128 (batch 64) and 512 (batch 16)  x  bf16 and fp16;
2. scaletune at seq 512 bf16 with: torch_compile, train_sampling_strategy=group_by_length, DeepSpeed ZeRO-2 on
   one GPU (through `accelerate launch`);
3. the stall of one checkpoint save (the update gap that holds the save, minus the median gap);
4. padding-free batches, which are for causal LMs (BERT's bidirectional mask cannot keep packed examples apart):
   benchmarks/padding_free.py, SmolLM2-135M on one review per example, padded vs padding_free, bf16, with
   flash_attention_2 when the `flash-attn` package is installed (else sdpa); its lines follow the table.

tokens/s counts non-padding tokens; MFU = model FLOPs (6N + 12·L·d·T per token, scaletune/throughput.py)
x tokens/s / the device's dense bf16 peak. A case that fails is a row with its error; the suite stops
starting new cases once `--budget` seconds have passed. With `--cpu` (or no GPU) fp16, torch_compile and
ZeRO-2 are left out (CPU autocast is bf16 only; inductor and DeepSpeed take minutes to build on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, collated_tokens, gaps, machine, other_load, step_clock, tiny_bert


@dataclass
class Case:
    side: str  # bare | trainer | scaletune
    seq: int
    batch: int
    precision: str  # bf16 | fp16 | no
    options: dict = field(default_factory=dict)
    label: str = ""
    launcher: str = ""  # an accelerate config to launch the case with (ZeRO-2), else in this process

    @property
    def name(self) -> str:
        return self.label or self.side


def bert_base(folder: Path) -> str:
    """BERT-base with random weights and the MiniLM (bert-base-uncased) vocabulary, saved once."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from scaletune.assets import model_path

    if not (folder / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(model_path("packaged:minilm"))
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, num_labels=5)).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def job(args, case: Case, out: str) -> dict:
    return {**dict(model_name_or_path=args.model, dataset_name="packaged:bbc_news", max_seq_length=case.seq,
                   per_device_train_batch_size=case.batch, learning_rate=5e-5,
                   max_steps=args.steps + args.warmup + 1, output_dir=out, save_strategy="no", eval_strategy="no",
                   do_eval=False, do_predict=False, logging_steps=50, disable_tqdm=True, report_to="none", seed=0,
                   bf16=case.precision == "bf16", fp16=case.precision == "fp16",
                   max_train_samples=case.batch * (args.steps + args.warmup + 2) if args.tiny else None),
            **case.options}


def train_split(args, case: Case, out: str):
    import contextlib

    from transformers import AutoTokenizer

    from scaletune.config import load_config
    from scaletune.data import load_raw_datasets
    from scaletune.tasks import get_task

    cfg = load_config(job(args, case, out))
    tok = AutoTokenizer.from_pretrained(args.model)
    return cfg, tok, get_task("classification").prepare_data(load_raw_datasets(cfg), tok, cfg,
                                                             contextlib.nullcontext).train


def run_bare(args, case: Case, out: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, get_scheduler

    from scaletune.optim import build_optimizer

    cfg, tok, train = train_split(args, case, out)
    acc = Accelerator(mixed_precision=case.precision, cpu=args.cpu,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    optimizer = build_optimizer(model, cfg.training)
    steps = cfg.training.max_steps
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    loader = DataLoader(train, batch_size=case.batch, shuffle=True, collate_fn=DataCollatorWithPadding(tok))
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            acc.backward(model(**batch).loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break


def run_trainer(args, case: Case, out: str) -> None:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    cfg, tok, train = train_split(args, case, out)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=case.batch,
                              max_steps=cfg.training.max_steps, learning_rate=5e-5, save_strategy="no",
                              eval_strategy="no", logging_steps=50, report_to="none", disable_tqdm=True, seed=0,
                              bf16=case.precision == "bf16", fp16=case.precision == "fp16", use_cpu=args.cpu)
    Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok)).train()


def run_scaletune(args, case: Case, out: str) -> None:
    from scaletune.train import run

    run(job(args, case, out))


def measure(args, case: Case) -> dict:
    """One case in this process: update times and collated batches."""
    from transformers import DataCollatorWithPadding

    if args.cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # scaletune's Accelerator, as `accelerate launch --cpu`
    runner = {"bare": run_bare, "trainer": run_trainer, "scaletune": run_scaletune}[case.side]
    with collated_tokens(DataCollatorWithPadding) as batches, tempfile.TemporaryDirectory() as out, \
            step_clock() as stamps:
        runner(args, case, out)
        times = gaps(stamps)
    return {"times": times, "batches": batches[:len(times) + 1]}


def launched(args, case: Case) -> dict:
    """A case under `accelerate launch --config_file CASE.launcher --num_processes 1` (DeepSpeed)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / case.launcher),
               "--num_processes", "1", "--mixed_precision", case.precision, __file__, "--launched-case",
               json.dumps(case.__dict__), "--result", str(result), "--model", args.model, "--steps",
               str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.budget)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
        return json.loads(result.read_text())


def summarise(args, case: Case, r: dict, dims, peak) -> dict:
    from scaletune.throughput import flops_per_token

    # Gap i ends with update i+2, which trained on batch i+1; the gap that holds a save is left out of the rates.
    save_gap = int(case.options["save_steps"]) - 1 if case.options.get("save_strategy") == "steps" else None
    timed = [(t, rows) for i, (t, rows) in enumerate(zip(r["times"], r["batches"][1:]))
             if i >= args.warmup and i != save_gap]
    seconds = sum(t for t, _ in timed)
    tokens = sum(sum(rows) for _, rows in timed)
    samples = sum(len(rows) for _, rows in timed)
    row = {"case": case.name, "seq": case.seq, "batch": case.batch, "precision": case.precision,
           "ms/update": 1000 * statistics.median(t for t, _ in timed), "tokens/s": tokens / seconds}
    n_params, layers, width = dims
    rate = flops_per_token(n_params, layers, width, tokens / samples) * tokens / seconds
    row["TFLOP/s"] = rate / 1e12
    row["MFU"] = rate / peak if peak else None
    if save_gap is not None:  # the save follows update save_steps, inside gap save_steps - 1
        row["save stall s"] = r["times"][save_gap] - statistics.median(t for t, _ in timed)
    return row


def cases(args) -> list[Case]:
    sizes = [(64, 8)] if args.tiny else [(128, 64), (512, 16)]
    base = dict(seq=sizes[-1][0], batch=sizes[-1][1], precision="no" if args.cpu else "bf16")
    out = []
    precisions = ["no"] if args.cpu else ["bf16", "fp16"]
    for seq, batch in sizes:
        for precision in precisions:
            for side in ("bare", "trainer", "scaletune"):
                out.append(Case(side, seq, batch, precision))
    if not args.cpu:
        out.append(Case("scaletune", **base, options={"torch_compile": True}, label="scaletune torch_compile"))
    out.append(Case("scaletune", **base, options={"train_sampling_strategy": "group_by_length"},
                    label="scaletune group_by_length"))
    if not args.cpu:
        out.append(Case("scaletune", **base, launcher="accelerate_configs/deepspeed_zero2.yaml",
                        label="scaletune ZeRO-2 (1 GPU)"))
    save_at = args.warmup + args.steps // 2
    out.append(Case("scaletune", **base, options={"save_strategy": "steps", "save_steps": save_at},
                    label="scaletune + 1 checkpoint save"))
    return out


def table(rows: list[dict]) -> str:
    cols = ["case", "seq", "batch", "precision", "ms/update", "tokens/s", "TFLOP/s", "MFU", "save stall s", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(col, v):
        if v is None:
            return "-"
        if col == "MFU":
            return f"{v:.1%}"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def padding_free_lines(args) -> str:
    """benchmarks/padding_free.py's summary (row 4), run in its own processes after the table."""
    cmd = [sys.executable, str(Path(__file__).with_name("padding_free.py"))]
    cmd += ["--tiny"] if args.tiny else ["--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", "1",
                                         "--batch", "32", "--seq", "512"]
    if not args.cpu:
        cmd.append("--bf16")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=max(args.budget, 300))
    if proc.returncode != 0:
        return f"padding_free: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}"
    keep = ("job:", "  padded", "  padding_free", "ratio", "CPU-time", "largest", "attention:")
    return "padding_free (benchmarks/padding_free.py):\n" + "\n".join(
        line for line in proc.stdout.splitlines() if line.startswith(keep))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget", type=float, default=420, help="seconds after which no new case starts")
    p.add_argument("--out", default="gpu_suite_results.md")
    p.add_argument("--tiny", action="store_true", help="a 2-layer BERT, 4 updates per case")
    p.add_argument("--cpu", action="store_true", help="run on CPU: fp32 and bf16-free cases only")
    p.add_argument("--model", default=None)
    p.add_argument("--launched-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    args.cpu = args.cpu or not torch.cuda.is_available()
    if args.launched_case:  # inside `accelerate launch`: one case, result to a file
        result = measure(args, Case(**json.loads(args.launched_case)))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(result))
        return
    if args.tiny:
        args.steps, args.warmup = 4, 1
    if args.model is None:
        folder = Path(tempfile.gettempdir()) / ("scaletune_bench_tiny_bert_5" if args.tiny else "scaletune_bert_base")
        args.model = tiny_bert(folder, num_labels=5) if args.tiny else bert_base(folder)
    from scaletune.throughput import device_peak_flops, model_dims
    from transformers import AutoModelForSequenceClassification

    dims = model_dims(AutoModelForSequenceClassification.from_pretrained(args.model))
    peak = None if args.cpu else device_peak_flops(torch.device("cuda"))
    started, rows = time.monotonic(), []
    header = [f"machine: {machine()}", f"load before: {other_load()}",
              f"model: {args.model} ({dims[0] / 1e6:.1f}M matmul parameters), BBC News, {args.steps} timed updates "
              f"per case after {args.warmup}"]
    print("\n".join(header), flush=True)
    for case in cases(args):
        if time.monotonic() - started > args.budget:
            rows.append({"case": case.name, "seq": case.seq, "precision": case.precision,
                         "error": "not started: time budget spent"})
            continue
        try:
            r = launched(args, case) if case.launcher else measure(args, case)
            rows.append(summarise(args, case, r, dims, peak))
        except Exception as e:  # a failing case is a row, not the end of the suite
            message = " ".join(str(e).split())[:160] or type(e).__name__
            if os.environ.get("GPU_SUITE_DEBUG"):
                traceback.print_exc()
            rows.append({"case": case.name, "seq": case.seq, "precision": case.precision,
                         "error": f"{type(e).__name__}: {message}"})
        finally:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"  done: {case.name} seq {case.seq} {case.precision} ({time.monotonic() - started:.0f} s)", flush=True)
    by = {(r["case"], r["seq"], r["precision"]): r for r in rows}
    ratios = []
    for seq in sorted({r["seq"] for r in rows}):
        for precision in sorted({r["precision"] for r in rows}):
            s, t, b = (by.get((n, seq, precision)) for n in ("scaletune", "trainer", "bare"))
            if s and t and b and all("ms/update" in x for x in (s, t, b)):
                ratios.append(f"seq {seq} {precision}: ratio scaletune/trainer {s['ms/update'] / t['ms/update']:.3f}, "
                              f"ratio scaletune/bare {s['ms/update'] / b['ms/update']:.3f}")
    padding_free = padding_free_lines(args)
    text = "\n".join(header + [f"load after: {other_load()}", f"total {time.monotonic() - started:.0f} s", "",
                               table(rows), ""] + ratios + ["", padding_free]) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
