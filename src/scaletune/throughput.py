"""Throughput and MFU: samples/s, tokens/s (non-padding), step time, data-wait fraction, peak memory, MFU.

Interface used by the loop (keep it stable):
    meter = ThroughputMeter(model, accelerator)   # after prepare
    meter.data_wait(seconds)                      # time spent fetching one micro-batch
    meter.add_batch(num_samples, num_tokens)      # local counts for one micro-batch (tokens: attention_mask.sum())
    meter.step_done()                             # after each optimizer update
    meter.interval_metrics() -> dict              # collective on all ranks at log time; resets the interval

Keys returned by `interval_metrics` (all ranks together, over the steps since the last call):
    samples_per_second, tokens_per_second   global throughput (non-padding tokens)
    step_time                               seconds per optimizer update
    data_wait_fraction                      share of step time spent waiting for the dataloader
    tflops_per_device                       achieved model TFLOP/s per process (see `flops_per_token`)
    mfu                                     model FLOPs utilisation, 0..1 (GPUs in PEAK_FLOPS only)
    peak_memory_gib                         GPU: torch.cuda.max_memory_allocated since start, max over ranks
    peak_rss_gib                            CPU: peak resident set size of the process, max over ranks

Timing counts only the time inside optimizer steps (from the first micro-batch fetch to the end of the update),
so evaluation and checkpointing between steps do not lower the reported throughput.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from typing import Optional

import torch

# Peak dense (no 2:4 sparsity) bf16/fp16 tensor-core FLOP/s per device, from the vendors' datasheets (which quote
# sparse numbers: those are halved here). Matched against torch.cuda.get_device_name(), lower-cased, in order:
# the first pattern that matches wins, so specific variants (PCIe, NVL) come before the generic name.
PEAK_FLOPS: tuple[tuple[str, str, float], ...] = (
    ("B200", r"\bb200\b", 2250e12),
    ("GH200", r"\bgh200\b", 989.5e12),
    ("H200 NVL", r"\bh200\b.*\bnvl\b", 835.5e12),
    ("H200 SXM", r"\bh200\b", 989.5e12),
    ("H100 NVL", r"\bh100\b.*\bnvl\b", 835.5e12),
    ("H100 PCIe", r"\bh100\b.*\bpcie\b", 756.5e12),
    ("H100 SXM", r"\bh100\b", 989.5e12),  # "NVIDIA H100 80GB HBM3"
    ("H800 PCIe", r"\bh800\b.*\bpcie\b", 756.5e12),
    ("H800 SXM", r"\bh800\b", 989.5e12),
    ("A100", r"\ba100\b", 312e12),  # SXM and PCIe, 40 and 80 GB: same tensor-core peak
    ("A800", r"\ba800\b", 312e12),
    ("A10G", r"\ba10g\b", 125e12),  # AWS variant of the A10; NVIDIA publishes no separate sheet
    ("A10", r"\ba10\b", 125e12),
    ("A30", r"\ba30\b", 165e12),
    ("A40", r"\ba40\b", 149.7e12),
    ("RTX A6000", r"\brtx a6000\b", 154.8e12),
    ("L40S", r"\bl40s\b", 362.05e12),
    ("L40", r"\bl40\b", 181.05e12),
    ("L4", r"\bl4\b", 121e12),
    ("RTX 4090", r"\brtx 4090\b", 165.2e12),  # fp16 with fp32 accumulation, as training uses
    ("RTX 3090", r"\brtx 3090\b", 71e12),
    ("V100S", r"\bv100s\b", 130e12),  # fp16 only: V100 and T4 have no bf16
    ("V100 PCIe", r"\bv100\b.*\bpcie\b", 112e12),
    ("V100 SXM", r"\bv100\b", 125e12),
    ("T4", r"\bt4\b", 65e12),
    ("MI300X", r"\bmi300x\b", 1307.4e12),
    ("MI250X", r"\bmi250x\b", 383e12),
)


def peak_flops(device_name: str) -> Optional[float]:
    """Peak dense bf16/fp16 FLOP/s for a CUDA device name, or None when the device is not in the table."""
    name = device_name.lower()
    for _, pattern, flops in PEAK_FLOPS:
        if re.search(pattern, name):
            return flops
    return None


def device_peak_flops(device: torch.device) -> Optional[float]:
    """Peak FLOP/s of this process's device; None on CPU (no meaningful peak) and on unknown GPUs."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def count_matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix multiplies: all of them except pure lookup tables.

    An nn.Embedding costs no FLOPs per token (it is an index), so its weight is excluded -- unless the same tensor
    is also used by another module, like a language-model head tied to the input embeddings, which is a real
    (vocab x hidden) matmul. Same convention as nanoGPT's `get_num_params(non_embedding=True)`.
    """
    lookup_ids, used_ids = set(), set()
    for module in model.modules():
        target = lookup_ids if isinstance(module, torch.nn.Embedding) else used_ids
        target.update(id(p) for p in module.parameters(recurse=False))
    excluded = lookup_ids - used_ids
    # DeepSpeed ZeRO-3 partitions parameters (numel() == 0 locally); ds_numel is the full size.
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters() if id(p) not in excluded)


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: float) -> float:
    """Training (forward + backward) model FLOPs per token: 6·N + 12·n_layers·d_model·seq_len.

    6·N: each matmul parameter does one multiply-add (2 FLOPs) per token forward, twice that backward.
    12·L·d·T: attention scores QK^T and the weighted sum AV, each 2·T·d FLOPs per token per layer forward
    (4·T·d), times 3 for forward + backward (PaLM, appendix B). Recomputation (gradient checkpointing) is not
    counted: this is MFU, not hardware FLOPs utilisation.
    """
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def model_dims(model: torch.nn.Module) -> tuple[int, int, int]:
    """(matmul parameters, layers, hidden size) of a transformers model; layers/hidden are 0 when unknown, which
    drops the attention term."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) or 0
    d_model = getattr(config, "hidden_size", None) or 0
    return count_matmul_params(model), int(n_layers), int(d_model)


