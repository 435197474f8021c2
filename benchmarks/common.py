"""What every benchmark here shares: the clocks, sides in their own processes, alternating, and the machine's
description (hardware, software and the load while it ran) printed with the figures.

A side is a child process of the script itself (`--side NAME`) that prints one JSON object on its last line.
Each side is timed by the same clock: torch's global optimizer-step hook records the wall clock after every
`optimizer.step()`, and a step's time is the gap between two of them (data loading, forward, backward,
clipping, update and the loop's own bookkeeping all included, whoever wrote the loop). On a GPU those gaps
measure the host, which runs ahead of the device: `window_clock` times a window of many updates between two
device synchronisations instead (benchmarks/gpu_suite.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def step_clock():
    """Yields the list of (wall clock, process CPU time) after every optimizer step of any optimizer in this
    process. The CPU time (all threads of this process) is the figure to read when other processes share the
    machine: wall time then mostly measures them.

    Under `lockstep` (BENCH_LOCKSTEP in the environment) the process also hands the machine to the next side
    after every update and waits for its turn; the wait is left out of the wall clock, so a gap is still the
    time of one update."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[tuple[float, float]] = []
    turn = _Turn.from_env()
    paused = 0.0  # wall-clock seconds spent waiting for this side's turn, left out of the stamps

    def after_update(*_):
        nonlocal paused
        stamps.append((time.perf_counter() - paused, time.process_time()))
        if turn is not None:
            paused += turn.pass_on(last=len(stamps) == turn.updates)

    handle = register_optimizer_step_post_hook(after_update)
    try:
        yield stamps
    finally:
        handle.remove()


class Window:
    """What `window_clock` measured: the wall-clock seconds of updates start+1 .. end (between two device
    synchronisations), the non-padding tokens and rows of every batch a DataLoader handed out (in order), the
    seconds spent waiting for those batches inside the window, and with `every_update` the synced time after
    each update of the window (stamps[0] is after update `start`)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.seconds: Optional[float] = None
        self.batches: list[list[int]] = []
        self.data_wait = 0.0
        self.stamps: list[float] = []

    @property
    def updates(self) -> int:
        return self.end - self.start

    def window_batches(self) -> list[list[int]]:
        """The batches the window's updates trained on: update k (from 1) trains on batch k - 1."""
        return self.batches[self.start:self.end]

    def record(self) -> dict:
        """The JSON-able result of one repeat."""
        if self.seconds is None:
            raise RuntimeError(f"the run made fewer than {self.end} optimizer updates")
        rows = self.window_batches()
        return {"seconds": self.seconds, "updates": self.updates, "tokens": sum(sum(r) for r in rows),
                "samples": sum(len(r) for r in rows), "data_wait": self.data_wait,
                "gaps": [b - a for a, b in zip(self.stamps, self.stamps[1:])]}


