"""What `./launch` needs before it starts processes: `python -m scaletune.launch_plan --accelerate_config FILE
[launcher options] -- [CONFIG] [--key value ...]` resolves the training config as `scaletune.train` would (a
bad one fails here, before any process starts), reads the Accelerate config, and prints shell assignments:
the topology, the global batch size and the command-line pieces. No torch import: it runs before every launch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional

from .config import ConfigError


def visible_gpus(env: Mapping[str, str] = os.environ) -> int:
    """GPUs this launch may use, without importing torch: CUDA_VISIBLE_DEVICES if set, else nvidia-smi."""
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        ids = [d for d in mask.split(",") if d.strip()]
        return 0 if not ids or ids[0].strip() == "-1" else len(ids)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class LaunchError(ConfigError):
    """A launcher option or accelerate config that `./launch` cannot turn into a command."""


def accelerate_config_arg(arg: str, repo: str) -> Optional[str]:
    """The accelerate config `arg` names, else None: a preset of REPO/accelerate_configs or a YAML file with a
    `distributed_type:` line (so a training config file given first is not mistaken for one). What a cluster
    entry (slurm/train.sh, scaletune.k8s) reads as its optional first argument."""
    if arg.startswith("-"):
        return None
    preset = os.path.join(repo, "accelerate_configs", f"{arg}.yaml")
    if os.path.isfile(preset):
        return arg
    try:
        with open(arg) as f:
            return os.path.abspath(arg) if any(line.startswith("distributed_type:") for line in f) else None
    except (OSError, UnicodeDecodeError):
        return None


def cluster_preset(args: list[str], env: Mapping[str, str], repo: str, machines: int,
                   per_machine: int) -> tuple[str, list[str]]:
    """(PRESET, the other arguments) of a cluster entry's command line (slurm/train.sh, scaletune.k8s): the
    first argument if it names an accelerate config, else $ACCELERATE_CONFIG (which must name one), else
    single_gpu, multi_gpu or multi_node by the node and process counts."""
    given = accelerate_config_arg(args[0], repo) if args else None
    if given is not None:
        return given, list(args[1:])
    named = env.get("ACCELERATE_CONFIG")
    if named:
        preset = accelerate_config_arg(named, repo)
        if preset is None:
            configs = os.listdir(os.path.join(repo, "accelerate_configs"))
            presets = sorted(f[:-len(".yaml")] for f in configs if f.endswith(".yaml"))
            raise LaunchError(f"accelerate config '{named}' is neither a preset nor a file with distributed_type:; "
                              f"presets: {' '.join(presets)}")
        return preset, list(args)
    return ("multi_node" if machines > 1 else "multi_gpu" if per_machine > 1 else "single_gpu"), list(args)


def whole_number(name: str, value) -> Optional[int]:
    if value is None or value == "":
        return None
    if not str(value).isdigit():
        raise LaunchError(f"{name} must be a whole number, got '{value}'.")
    return int(value)


def take_options(argv: list[str], valued: tuple[str, ...], flags: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """An entry's own options taken out of its command line, the rest kept in order: the training arguments it
    passes on (`python -m scaletune.search`, `.ray`, `.k8s`). `--name value` or `--name=value` for `valued`,
    a bare `--name` for `flags`; `-` or `_` in a name. Values stay strings: the entry checks them."""
    opts: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        head, eq, value = argv[i].partition("=")
        name = head[2:].replace("-", "_") if head.startswith("--") else None
        if name in flags and not eq:
            opts[name] = True
        elif name in valued:
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                value = argv[i]
            if not value:  # none given, `--name=`, or `--name ""`: never a default in its place
                raise LaunchError(f"--{name} needs a value.")
            opts[name] = value
        else:
            rest.append(argv[i])
        i += 1
    return opts, rest


def launch_plan(opts: Mapping[str, Optional[str]], training, env: Mapping[str, str] = os.environ,
                gpus: Optional[int] = None) -> dict:
    """Every value `./launch` needs for its `accelerate launch` command, decided in one place.

    `opts`: the launcher options by name (accelerate_config, repo, cpu, num_processes, mixed_precision,
    num_machines, machine_rank, main_process_ip, main_process_port; None when not given). Unset topology falls
    back to SLURM_NNODES / SLURM_NODEID / MASTER_ADDR / MASTER_PORT (empty counts as unset), then to the
    accelerate config, read with yaml.safe_load. A combination that cannot run is a LaunchError naming the fix.
    """
    import yaml

    def first(*values):
        return next((v for v in values if v is not None and v != ""), None)

    cpu, nproc = whole_number("--cpu", opts.get("cpu")), whole_number("--num_processes", opts.get("num_processes"))
    mixed = opts.get("mixed_precision")
    if mixed is not None and mixed not in ("no", "bf16", "fp16"):
        raise LaunchError(f"--mixed_precision must be no, bf16 or fp16, got '{mixed}'.")
    config_file = opts["accelerate_config"]
    try:
        with open(config_file) as f:
            acc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LaunchError(f"cannot read the accelerate config {config_file}: {' '.join(str(e).split())}") from None
    if not isinstance(acc, dict):
        raise LaunchError(f"the accelerate config {config_file} must be a YAML mapping (distributed_type: ...).")
    # YAML reads an unquoted NO as false; accelerate means "no distribution" by either spelling.
    distributed_type = "NO" if acc.get("distributed_type") is False else str(acc.get("distributed_type", ""))
    if cpu is not None and cpu < 1:
        raise LaunchError("--cpu needs at least 1 process.")
    if cpu is not None and nproc is not None and nproc != cpu:
        raise LaunchError("give either --cpu N or --num_processes N, not both.")

    machines = whole_number("--num_machines", first(opts.get("num_machines"), env.get("SLURM_NNODES"),
                                              acc.get("num_machines"), 1))
    if machines < 1:
        raise LaunchError("--num_machines must be at least 1.")
    multi_machine, rank, ip = machines > 1, 0, None
    # One machine: port 0 lets accelerate pick a free one, so two launches on a machine do not collide.
    port = whole_number("--main_process_port", first(opts.get("main_process_port"), env.get("MASTER_PORT"),
                                               acc.get("main_process_port") if multi_machine else 0))
    if multi_machine:
        rank = whole_number("--machine_rank", first(opts.get("machine_rank"), env.get("SLURM_NODEID"), 0))
        ip = first(opts.get("main_process_ip"), env.get("MASTER_ADDR"), acc.get("main_process_ip"))
        if rank >= machines:
            raise LaunchError(f"--machine_rank {rank} is not below --num_machines {machines}.")
        if ip is None:
            raise LaunchError("multi-machine launch needs --main_process_ip (the host of machine_rank 0) or "
                              "MASTER_ADDR.")
        if port is None:
            raise LaunchError("multi-machine launch needs --main_process_port or MASTER_PORT.")

    gpus = visible_gpus(env) if gpus is None else gpus
    preset = os.path.splitext(os.path.basename(config_file))[0]
    per_machine = first(cpu, nproc, (1 if distributed_type == "NO" else gpus) if gpus > 0 else None)
    if per_machine is None:
        raise LaunchError(f"no GPU is visible. Use --cpu N to run N processes on CPU "
                          f"(e.g. ./launch {preset} --cpu 2 ...).")
    if per_machine < 1:
        raise LaunchError("--num_processes must be at least 1.")
    if cpu is None and 0 < gpus < per_machine:
        raise LaunchError(f"--num_processes {per_machine} is more than the {gpus} visible GPU(s).")
    if distributed_type == "NO" and per_machine > 1:
        raise LaunchError(f"preset '{preset}' runs one process; use multi_gpu (or a deepspeed_* preset) for "
                          f"{per_machine} processes.")
    if distributed_type == "MULTI_GPU" and per_machine == 1 and not multi_machine:
        raise LaunchError(f"preset '{preset}' needs at least 2 processes (found 1); use single_gpu for one process.")

    # A relative DeepSpeed JSON path: from the working directory, else from the repository (the presets' own
    # JSON). Made absolute, so ./launch works from any directory.
    ds_file = (acc.get("deepspeed_config") or {}).get("deepspeed_config_file") or "none"
    if ds_file != "none":
        found = next((p for p in (ds_file, os.path.join(opts.get("repo") or ".", ds_file)) if os.path.isfile(p)), None)
        if found is None:
            raise LaunchError(f"the DeepSpeed config file '{ds_file}' named in {config_file} does not exist.")
    total = per_machine * machines
    if distributed_type == "FSDP" and cpu is not None and total < 2:
        raise LaunchError(f"FSDP on CPU shards over processes and needs at least 2: use `./launch {preset} --cpu 2`, "
                          f"or single_gpu --cpu 1 for one process.")
    return {
        "DISTRIBUTED_TYPE": distributed_type, "VISIBLE_GPUS": gpus, "PROCESSES_PER_MACHINE": per_machine,
        "NUM_MACHINES": machines, "NUM_PROCESSES": total, "MULTI_MACHINE": int(multi_machine),
        "MACHINE_RANK": rank, "MAIN_PROCESS_IP": ip or "", "MAIN_PROCESS_PORT": port,
        # accelerate's CPU mode (gloo); not under DeepSpeed, which it would silently drop (scaletune runs
        # DeepSpeed on CPU over gloo by itself).
        "USE_CPU": int(cpu is not None and distributed_type != "DEEPSPEED"), "MIXED_PRECISION": mixed or "",
        # accelerate 1.15 has no FSDP on CPU and silently trains DDP there; this switch (SCALETUNE_FSDP_ON_CPU=1)
        # lets scaletune.distributed run real FSDP2 over gloo. Only with --cpu: a GPU launch never sees it.
        "FSDP_ON_CPU": int(cpu is not None and distributed_type == "FSDP"),
        "DEEPSPEED_CONFIG_FILE": os.path.abspath(found) if ds_file != "none" else "",
        "PER_DEVICE": training.per_device_train_batch_size, "ACCUMULATION": training.gradient_accumulation_steps,
        "GLOBAL_BATCH_SIZE": training.global_batch_size(total),
    }


def plan(argv: list[str]) -> int:
    """`plan --accelerate_config FILE [--repo DIR] [launcher options] -- [CONFIG] [--key value ...]`: what
    ./launch runs first. Resolves the training config as `scaletune.train` would and the topology
    (`launch_plan`), and prints every value the launch command needs as shell assignments (NAME='value').
    A bad config or an impossible topology is one `error:` line on stderr and exit code 2; no torch import.
    `plan --cluster_preset --repo DIR --num_machines N --num_processes P -- [FIRST_ARG]` prints PRESET and
    PRESET_GIVEN instead (cluster_preset, for slurm/train.sh)."""
    import argparse
    import shlex

    from .config import load_config

    sep = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m scaletune.launch_plan")
    parser.add_argument("--accelerate_config")
    for name in ("repo", "cpu", "num_processes", "mixed_precision", "num_machines", "machine_rank",
                 "main_process_ip", "main_process_port"):
        parser.add_argument(f"--{name}")
    # slurm/train.sh's PRESET: cluster_preset of its first argument, as PRESET and PRESET_GIVEN (1: shift it).
    parser.add_argument("--cluster_preset", action="store_true")
    opts = vars(parser.parse_args(argv[:sep]))
    try:
        if opts["cluster_preset"]:
            first = argv[sep + 1:sep + 2]
            preset, rest = cluster_preset(first, os.environ, opts["repo"] or ".",
                                          whole_number("--num_machines", opts["num_machines"]) or 1,
                                          whole_number("--num_processes", opts["num_processes"]) or 1)
            print(f"PRESET={shlex.quote(preset)}\nPRESET_GIVEN={len(first) - len(rest)}")
            return 0
        if not opts["accelerate_config"]:
            parser.error("--accelerate_config is required")
        values = launch_plan(opts, load_config(argv[sep + 1:]).training)
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"scaletune: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(f"{name}={shlex.quote(str(value))}" for name, value in values.items()))
    return 0


def scaletune_home(env: Mapping[str, str] = os.environ) -> Path:
    """The checkout with ./launch: $SCALETUNE_HOME, else the one this package is installed from (editable)."""
    home = Path(env.get("SCALETUNE_HOME") or Path(__file__).resolve().parents[2])
    if not (home / "launch").is_file():
        raise LaunchError(f"cannot find the scaletune checkout (no {home / 'launch'}); set SCALETUNE_HOME to it "
                          f"(a TrainJob: in its trainer.env).")
    return home


if __name__ == "__main__":
    sys.exit(plan(sys.argv[1:]))
