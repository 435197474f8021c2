"""The fast path's rules (GPU issue, item 5): what torch_compile compiles under each backend, the TF32 default
per device, and the one line about graph breaks."""

from __future__ import annotations

import pytest

from scaletune.config import load_config
from scaletune.errors import ConfigError
from scaletune.fast_path import compiles_step, graph_break_line, resolve_tf32


@pytest.mark.parametrize("requested, capability, expected", [
    (None, None, None),          # CPU: torch's default untouched, so CPU losses do not change
    (None, (7, 0), None),        # a V100 has no TF32
    (None, (8, 0), True),        # A100: on by default
    (None, (9, 0), True),        # H100/H200
    (False, (9, 0), False),      # the user's explicit choice is kept
    (True, (8, 6), True),
    (False, None, False),
])
def test_tf32_is_on_by_default_on_ampere_or_newer_only(requested, capability, expected):
    assert resolve_tf32(requested, capability) == expected


@pytest.mark.parametrize("capability", [None, (7, 5)])
def test_tf32_true_without_an_ampere_gpu_is_one_line(capability):
    with pytest.raises(ConfigError, match="tf32=true needs an Ampere or newer NVIDIA GPU"):
        resolve_tf32(True, capability)


def test_torch_compile_compiles_the_step_except_where_the_backend_owns_the_forward():
    on = load_config({"train_file": "x.csv", "torch_compile": True}).training
    off = load_config({"train_file": "x.csv"}).training
    assert compiles_step(on, env={}) and not compiles_step(off, env={})
    # DeepSpeed and FSDP2: accelerate's model-only compile (engine.compile / compile of the sharded model).
    assert not compiles_step(on, env={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert not compiles_step(on, env={"ACCELERATE_USE_FSDP": "true"})


def test_graph_break_line_names_the_graphs_and_the_commonest_reasons():
    assert graph_break_line(1, {}) == ("scaletune: torch_compile: the training step (forward + loss) compiled as "
                                       "1 graph(s), no graph break.")
    line = graph_break_line(3, {"call_function print\nmore detail": 2, "data-dependent branch": 1})
    assert "\n" not in line and "3 graphs, 3 graph break(s)" in line
    assert line.index("call_function print (x2)") < line.index("data-dependent branch (x1)")


def test_liger_kernel_is_refused_in_one_line_where_it_cannot_run():
    from scaletune.fast_path import check_liger_kernel

    clm = {"train_file": "x.txt", "task": "clm", "use_liger_kernel": True}
    t = load_config(clm).training
    with pytest.raises(ConfigError, match="use_liger_kernel=true needs an NVIDIA GPU"):
        check_liger_kernel(t)  # this machine: no CUDA
    with pytest.raises(ConfigError, match=r"pip install 'scaletune\[liger\]' \(liger-kernel==0.8.5\)"):
        check_liger_kernel(t, cuda_available=True, installed=False)
    check_liger_kernel(t, cuda_available=True, installed=True)
    check_liger_kernel(load_config({"train_file": "x.txt", "task": "clm"}).training, cuda_available=False)
    # At config time: liger patches causal-LM architectures only, and its fused loss has no label smoothing here.
    with pytest.raises(ConfigError, match="use_liger_kernel=true is for task clm"):
        load_config({**clm, "task": "mlm"})
    with pytest.raises(ConfigError, match="set label_smoothing_factor=0 or use_liger_kernel=false"):
        load_config({**clm, "label_smoothing_factor": 0.1})


def test_liger_kernel_with_a_compute_loss_func_is_refused_before_anything_loads(tmp_path):
    """liger's loss is computed inside the model: a user's compute_loss_func would silently go unused."""
    from scaletune.dropin import UserParts
    from scaletune.train import preflight

    cfg = load_config({"train_file": "x.txt", "task": "clm", "use_liger_kernel": True,
                       "output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="compute_loss_func passed to run\\(\\) would not be used"):
        preflight(cfg, UserParts(compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0))
    assert not (tmp_path / "out").exists()


def test_the_fused_step_loss_is_the_sum_the_loop_normalises(tmp_path):
    """With liger the model computes the loss itself (its forward with labels and `num_items_in_batch`: the sum
    over next-token items divided by that count, as transformers' own causal-LM loss, whose contract liger's
    forward keeps). Here without liger, on a real tiny Llama: the same sum as the task's loss from the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from scaletune.fast_path import step_loss_function
    from scaletune.tasks.clm import ShiftedCrossEntropy
    from support.ner_clm import make_tiny_llama

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama"))
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 7))
    labels = ids.clone()
    labels[1, 4:] = -100  # a shorter example
    batch = {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}
    window_items = torch.tensor(20.0)  # the window's other micro-batches count too
    fused = step_loss_function(model, None, fused_loss=True)(batch, window_items)
    from_logits = step_loss_function(model, ShiftedCrossEntropy())(batch, window_items)
    assert fused.item() == pytest.approx(from_logits.item(), rel=1e-5)
