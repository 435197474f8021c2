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
