"""`distributed.Backend`: the one object every module asks about the backend -- which one the launcher asked for
(before torch), which one the built Accelerator runs, and what each one does itself."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from scaletune.distributed.backend import Backend


@pytest.mark.parametrize("env, kind, world_size", [
    ({}, "single", 1),
    ({"WORLD_SIZE": "1"}, "single", 1),
    ({"WORLD_SIZE": "4"}, "ddp", 4),
    ({"ACCELERATE_USE_DEEPSPEED": "false", "ACCELERATE_USE_FSDP": "false", "WORLD_SIZE": "2"}, "ddp", 2),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}, "deepspeed", 2),
    ({"ACCELERATE_USE_DEEPSPEED": "True"}, "deepspeed", 1),  # one process under DeepSpeed is still DeepSpeed
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}, "fsdp2", 2),
    # both asked: DeepSpeed, as accelerate decides
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "deepspeed", 2),
])
def test_requested_reads_the_launchers_environment(env, kind, world_size):
    backend = Backend.requested(env)
    assert (backend.kind, backend.world_size) == (kind, world_size)
    # Before the Accelerator nothing knows the ZeRO stage or the device.
    assert backend.zero_stage is None and backend.device_type is None


@pytest.mark.slow  # a subprocess: this one's imports are already loaded
def test_requested_imports_no_torch():
    code = ("import sys; from scaletune.distributed import Backend; "
            "b = Backend.requested({'ACCELERATE_USE_DEEPSPEED': 'true', 'WORLD_SIZE': '2'}); "
            "assert b.is_deepspeed and not b.compiles_step; "
            "print(sorted(m for m in ('torch', 'accelerate', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_of_a_one_process_cpu_accelerator(accelerator):
    assert Backend.of(accelerator) == Backend("single", 1, None, "cpu")


def accelerator_like(distributed_type: str, processes: int, device: str = "cpu", stage=None, fsdp2=False):
    """What `Backend.of` reads of an Accelerator, for the backends a unit test cannot build."""
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}}) if stage is not None else None
    return SimpleNamespace(distributed_type=DistributedType[distributed_type], num_processes=processes,
                           device=SimpleNamespace(type=device), is_fsdp2=fsdp2,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("built, expected", [
    (accelerator_like("MULTI_CPU", 2), Backend("ddp", 2, None, "cpu")),
    (accelerator_like("MULTI_GPU", 8, "cuda"), Backend("ddp", 8, None, "cuda")),
    (accelerator_like("NO", 1, "cuda"), Backend("single", 1, None, "cuda")),
    (accelerator_like("DEEPSPEED", 2, stage=3), Backend("deepspeed", 2, 3, "cpu")),
    (accelerator_like("DEEPSPEED", 1, "cuda", stage=0), Backend("deepspeed", 1, 0, "cuda")),
    (accelerator_like("FSDP", 2, "cuda", fsdp2=True), Backend("fsdp2", 2, None, "cuda")),
    (accelerator_like("FSDP", 2, fsdp2=True), Backend("fsdp2", 2, None, "cpu")),  # FSDP2 over gloo (the CPU switch)
])
def test_of_reads_the_kind_stage_and_device_of_a_built_accelerator(built, expected):
    assert Backend.of(built) == expected


CAPABILITIES = ("is_deepspeed", "is_fsdp", "is_zero3", "shards_parameters", "engine_saves", "compiles_step",
                "host_clipping", "skips_nonfinite", "unpickles_checkpoints", "accumulates_in_engine",
                "runs_fp16_itself")
DEEPSPEED = dict(is_deepspeed=True, engine_saves=True, unpickles_checkpoints=True, accumulates_in_engine=True,
                 runs_fp16_itself=True)


@pytest.mark.parametrize("backend, answers", [
    (Backend("single", 1), dict(compiles_step=True, host_clipping=True, skips_nonfinite=True)),
    # on a GPU, testing the clipping coefficient on the host would wait for the device
    (Backend("single", 1, device_type="cuda"), dict(compiles_step=True, skips_nonfinite=True)),
    (Backend("ddp", 2), dict(compiles_step=True, host_clipping=True, skips_nonfinite=True)),
    (Backend("ddp", 8, device_type="cuda"), dict(compiles_step=True, skips_nonfinite=True)),
    (Backend("deepspeed", 2, zero_stage=2), DEEPSPEED),
    (Backend("deepspeed", 2, zero_stage=3), dict(DEEPSPEED, is_zero3=True, shards_parameters=True)),
    (Backend("fsdp2", 2), dict(is_fsdp=True, shards_parameters=True, engine_saves=True, skips_nonfinite=True)),
    (Backend("fsdp2", 2, device_type="cuda"), dict(is_fsdp=True, shards_parameters=True, engine_saves=True,
                                                  skips_nonfinite=True)),
])
def test_what_each_backend_does_itself(backend, answers):
    assert {name: getattr(backend, name) for name in CAPABILITIES} == {name: answers.get(name, False)
                                                                      for name in CAPABILITIES}


def test_a_backend_kind_outside_the_four_is_a_programming_error():
    with pytest.raises(ValueError, match="'zero'"):
        Backend("zero", 2)
