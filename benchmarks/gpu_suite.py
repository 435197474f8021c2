"""The GPU suite: tokens/s and MFU of a bare loop, transformers.Trainer and scaletune, then scaletune's options.

    bash benchmarks/gpu_suite.sh                 # one H100/H200: writes gpu_suite_results.md as rows finish
    bash benchmarks/gpu_suite.sh --tiny --cpu    # a 2-layer BERT on CPU in about a minute (CI's smoke run)

Model: BERT-base (12 layers, 768 wide, 110M parameters) initialised from its config (random weights: the
speed does not depend on them), sequence classification on BBC News (packaged; 5 topics; articles cut at
`seq` tokens). Every case runs the same batches (accelerate's seeded sampler).

The clock (benchmarks/common.py `window_clock`): a run makes `--warmup` updates, then a window of `--steps`
updates (100 by default) timed between two device synchronisations, with nothing read from the device in
between (a per-update clock on a GPU measures the host, which runs ahead). The cases of a group take turns,
A B C A B C ..., over `--repeats` runs each (3 by default), so a drift of the machine hits all of them alike.
A row is the median repeat (the lower middle one for an even count), with `spread` = (slowest - fastest) /
median of ms/update; ms/update and tokens/s come from that one window. `check` marks a row inconsistent when
tokens/s x ms/update / 1000 is not its tokens per update within 2%, or when its repeats did not train on the
same tokens. Groups, in this order (no group starts once `--budget` seconds have passed; its rows say so):

1. bare / trainer / scaletune at seq 128 batch 64, bf16;
2. the fast path: scaletune with torch_compile at seq 128, batch 64 and 256, bf16;
3. bare / trainer / scaletune at seq 128 fp16, then seq 512 batch 16 bf16 and fp16;
4. scaletune at seq 512 bf16 with train_sampling_strategy=group_by_length, DeepSpeed ZeRO-2 on one GPU
   (through `accelerate launch`), and with one checkpoint save in the window: that case synchronises after
   every update, and its `save stall s` is the update that holds the save minus the median update
   (benchmarks/checkpoint_stall.py compares the stall with a synchronous save);
5. padding-free batches, which are for causal LMs (BERT's bidirectional mask cannot keep packed examples apart):
   benchmarks/padding_free.py, SmolLM2-135M on one review per example, padded vs padding_free, bf16, with
   flash_attention_2 when the `flash-attn` package is installed (else sdpa); its lines follow the table.

The bare side is what a careful engineer writes: fused AdamW, TF32 matmuls, DataLoader worker processes with
pinned memory (on CUDA), clipping, no per-update read of the device. Trainer and scaletune run at their
defaults. Every case runs in this process; global torch settings a case changes (TF32) are put back after it.

tokens/s counts non-padding tokens; MFU = model FLOPs (6N + 12·L·d·T per token, scaletune/throughput.py)
x tokens/s / the device's dense bf16 peak; `data wait` = the share of the window spent waiting for the
DataLoader's next batch. The results file gets its header and table head first and each group's rows as the
group finishes (appended and flushed: a run cut short keeps what it measured), then the ratio lines (paired by
repeat). A case that fails is a row with its error. With `--cpu` (or no GPU) fp16, torch_compile and ZeRO-2
are left out (CPU autocast is bf16 only; inductor and DeepSpeed take minutes to build on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, consistent, machine, other_load, tiny_bert, window_clock


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


# OFFLINE: transformers 5.25 loads models with Hub kernels on, and on CUDA its train()/eval() switch then looks
# up kernels-community/... on the Hub: offline, the bare and Trainer sides would crash before their first
# update. They load with them off, as their user on this machine must; scaletune turns them off by itself.


def job(args, case: Case, out: str) -> dict:
    updates = args.steps + args.warmup
    return {**dict(model_name_or_path=args.model, dataset_name="packaged:bbc_news", max_seq_length=case.seq,
                   per_device_train_batch_size=case.batch, learning_rate=5e-5,
                   max_steps=updates + 1, output_dir=out, save_strategy="no", eval_strategy="no",
                   do_eval=False, do_predict=False, logging_steps=50, disable_tqdm=True, report_to="none", seed=0,
                   bf16=case.precision == "bf16", fp16=case.precision == "fp16",
                   max_train_samples=case.batch * (updates + 2) if args.tiny else None),
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
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, get_scheduler

    from scaletune.optim import build_optimizer

    cfg, tok, train = train_split(args, case, out)
    acc = Accelerator(mixed_precision=case.precision, cpu=args.cpu,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    set_seed(0)
    gpu = acc.device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = AutoModelForSequenceClassification.from_pretrained(args.model, use_kernels=False)  # see OFFLINE
    optimizer = build_optimizer(model, cfg.training)  # Trainer's default: AdamW, fused
    steps = cfg.training.max_steps
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    workers = min(4, os.cpu_count() or 1) if gpu else 0  # CPU: the workers would take the compute's cores
    loader = DataLoader(train, batch_size=case.batch, shuffle=True, collate_fn=DataCollatorWithPadding(tok),
                        num_workers=workers, pin_memory=gpu, persistent_workers=workers > 0)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            acc.backward(model(**batch).loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)  # the norm stays on the device: nothing is read
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break


def run_trainer(args, case: Case, out: str) -> None:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    cfg, tok, train = train_split(args, case, out)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, use_kernels=False)  # see OFFLINE
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=case.batch,
                              max_steps=cfg.training.max_steps, learning_rate=5e-5, save_strategy="no",
                              eval_strategy="no", logging_steps=50, report_to="none", disable_tqdm=True, seed=0,
                              bf16=case.precision == "bf16", fp16=case.precision == "fp16", use_cpu=args.cpu)
    Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok)).train()


def run_scaletune(args, case: Case, out: str) -> None:
    from scaletune.train import run

    run(job(args, case, out))


def save_at(args) -> int:
    """The update after which the save case saves: in the middle of its window."""
    return args.warmup + args.steps // 2


@contextlib.contextmanager
def torch_settings_kept():
    """Global torch settings a case may change (the bare side and scaletune turn TF32 on) are put back, so the
    next case runs at its own defaults."""
    import torch

    kept = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept[:2]
        torch.set_float32_matmul_precision(kept[2])


def measure(args, case: Case) -> dict:
    """One run of a case in this process: its timed window (common.window_clock's record)."""
    if args.cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # scaletune's Accelerator, as `accelerate launch --cpu`
    runner = {"bare": run_bare, "trainer": run_trainer, "scaletune": run_scaletune}[case.side]
    saving = case.options.get("save_strategy") == "steps"
    with tempfile.TemporaryDirectory() as out, torch_settings_kept(), \
            window_clock(args.warmup, args.warmup + args.steps, every_update=saving) as window:
        runner(args, case, out)
    return window.record()


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


def summarise(args, case: Case, runs: list[dict], dims, peak) -> dict:
    """A case's row from its repeats: medians, the spread of ms/update, and the consistency check."""
    from scaletune.throughput import flops_per_token

    ms = [1000 * r["seconds"] / r["updates"] for r in runs]
    per_update = [r["tokens"] / r["updates"] for r in runs]
    # The median repeat (the lower of the middle two for an even count) gives both the time and the rate, so
    # they describe one window; averaging the middle two of each would not (1/mean(t) != mean(1/t)).
    middle = sorted(range(len(runs)), key=ms.__getitem__)[(len(runs) - 1) // 2]
    row = {"case": case.name, "seq": case.seq, "batch": case.batch, "precision": case.precision,
           "repeats": len(runs), "ms/update": ms[middle], "spread": (max(ms) - min(ms)) / ms[middle],
           "tokens/s": runs[middle]["tokens"] / runs[middle]["seconds"],
           "tokens/update": statistics.median(per_update),
           "data wait": statistics.median(r["data_wait"] / r["seconds"] for r in runs)}
    n_params, layers, width = dims
    mean_length = sum(r["tokens"] for r in runs) / max(1, sum(r["samples"] for r in runs))
    rate = flops_per_token(n_params, layers, width, mean_length) * row["tokens/s"]
    row["TFLOP/s"] = rate / 1e12
    row["MFU"] = rate / peak if peak else None
    if case.options.get("save_strategy") == "steps":  # gap i runs from update warmup+i to warmup+i+1
        held = save_at(args) - args.warmup
        row["save stall s"] = statistics.median(
            r["gaps"][held] - statistics.median(g for i, g in enumerate(r["gaps"]) if i != held) for r in runs)
    same_tokens = max(per_update) - min(per_update) <= 0.02 * min(per_update)
    row["check"] = ("ok" if consistent(row) and same_tokens else
                    "inconsistent: " + ("tokens/s x ms/update != tokens/update" if not consistent(row)
                                        else "the repeats trained on different tokens"))
    return row


def groups(args) -> list[list[Case]]:
    """The cases that take turns, group by group, in the order they run (the issue's rows first)."""
    cpu = args.cpu
    small, large = ((64, 8), (64, 8)) if args.tiny else ((128, 64), (512, 16))
    main = "no" if cpu else "bf16"

    def trio(seq, batch, precision):
        return [Case(side, seq, batch, precision) for side in ("bare", "trainer", "scaletune")]

    out = [trio(*small, main)]
    if not cpu:
        fast = {"torch_compile": True}
        out.append([Case("scaletune", *small, "bf16", options=fast, label="scaletune fast path (torch_compile)"),
                    Case("scaletune", small[0], 4 * small[1], "bf16", options=fast,
                         label="scaletune fast path (torch_compile)")])
        out.append(trio(*small, "fp16"))
        if not args.tiny:
            out += [trio(*large, "bf16"), trio(*large, "fp16")]
    options = [Case("scaletune", *large, main, options={"train_sampling_strategy": "group_by_length"},
                    label="scaletune group_by_length")]
    if not cpu:
        options.append(Case("scaletune", *large, main, launcher="accelerate_configs/deepspeed_zero2.yaml",
                            label="scaletune ZeRO-2 (1 GPU)"))
    options.append(Case("scaletune", *large, main, options={"save_strategy": "steps", "save_steps": save_at(args)},
                        label="scaletune + 1 checkpoint save"))
    return out + [options]


COLUMNS = ["case", "seq", "batch", "precision", "repeats", "ms/update", "spread", "tokens/s", "tokens/update",
           "TFLOP/s", "MFU", "data wait", "save stall s", "check", "error"]


def table_head() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def table_row(row: dict) -> str:
    def fmt(col, v):
        if v is None:
            return "-"
        if col in ("MFU", "spread", "data wait"):
            return f"{v:.1%}"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v).replace("|", "/")

    return "| " + " | ".join(fmt(c, row.get(c)) for c in COLUMNS) + " |"


def padding_free_lines(args) -> str:
    """benchmarks/padding_free.py's summary (row 5), run in its own processes after the table."""
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


def ratio_lines(group: list[Case], runs: dict[int, list[dict]]) -> list[str]:
    """scaletune against Trainer and bare, per repeat (the sides of a repeat ran back to back), median."""
    by = {case.side: runs.get(i) for i, case in enumerate(group)}
    if len(group) != 3 or not all(by.values()):
        return []

    def paired(a, b, key):
        return statistics.median(key(x) / key(y) for x, y in zip(by[a], by[b]))

    def ms(r):
        return r["seconds"] / r["updates"]

    def rate(r):
        return r["tokens"] / r["seconds"]

    case = group[0]
    return [f"seq {case.seq} {case.precision}: ratio scaletune/trainer {paired('scaletune', 'trainer', ms):.3f}, "
            f"ratio scaletune/bare {paired('scaletune', 'bare', ms):.3f} (ms/update, median of the paired "
            f"repeats); tokens/s scaletune/trainer {paired('scaletune', 'trainer', rate):.3f}"]


class Stopped(BaseException):
    """SIGTERM arrived: not an Exception, so that no case's error handling takes it for the case's failure."""


def stop(*_):
    raise Stopped()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="timed updates per run (the window)")
    p.add_argument("--warmup", type=int, default=10, help="updates before the window")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per case, the cases of a group taking turns (default 3; 2 with --tiny)")
    p.add_argument("--groups", type=int, default=None, help="run only the first N groups (a quick check)")
    p.add_argument("--budget", type=float, default=420, help="seconds after which no new group starts")
    p.add_argument("--out", default="gpu_suite_results.md")
    p.add_argument("--append", action="store_true", help="append to --out (scripts/gpu_check.sh's one file)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer BERT, a window of 4 updates per run")
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
    args.repeats = args.repeats or (2 if args.tiny else 3)
    if args.model is None:
        folder = Path(tempfile.gettempdir()) / ("scaletune_bench_tiny_bert_5" if args.tiny else "scaletune_bert_base")
        args.model = tiny_bert(folder, num_labels=5) if args.tiny else bert_base(folder)
    from scaletune.throughput import device_peak_flops, model_dims
    from transformers import AutoModelForSequenceClassification

    dims = model_dims(AutoModelForSequenceClassification.from_pretrained(args.model))
    peak = None if args.cpu else device_peak_flops(torch.device("cuda"))
    started = time.monotonic()
    header = [f"machine: {machine()}", f"load before: {other_load()}",
              f"model: {args.model} ({dims[0] / 1e6:.1f}M matmul parameters), BBC News; per run {args.warmup} "
              f"warm-up updates, then a window of {args.steps} updates between two device synchronisations; "
              f"{args.repeats} repeats per case, the cases of a group taking turns", ""]
    print("\n".join(header + [table_head()]), flush=True)
    out = open(args.out, "a" if args.append else "w")
    out.write("\n".join(header + [table_head()]) + "\n")
    out.flush()
    ratios, cut = [], False
    signal.signal(signal.SIGTERM, stop)  # `timeout` (scripts/gpu_check.sh): keep the repeats already made
    for group in groups(args)[:args.groups]:
        if cut or time.monotonic() - started > args.budget:
            rows = [{"case": c.name, "seq": c.seq, "batch": c.batch, "precision": c.precision,
                     "error": "not started: " + ("stopped" if cut else "time budget spent")} for c in group]
        else:
            runs: dict[int, list[dict]] = {i: [] for i in range(len(group))}
            errors: dict[int, str] = {}
            try:
                for repeat in range(args.repeats):
                    for i, case in enumerate(group):
                        if i in errors:
                            continue
                        try:
                            runs[i].append(launched(args, case) if case.launcher else measure(args, case))
                        except Exception as e:  # a failing case is a row, not the end of the suite
                            message = " ".join(str(e).split())[:160] or type(e).__name__
                            if os.environ.get("GPU_SUITE_DEBUG"):
                                traceback.print_exc()
                            errors[i] = f"{type(e).__name__}: {message}"
                        finally:
                            from accelerate.state import AcceleratorState

                            AcceleratorState._reset_state(reset_partial_state=True)
                            gc.collect()
                            if torch.cuda.is_available():
                                torch.cuda.empty_cache()
                        print(f"  done: {case.name} seq {case.seq} batch {case.batch} {case.precision} repeat "
                              f"{repeat + 1} ({time.monotonic() - started:.0f} s)", flush=True)
            except Stopped:
                cut = True
                for i in runs:  # what was measured is kept, marked
                    if len(runs[i]) < args.repeats:
                        errors.setdefault(i, f"stopped after {len(runs[i])} of {args.repeats} repeats")
            rows = []
            for i, case in enumerate(group):
                row = summarise(args, case, runs[i], dims, peak) if runs[i] else {
                    "case": case.name, "seq": case.seq, "batch": case.batch, "precision": case.precision}
                if i in errors:
                    row["error"] = errors[i]
                rows.append(row)
            ratios += ratio_lines(group, {i: r for i, r in runs.items() if i not in errors})
        lines = "\n".join(table_row(r) for r in rows)
        print(lines, flush=True)
        out.write(lines + "\n")
        out.flush()
    if cut:
        out.write("\n".join(["", *ratios, "", "stopped (SIGTERM) before the end"]) + "\n")
        out.close()
        sys.exit(124)
    tail = ["", *ratios, "", padding_free_lines(args) if args.groups is None else "", "",
            f"load after: {other_load()}", f"total {time.monotonic() - started:.0f} s"]
    out.write("\n".join(tail) + "\n")
    out.close()
    print("\n".join(tail))


if __name__ == "__main__":
    main()
