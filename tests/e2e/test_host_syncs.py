"""No host-device sync in the training step (GPU issue, item 3).

On a GPU every read of a device tensor from Python (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`)
makes the host wait until the GPU has finished all the work queued so far, so the next update cannot be queued
while this one runs. Between two logging steps an update must read nothing: loss, grad norm and the finite flag
stay on the device and are read once per logging step. This CPU test counts the reads that scaletune's step
makes by wrapping the tensor methods that read, over 20 updates with logging_steps 10.

Not counted, by design:
- reads inside the DataLoader (its batches are host tensors on any machine, moved to the device afterwards);
- reads inside torch.optim (a non-capturable optimizer keeps its step counts as host tensors on any machine);
- the one read of `distributed.clip_gradients`' host branch, which compares the clipping coefficient only where
  the gradients are host tensors (one process or DDP on CPU) and which a GPU never takes.

Counted apart: transformers' own read in the model's forward. Its sdpa mask helper asks `padding_mask.all()`
(masking_utils) to skip building a mask when nothing is padded: one sync per micro-batch on a GPU, inside the
model, which Trainer and a bare loop pay alike; under `torch_compile` it is traced away. The test pins it to
that one place, so any other read in the forward shows up.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
HOST_BY_DESIGN = (f"{Path('torch') / 'utils' / 'data'}", f"{Path('torch') / 'optim'}")


@pytest.fixture
def read_log(monkeypatch):
    """Events in order: ('update', step) before each update and ('read', where) for each counted read."""
    from scaletune import stepper

    events: list = []

    def counted(name, original):
        def read(self, *args, **kwargs):
            stack = traceback.extract_stack()[:-1]
            if not any(part in frame.filename for frame in stack for part in HOST_BY_DESIGN):
                site = next((f for f in reversed(stack) if "scaletune" in f.filename), stack[-1])
                where = f"{Path(site.filename).name}:{site.name}:{site.lineno} .{name}"
                if any(f"{Path('transformers') / 'masking_utils.py'}" in frame.filename for frame in stack):
                    where = f"transformers masking_utils (in {where})"
                events.append(("read", where))
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    real_update = stepper.Stepper.update
    updates = iter(range(1, 10**6))

    def update(self, window):
        events.append(("update", next(updates)))
        return real_update(self, window)

    monkeypatch.setattr(stepper.Stepper, "update", update)
    return events


def reads_after_each_update(events: list) -> dict:
    """{update number: the reads made from its start until the next update's start}."""
    out, current = {}, None
    for kind, value in events:
        if kind == "update":
            current = value
            out[current] = []
        elif current is not None:
            out[current].append(value)
    return out


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_an_update_reads_nothing_from_the_device_between_logging_steps(read_log, precision, tiny_bert,
                                                                       sentiment_files, tmp_path,
                                                                       fresh_accelerate_state):
    from scaletune.train import run

    run({"model_name_or_path": tiny_bert, "train_file": sentiment_files["train_file"], "output_dir": str(tmp_path),
         "max_steps": 20, "logging_steps": 10, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
         "max_grad_norm": 1.0, "save_strategy": "no", "eval_strategy": "no", "do_eval": False,
         "do_predict": False, "bf16": precision == "bf16", "disable_tqdm": True, "report_to": "none",
         "validation_split_percentage": 0})
    per_update = reads_after_each_update(read_log)
    assert sorted(per_update) == list(range(1, 21))
    host_branch = [r for reads in per_update.values() for r in reads if ":clip_gradients:" in r]
    assert len(host_branch) == 20  # the CPU-only comparison, once per update (see the module docstring)
    in_model = [r for reads in per_update.values() for r in reads if r.startswith("transformers masking_utils")]
    assert len(in_model) == 20 * 2  # one per micro-batch forward (2 per window), transformers' own
    extra = {step: [r for r in reads if ":clip_gradients:" not in r and not r.startswith("transformers masking")]
             for step, reads in per_update.items()}
    logging = {step: reads for step, reads in extra.items() if step in (10, 20)}
    between = {step: reads for step, reads in extra.items() if reads and step not in (10, 20)}
    assert not between, f"device reads inside the step, between logging steps: {between}"
    assert all(logging.values()), "the logging steps read the loss, grad norm and flag: the count must see them"


def test_a_nonfinite_update_read_later_is_still_named_and_never_saved(tiny_bert, sentiment_files, tmp_path):
    """The flag is read at logging steps (every 5 here), not after each update: the run stops there, names
    the first non-finite update, and the save planned in between is never written (its read comes first)."""
    from scaletune.errors import NonFiniteError
    from scaletune.train import run

    job = {"model_name_or_path": tiny_bert, "train_file": sentiment_files["train_file"], "max_steps": 12,
           "learning_rate": 1e30,  # the first update sends the weights near 1e30: every later loss is NaN
           "save_strategy": "steps", "save_steps": 3, "eval_strategy": "no", "do_eval": False, "do_predict": False,
           "disable_tqdm": True, "report_to": "none", "validation_split_percentage": 0}
    with pytest.raises(NonFiniteError) as every_update:
        run({**job, "output_dir": str(tmp_path / "every"), "logging_steps": 1})
    with pytest.raises(NonFiniteError) as every_fifth:
        run({**job, "output_dir": str(tmp_path / "fifth"), "logging_steps": 5})
    assert str(every_update.value).startswith("Stopped at step 2: the loss or gradient norm became NaN or infinite;")
    assert str(every_fifth.value).startswith("Stopped at step 3: the loss or gradient norm became NaN or infinite "
                                             "at step 2 (read at this step's logging, evaluation or save)")
    assert not list((tmp_path / "fifth").glob("checkpoint-*")) and not list((tmp_path / "every").glob("checkpoint-*"))