def interval_metrics_from_totals(
    *,
    samples: float,
    tokens: float,
    steps: int,
    busy_seconds: float,
    busy_seconds_sum: float,
    data_wait_seconds_sum: float,
    num_processes: int,
    dims: tuple[int, int, int],
    peak_flops_sum: Optional[float],
) -> dict:
    """Turn counts already reduced over ranks into the logged metrics (pure, so it is testable by hand).

    samples/tokens: sums over ranks; busy_seconds: the slowest rank's step time (ranks wait for each other in
    every gradient all-reduce); busy_seconds_sum/data_wait_seconds_sum: sums over ranks; peak_flops_sum: sum of
    the devices' peaks, None when any device is unknown.
    """
    if steps <= 0 or busy_seconds <= 0:
        return {}
    out = {
        "samples_per_second": samples / busy_seconds,
        "tokens_per_second": tokens / busy_seconds,
        "step_time": busy_seconds / steps,
        "data_wait_fraction": data_wait_seconds_sum / busy_seconds_sum if busy_seconds_sum > 0 else 0.0,
    }
    n_params, n_layers, d_model = dims
    if samples > 0 and n_params > 0:
        # Mean non-padding length stands in for the sequence length in the attention term.
        flops_rate = flops_per_token(n_params, n_layers, d_model, tokens / samples) * tokens / busy_seconds
        out["tflops_per_device"] = flops_rate / num_processes / 1e12
        if peak_flops_sum:
            out["mfu"] = flops_rate / peak_flops_sum
    return out


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DataParallel / FSDP / DeepSpeed / torch.compile wrappers.

    Not `accelerator.unwrap_model`: that imports deepspeed whenever it is installed, which costs ~0.7 s and a
    log line in every run that does not use it. A DeepSpeedEngine can only exist once deepspeed is imported,
    so looking it up in sys.modules is exact.
    """
    wrappers = [torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel]
    if "deepspeed" in sys.modules:
        wrappers.append(sys.modules["deepspeed"].DeepSpeedEngine)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and hasattr(fsdp, "FullyShardedDataParallel"):
        wrappers.append(fsdp.FullyShardedDataParallel)
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    while isinstance(model, tuple(wrappers)):
        model = model.module
    return getattr(model, "_orig_mod", model)


class ThroughputMeter:
    def __init__(self, model, accelerator, peak_flops: Optional[float] = None):
        """peak_flops: override the table (FLOP/s of one device), e.g. for a GPU it does not list."""
        self.accelerator = accelerator
        self.dims = model_dims(unwrap_model(model))
        self.peak = peak_flops if peak_flops is not None else device_peak_flops(accelerator.device)
        self._reset()

    def _reset(self) -> None:
        self.samples = 0
        self.tokens = 0
        self._on_device: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.busy = 0.0
        self.wait = 0.0
        self._step_start: Optional[float] = None
        self._last_step_end = time.perf_counter()

    def data_wait(self, seconds: float) -> None:
        if self._step_start is None:
            # The first fetch of an update marks its start; time since the previous update (eval, save) is skipped.
            self._step_start = time.perf_counter() - seconds
        self.wait += seconds

    def add_batch(self, num_samples, num_tokens) -> None:
        """Counts as ints or as tensors (e.g. attention_mask.sum() on the GPU): tensors are summed on their
        device, so counting costs no host-device sync; they are read once per interval in interval_metrics."""
        for name, value in (("samples", num_samples), ("tokens", num_tokens)):
            if torch.is_tensor(value):
                value = value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64)
                pending = self._on_device.get(name)
                self._on_device[name] = value if pending is None else pending + value
            else:
                setattr(self, name, getattr(self, name) + int(value))

    def step_done(self) -> None:
        now = time.perf_counter()
        start = self._step_start if self._step_start is not None else self._last_step_end
        self.busy += now - start
        self.steps += 1
        self._step_start = None
        self._last_step_end = now

    def _local_peak_memory(self) -> tuple[str, float]:
        device = self.accelerator.device
        if device.type == "cuda":
            return "peak_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30
        return "peak_rss_gib", _peak_rss_bytes() / 2**30

    def interval_metrics(self) -> dict:
        """Collective: every rank must call it at the same step. Returns the same dict on all ranks."""
        mem_key, mem = self._local_peak_memory()
        device = self.accelerator.device
        if device.type == "cuda":
            # The step clock is the host's, and on a GPU the host runs ahead of the work it queues: the wait
            # until the queued updates have run belongs to them. (The loss read before this already waited.)
            torch.cuda.synchronize(device)  # Host-device sync point: once per log interval
            self.busy += time.perf_counter() - self._last_step_end
        # float64: token counts stay exact far beyond float32's 2**24 (MPS has no float64).
        dtype = torch.float32 if device.type == "mps" else torch.float64
        sums = torch.tensor(
            [self.samples, self.tokens, self.busy, self.wait, self.peak or 0.0, 0.0 if self.peak else 1.0],
            dtype=dtype, device=device,
        )
        for i, name in ((0, "samples"), (1, "tokens")):
            if name in self._on_device:
                sums[i] += self._on_device[name].to(device=device, dtype=dtype)
        maxes = torch.tensor([self.busy, mem, self.steps], dtype=dtype, device=device)
        # Host-device sync point: two small all-reduces, once per log interval.
        sums = self.accelerator.reduce(sums, reduction="sum").tolist()
        maxes = self.accelerator.reduce(maxes, reduction="max").tolist()
        samples, tokens, busy_sum, wait_sum, peak_sum, unknown_peaks = sums
        busy_max, mem_max, steps = maxes
        out = interval_metrics_from_totals(
            samples=samples, tokens=tokens, steps=int(steps), busy_seconds=busy_max, busy_seconds_sum=busy_sum,
            data_wait_seconds_sum=wait_sum, num_processes=self.accelerator.num_processes, dims=self.dims,
            peak_flops_sum=peak_sum if unknown_peaks == 0 else None,
        )
        if out:
            out[mem_key] = mem_max
        self._reset()
        return out
