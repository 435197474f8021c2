"""What every benchmark here shares: one clock, sides in their own processes, alternating, and the machine's
description (hardware, software and the load while it ran) printed with the figures.

A side is a child process of the script itself (`--side NAME`) that prints one JSON object on its last line.
Each side is timed by the same clock: torch's global optimizer-step hook records the wall clock after every
`optimizer.step()`, and a step's time is the gap between two of them (data loading, forward, backward,
clipping, update and the loop's own bookkeeping all included, whoever wrote the loop).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def step_clock():
    """Yields the list of (wall clock, process CPU time) after every optimizer step of any optimizer in this
    process. The CPU time (all threads of this process) is the figure to read when other processes share the
    machine: wall time then mostly measures them."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[tuple[float, float]] = []
    handle = register_optimizer_step_post_hook(lambda *_: stamps.append((time.perf_counter(), time.process_time())))
    try:
        yield stamps
    finally:
        handle.remove()


def gaps(stamps: list[tuple[float, float]]) -> list[float]:
    """Wall-clock seconds of each update (the gap between two optimizer steps)."""
    return [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]


def cpu_gaps(stamps: list[tuple[float, float]]) -> list[float]:
    """Process CPU seconds of each update."""
    return [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this side (0: torch's default, one per core)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@contextlib.contextmanager
def collated_tokens(collator_cls):
    """Yields a list that receives, per collated batch, the non-padding tokens of each row (attention_mask).

    The batches prove that the sides saw the same data, and turn step times into tokens/s. Wraps the class's
    `__call__` while the context lasts; it costs a sum over a small CPU tensor per batch.
    """
    seen: list[list[int]] = []
    call = collator_cls.__call__

    def counting(self, *args, **kwargs):
        batch = call(self, *args, **kwargs)
        seen.append(batch["attention_mask"].sum(dim=1).tolist())
        return batch

    collator_cls.__call__ = counting
    try:
        yield seen
    finally:
        collator_cls.__call__ = call


def run_side(script: str, side: str, args: list[str], timeout: int = 3600) -> dict:
    """Run one side in a fresh process (`python SCRIPT --side SIDE ARGS`); its last stdout line is JSON."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks"),
                                                                     os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, script, "--side", side, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"side {side} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(script: str, sides: list[str], repeats: int, args: list[str], in_process=None) -> dict[str, list[dict]]:
    """Every side once per repeat, in turn (A B C A B C ...), so slow drifts of the machine hit all sides.

    `in_process(side) -> dict`: run the sides in this process instead (`--tiny` smoke runs: a fresh process
    per side costs more than a tiny side itself; the figures are then not for the record)."""
    out: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(repeats):
        for side in sides:
            if in_process is not None:
                from accelerate.state import AcceleratorState

                out[side].append(in_process(side))
                AcceleratorState._reset_state(reset_partial_state=True)  # the next side builds its own
            else:
                out[side].append(run_side(script, side, args))
    return out


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def other_load() -> str:
    """The 1-minute load average and the other processes using CPU now, for the record."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    busy = []
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                            timeout=10).stdout.splitlines()[1:]
        for line in ps:
            pid, pcpu, comm = line.split(None, 2)
            if int(pid) != os.getpid() and float(pcpu) >= 10.0:
                busy.append(f"{comm.strip()} {float(pcpu):.0f}%")
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return f"load average {load:.2f}; other processes >= 10% CPU: {', '.join(busy) or 'none'}"


def machine() -> str:
    import torch
    import transformers

    try:
        import accelerate

        acc = accelerate.__version__
    except ImportError:
        acc = "-"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        device = f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, accelerate {acc}"


def tiny_bert(folder: Path, mlm: bool = False, num_labels: int = 2, max_positions: int = 512) -> str:
    """A 2-layer, 64-wide BERT with random weights and the MiniLM tokenizer (for `--tiny` smoke runs)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

    from scaletune.assets import model_path

    if (folder / "config.json").exists():
        return str(folder)
    tok = AutoTokenizer.from_pretrained(model_path("packaged:minilm"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=max_positions, num_labels=num_labels)
    torch.manual_seed(0)
    (BertForMaskedLM if mlm else BertForSequenceClassification)(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