@contextlib.contextmanager
def window_clock(start: int, end: int, every_update: bool = False):
    """Times the window of updates start+1 .. end of whatever trains in this process (bare loop, Trainer or
    scaletune), the same way for all: torch's global optimizer-step hook counts the updates, and at update
    `start` and update `end` the device is synchronised before the clock is read, so the window holds the GPU's
    work, not only the host's (on CPU the synchronisation is a no-op). Nothing is read from the device in
    between, so the clock adds no host sync to the step. `every_update`: synchronise after every update of the
    window too (per-update times, e.g. for the stall of a save; it costs one sync per update).

    Tokens come from the batches on the host as they leave the DataLoader's iterator (in the training
    process, after worker processes collated them and before they are moved to the device), and so does the
    data wait: the time spent in that iterator during the window.

    An update the fp16 grad scaler skips does not call the optimizer's step and is not counted: the warm-up
    before `start` absorbs the scaler's first skips."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.utils.data import dataloader

    window = Window(start, end)
    count = 0

    def now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CPU run on a GPU machine: no sync
            torch.cuda.synchronize()
        return time.perf_counter()

    def after_update(*_):
        nonlocal count
        count += 1
        if count == start or (start < count <= end and (every_update or count == end)):
            window.stamps.append(now())
        if count == end:
            window.seconds = window.stamps[-1] - window.stamps[0]

    fetch = dataloader._BaseDataLoaderIter.__next__

    def counted_next(self):
        began = time.perf_counter()
        batch = fetch(self)
        if start <= count < end:
            window.data_wait += time.perf_counter() - began
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None  # BatchEncoding is no dict
        if mask is not None:
            window.batches.append(mask.sum(dim=1).tolist())  # a host tensor: no device read
        return batch

    handle = register_optimizer_step_post_hook(after_update)
    dataloader._BaseDataLoaderIter.__next__ = counted_next
    try:
        yield window
    finally:
        handle.remove()
        dataloader._BaseDataLoaderIter.__next__ = fetch


def consistent(row: dict, tolerance: float = 0.02) -> bool:
    """A row's rate and time per update describe the same window: tokens/s x ms/update / 1000 equals the
    tokens per update it trained on, within `tolerance` (relative)."""
    implied = row["tokens/s"] * row["ms/update"] / 1000
    return abs(implied - row["tokens/update"]) <= tolerance * row["tokens/update"]


class _Turn:
    """A side's end of the lockstep protocol: after each update write `s` and wait for the parent's `g`; after
    the last one write `e` and go on alone (the parent waits for this process to exit before the next turn)."""

    def __init__(self, read_fd: int, write_fd: int, updates: int):
        self.read_fd, self.write_fd, self.updates = read_fd, write_fd, updates

    @classmethod
    def from_env(cls) -> Optional["_Turn"]:
        spec = os.environ.get("BENCH_LOCKSTEP")
        return cls(*(int(x) for x in spec.split(":"))) if spec else None

    def pass_on(self, last: bool) -> float:
        os.write(self.write_fd, b"e" if last else b"s")
        if last:
            return 0.0
        start = time.perf_counter()
        if os.read(self.read_fd, 1) != b"g":
            raise SystemExit("lockstep: the benchmark's parent process went away")
        return time.perf_counter() - start


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


def _cpu_ticks() -> Optional[tuple[int, int]]:
    """(busy, total) clock ticks of the whole machine since boot, from /proc/stat (Linux); None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def wait_until_quiet(max_wait: float, idle_share: float = 0.9, windows: int = 3) -> bool:
    """Wait until the machine was >= `idle_share` idle for `windows` consecutive 2-second windows."""
    deadline, quiet = time.monotonic() + max_wait, 0
    while time.monotonic() < deadline:
        a = _cpu_ticks()
        time.sleep(2)
        b = _cpu_ticks()
        if a is None or b is None:
            return True  # no /proc/stat: nothing to wait for
        quiet = quiet + 1 if (b[0] - a[0]) <= (1 - idle_share) * max(b[1] - a[1], 1) else 0
        if quiet >= windows:
            return True
    return False


def _side_env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks"),
                                                                      os.environ.get("PYTHONPATH", "")])}


