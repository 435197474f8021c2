"""./launch: preset -> accelerate command, process count from the visible GPUs or --cpu, global batch, errors.

Everything here is `--dry-run` or fails before launching, so it runs in a second; the launched runs are in
tests/e2e/test_scale_out.py. GPUs are simulated with CUDA_VISIBLE_DEVICES, which is what ./launch counts (as torch does).
"""

from __future__ import annotations

import shlex
import sys

import pytest

from support.tiny import REPO, run_cli

LAUNCH = str(REPO / "launch")
PRESETS = sorted(p.stem for p in (REPO / "accelerate_configs").glob("*.yaml"))
TRAIN = ["--train_file", "train.csv", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3"]


def launch(*args, env=None, check=True, cwd=None):
    full_env = {"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "SLURM_NNODES": "", "SLURM_NODEID": "",
                "MASTER_ADDR": "", "MASTER_PORT": "", **(env or {})}
    # Empty values stand for "unset" in ./launch (${VAR:-default}), so the host's SLURM/GPU settings do not leak in.
    return run_cli([LAUNCH, *args], env=full_env, check=check, cwd=cwd or REPO, timeout=60)


def dry_run(*args, env=None, cwd=None) -> tuple[str, list[str]]:
    """(summary line, command words) of a dry run."""
    out = launch(*args, "--dry-run", env=env, cwd=cwd).stdout.splitlines()
    assert out[1].startswith("command: ")
    return out[0], shlex.split(out[1][len("command: "):])


def opt(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_help_lists_every_preset():
    out = launch("--help").stdout
    for preset in PRESETS:
        assert preset in out
    assert "--dry-run" in out and "--cpu N" in out


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_dry_run_prints_global_batch_and_the_command():
    summary, cmd = dry_run("deepspeed_zero2", "--cpu", "2", *TRAIN, "--max_steps", "5")
    assert summary == "global batch size: 24 = 4 per device x 3 accumulation x 2 processes"
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert opt(cmd, "--config_file") == str(REPO / "accelerate_configs" / "deepspeed_zero2.yaml")
    assert opt(cmd, "--num_processes") == "2"
    # the training arguments reach scaletune.train unchanged, in order
    assert cmd[cmd.index("scaletune.train") + 1:] == [*TRAIN, "--max_steps", "5"]
    # DeepSpeed on CPU must not get accelerate's CPU mode: it would silently train without DeepSpeed
    assert not any(w.startswith("ACCELERATE_USE_CPU") for w in cmd)


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_launcher_options_may_come_anywhere_and_cpu_mode_for_ddp():
    summary, cmd = dry_run("multi_gpu", *TRAIN, "--cpu", "2", "--mixed_precision", "bf16")
    assert cmd[0] == "ACCELERATE_USE_CPU=true"
    assert opt(cmd, "--mixed_precision") == "bf16" and opt(cmd, "--num_processes") == "2"
    assert "--cpu" not in cmd[cmd.index("scaletune.train"):]


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_processes_follow_the_visible_gpus():
    summary, cmd = dry_run("multi_gpu", *TRAIN, env={"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert opt(cmd, "--num_processes") == "3" and "ACCELERATE_USE_CPU=true" not in cmd
    assert summary.startswith("global batch size: 36 ")
    summary, cmd = dry_run("deepspeed_zero3", *TRAIN, "--num_processes", "2", env={"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert opt(cmd, "--num_processes") == "2"
    summary, cmd = dry_run("single_gpu", *TRAIN, env={"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert opt(cmd, "--num_processes") == "1"


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_multi_node_takes_its_topology_from_flags_or_slurm():
    summary, cmd = dry_run("multi_node", *TRAIN, "--num_machines", "2", "--machine_rank", "1",
                           "--main_process_ip", "node1", "--main_process_port", "12345",
                           env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert [opt(cmd, k) for k in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port",
                                  "--num_processes")] == ["2", "1", "node1", "12345", "8"]
    assert summary.endswith("x 8 processes (4 per machine x 2 machines)")
    env = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "MASTER_ADDR": "head", "MASTER_PORT": "23456",
           "CUDA_VISIBLE_DEVICES": "0,1"}
    _, cmd = dry_run("multi_node", *TRAIN, env=env)
    assert [opt(cmd, k) for k in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port",
                                  "--num_processes")] == ["3", "2", "head", "23456", "6"]


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_deepspeed_json_path_is_absolute_so_launch_works_from_any_directory(tmp_path):
    _, cmd = dry_run("deepspeed_zero3_offload", "--cpu", "2", *TRAIN, cwd=tmp_path)
    assert opt(cmd, "--deepspeed_config_file") == str(REPO / "accelerate_configs" / "deepspeed_zero3_offload.json")


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_a_path_to_your_own_accelerate_config_is_a_preset(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n")
    _, cmd = dry_run(str(own), "--cpu", "2", *TRAIN, cwd=tmp_path)
    assert opt(cmd, "--config_file") == str(own)


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
@pytest.mark.parametrize("args, env, message", [
    (["no_such_preset"], {}, "unknown preset 'no_such_preset'; one of: deepspeed_zero1"),
    ([], {}, "no PRESET given"),
    (["multi_gpu"], {}, "no GPU is visible. Use --cpu N"),
    (["single_gpu", "--cpu", "2"], {}, "runs one process; use multi_gpu"),
    (["multi_gpu", "--cpu", "1"], {}, "needs at least 2 processes"),
    (["multi_gpu", "--cpu", "two"], {}, "--cpu must be a whole number"),
    (["multi_gpu", "--num_processes", "4"], {"CUDA_VISIBLE_DEVICES": "0,1"}, "more than the 2 visible GPU(s)"),
    (["multi_node", "--cpu", "1", "--num_machines", "2", "--machine_rank", "2"], {}, "is not below --num_machines"),
    (["multi_node", "--cpu", "1"], {}, "multi-machine launch needs --main_process_ip"),
    (["multi_gpu", "--mixed_precision", "fp8", "--cpu", "2"], {}, "--mixed_precision must be no, bf16 or fp16"),
    # a bad training config fails in the launcher, before any process starts, with scaletune's message
    (["multi_gpu", "--cpu", "2", "--max_stepz", "3"], {}, "Unknown config key 'max_stepz'. Did you mean 'max_steps'?"),
])
def test_bad_input_is_a_clear_error_before_anything_starts(args, env, message):
    proc = launch(*args, *TRAIN, env=env, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "accelerate.commands.launch" not in proc.stdout
