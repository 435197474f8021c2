"""The fast path: the training step's forward and loss compiled as one function, liger's fused linear
cross-entropy for causal LMs, and the per-device defaults (TF32) that make a GPU run fast without changing what
a CPU run computes.

`torch_compile` compiles `forward + loss` (not the model alone, as accelerate's TorchDynamoPlugin does), so the
loss -- the log-softmax over the vocabulary for token tasks -- is fused with the head that produces its logits.
Evaluation stays eager: it runs the model, not this function.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Mapping, Optional

from .distributed.backend import Backend
from .errors import ConfigError
from .losses import model_inputs


def compiles_step(training, env: Mapping[str, str] = os.environ) -> bool:
    """Whether `torch_compile` compiles the step function (True) or is left to accelerate's model-only compile
    (the backend owns its forward: `Backend.compiles_step`)."""
    return training.torch_compile and Backend.requested(env).compiles_step


def step_loss_function(model, loss, fused_loss: bool = False) -> Callable:
    """A micro-batch's summed loss from (batch, window item count): the model's forward and the task loss.

    `fused_loss`: the model computes the loss itself from its hidden states (liger's fused linear
    cross-entropy, a chunk of rows at a time: no B x T x V logits). Given `num_items_in_batch` it returns the
    sum over the next-token items divided by that count -- ShiftedCrossEntropy's numbers -- so times the
    count is the sum the loop normalises (§17)."""
    if fused_loss:
        def fused_step_loss(batch: dict, window_items):
            outputs = model(**model_inputs(batch), labels=batch["labels"], num_items_in_batch=window_items)
            return outputs.loss * window_items

        return fused_step_loss

    def step_loss(batch: dict, window_items):
        outputs = model(**model_inputs(batch))
        return loss.batch_sum(outputs, batch["labels"], window_items)

    return step_loss


def build_step_loss(model, loss, training, print_fn: Callable = print) -> Callable:
    """The step's loss function, compiled when the config asks for it and the backend allows it."""
    fn = step_loss_function(model, loss, fused_loss=training.use_liger_kernel)
    if not compiles_step(training):
        return fn
    return CompiledStepLoss(fn, training.torch_compile_mode, print_fn)


class CompiledStepLoss:
    """`torch.compile` of the step's loss function; after its first call, one line says how many graphs the
    step became and why it broke (once per run, not per step)."""

    def __init__(self, fn: Callable, mode: Optional[str], print_fn: Callable):
        import torch

        # Batches are padded to their longest example, so the sequence length changes from step to step. It is
        # marked dynamic before the first call (`maybe_mark_dynamic`: a model that specialises on it just gets
        # a static graph); other dimensions stay static until they change (dynamic=None: a last, shorter batch
        # recompiles once with a symbolic batch size). Measured on the 50-step test job (varying lengths, a last
        # batch of 3; 2 cores, cold cache): 2 graphs, ~105 s; dynamic=None alone: 3 graphs, ~160 s.
        self.compiled = torch.compile(fn, mode=None if mode == "default" else mode, dynamic=None)
        self.print_fn = print_fn
        self.reported = False

    def __call__(self, batch: dict, window_items):
        import torch

        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(value, 1)
        if self.reported:
            return self.compiled(batch, window_items)
        from torch._dynamo.utils import counters

        breaks_before = dict(counters["graph_break"])
        graphs_before = counters["stats"]["unique_graphs"]
        out = self.compiled(batch, window_items)
        breaks = {reason: n - breaks_before.get(reason, 0) for reason, n in counters["graph_break"].items()
                  if n > breaks_before.get(reason, 0)}
        self.print_fn(graph_break_line(counters["stats"]["unique_graphs"] - graphs_before, breaks), flush=True)
        self.reported = True
        return out


def graph_break_line(graphs: int, breaks: dict) -> str:
    """The one line a compiled run prints about its step: whole, or how many graphs and the break reasons."""
    if not breaks:
        return f"scaletune: torch_compile: the training step (forward + loss) compiled as {graphs} graph(s), " \
               f"no graph break."
    reasons = "; ".join(f"{reason.splitlines()[0][:160]} (x{n})" for reason, n in
                        sorted(breaks.items(), key=lambda kv: -kv[1])[:3])
    more = f"; and {len(breaks) - 3} more reason(s)" if len(breaks) > 3 else ""
    return (f"scaletune: torch_compile: the training step (forward + loss) compiled as {graphs} graphs, "
            f"{sum(breaks.values())} graph break(s): {reasons}{more}.")


def resolve_tf32(requested: Optional[bool], cuda_capability: Optional[tuple]) -> Optional[bool]:
    """TF32 matmuls: the user's explicit choice, else on for an Ampere or newer GPU (`cuda_capability` major >= 8);
    None (torch's default untouched) on a CPU or an older GPU, so CPU runs compute exactly what they did.
    `cuda_capability`: the device's (major, minor), or None without CUDA."""
    ampere = cuda_capability is not None and cuda_capability[0] >= 8
    if requested and not ampere:
        raise ConfigError("tf32=true needs an Ampere or newer NVIDIA GPU; this machine has none: unset tf32.")
    if requested is None:
        return True if ampere else None
    return requested


LIGER_REQUIREMENT = "liger-kernel==0.8.5"


def check_liger_kernel(training, cuda_available: Optional[bool] = None, installed: Optional[bool] = None) -> None:
    """use_liger_kernel before the model loads: liger's kernels are Triton kernels for NVIDIA GPUs, in a package
    of their own (the `liger` extra). None: look at this machine."""
    if not training.use_liger_kernel:
        return
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise ConfigError("use_liger_kernel=true needs an NVIDIA GPU (liger's kernels are Triton CUDA kernels); "
                          "this machine has none: set use_liger_kernel=false.")
    if installed is None:
        installed = importlib.util.find_spec("liger_kernel") is not None
    if not installed:
        raise ConfigError(f"use_liger_kernel=true needs the liger-kernel package: pip install "
                          f"'scaletune[liger]' ({LIGER_REQUIREMENT}), or set use_liger_kernel=false.")


def apply_liger_kernel(model) -> None:
    """Trainer's use_liger_kernel (liger's default kernels for the architecture, fused linear cross-entropy
    among them), refused in one line for an architecture liger has no kernels for -- where liger itself only
    logs a warning and the run would go on unfused."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers.integrations.liger import apply_liger_kernel as apply

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"use_liger_kernel=true, but liger has no kernels for model type {model_type!r} "
                          f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}): set use_liger_kernel=false.")
    apply(model, None)