def run_side(script: str, side: str, args: list[str], timeout: int = 3600) -> dict:
    """Run one side in a fresh process (`python SCRIPT --side SIDE ARGS`); its last stdout line is JSON, to
    which `others_cpu` is added: the share of the machine's CPU that other processes used meanwhile."""
    env = _side_env()
    ticks, children, start = _cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    proc = subprocess.run([sys.executable, script, "--side", side, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    result = _side_result(side, proc.returncode, proc.stdout, proc.stderr)
    after, done = _cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if ticks is not None and after is not None:
        hz = os.sysconf("SC_CLK_TCK")
        ours = (done.ru_utime + done.ru_stime) - (children.ru_utime + children.ru_stime)
        others = (after[0] - ticks[0]) / hz - ours
        result["others_cpu"] = max(0.0, others) / ((time.monotonic() - start) * (os.cpu_count() or 1))
    return result


def alternate(script: str, sides: list[str], repeats: int, args: list[str], in_process=None,
              wait_quiet: float = 0, max_others: float = 0.1, retries: int = 3) -> dict[str, list[dict]]:
    """Every side once per repeat, in turn (A B C A B C ...), so slow drifts of the machine hit all sides.

    `wait_quiet` > 0 (a shared machine): before each side wait up to that many seconds for the machine to be
    idle, and run a side again (up to `retries` times) when other processes used more than `max_others` of
    the CPU while it ran; the share is kept in each result as `others_cpu`.
    `in_process(side) -> dict`: run the sides in this process instead (`--tiny` smoke runs: a fresh process
    per side costs more than a tiny side itself; the figures are then not for the record)."""
    out: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(repeats):
        for side in sides:
            if in_process is not None:
                from accelerate.state import AcceleratorState

                out[side].append(in_process(side))
                AcceleratorState._reset_state(reset_partial_state=True)  # the next side builds its own
                continue
            for attempt in range(retries + 1):
                if wait_quiet:
                    wait_until_quiet(wait_quiet)
                result = run_side(script, side, args)
                if not wait_quiet or result.get("others_cpu", 0.0) <= max_others or attempt == retries:
                    break
                print(f"  ({side}: other processes took {result['others_cpu']:.0%} of the CPU; running it again)",
                      flush=True)
            out[side].append(result)
    return out


def lockstep(script: str, sides: list[str], args: list[str], updates: int, timeout: int = 3600) -> dict[str, dict]:
    """All sides started at once, then taking turns update by update (A B C A B C ...): only one computes at a
    time, and a drift of the machine (on these VMs the same process's 10-update median moves between 485 and
    615 ms within a minute) hits neighbouring updates of every side alike. Each side waits, blocked and using
    no CPU, until every side has made its first update (so no side's start-up overlaps another's timed
    updates), and after its last update it finishes alone. Returns each side's JSON result."""
    import tempfile

    env = _side_env()
    procs, pipes, logs = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            go_read, go_write = os.pipe()
            done_read, done_write = os.pipe()
            logs[side] = (open(Path(tmp) / f"{side}.out", "w+"), open(Path(tmp) / f"{side}.err", "w+"))
            procs[side] = subprocess.Popen(
                [sys.executable, script, "--side", side, *args], stdout=logs[side][0], stderr=logs[side][1],
                env={**env, "BENCH_LOCKSTEP": f"{go_read}:{done_write}:{updates}"}, pass_fds=(go_read, done_write))
            os.close(go_read)
            os.close(done_write)
            pipes[side] = (go_write, done_read)
        deadline = time.monotonic() + timeout

        def ended(side: str) -> dict:
            """The side's JSON result once it has exited (SystemExit with its output if it failed)."""
            returncode = procs[side].wait(timeout=max(1, deadline - time.monotonic()))
            return _side_result(side, returncode, *(_read_back(f) for f in logs[side]))

        def wait_for(side: str) -> bytes:
            message = os.read(pipes[side][1], 1)
            if not message:  # the side exited
                ended(side)  # raises with the side's output if it failed
                raise SystemExit(f"side {side} exited before its last update")
            if time.monotonic() > deadline:
                procs[side].kill()
                raise SystemExit(f"side {side} went past the {timeout} s bound")
            return message

        active = []
        for side in sides:  # everyone's first update (untimed)
            if wait_for(side) == b"e":  # its only one: it finishes alone before any turn
                procs[side].wait(timeout=max(1, deadline - time.monotonic()))
            else:
                active.append(side)
        while active:
            for side in list(active):
                os.write(pipes[side][0], b"g")
                if wait_for(side) == b"e":
                    procs[side].wait(timeout=max(1, deadline - time.monotonic()))
                    active.remove(side)
        results = {}
        for side in sides:
            results[side] = ended(side)
            for fd in pipes[side]:
                os.close(fd)
            for f in logs[side]:
                f.close()
    return results


def _side_result(side: str, returncode: int, stdout: str, stderr: str) -> dict:
    """A side's last stdout line, as JSON; a failed side ends the benchmark with the tail of its output."""
    if returncode != 0:
        raise SystemExit(f"side {side} failed ({returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def _read_back(log) -> str:
    log.seek(0)
    return log.read()


def conditions(load_before: str, results: dict[str, list[dict]]) -> str:
    """What every script prints before its figures: the machine, the load before and after the sides, and the
    CPU share other processes took while the sides ran (`alternate` measures it)."""
    shares = [r["others_cpu"] for runs in results.values() for r in runs if "others_cpu" in r]
    others = (f"median {median(shares):.1%}, max {max(shares):.1%}" if shares else "not measured")
    return "\n".join([f"machine: {machine()}", f"load before: {load_before}", f"load after:  {other_load()}",
                      f"other processes' CPU share during the sides: {others}"])


def paired_ratios(results: dict[str, list[dict]], a: str, b: str, key) -> list[float]:
    """Per repeat, key(a's run) / key(b's run): sides of one repeat ran minutes apart, repeats may not."""
    return [key(x) / key(y) for x, y in zip(results[a], results[b])]


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
