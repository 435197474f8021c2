#!/bin/bash
# scaletune on a SLURM cluster: one srun task per node, each running `./launch` (= accelerate launch) for the
# processes of that node.
#
#   sbatch slurm/train.sh [PRESET] [CONFIG] [--key value ...]
#
#   sbatch slurm/train.sh my_job.yaml --output_dir /scratch/$USER/run1            # 1 node x 8 GPUs, DDP
#   sbatch --nodes=4 --partition=gpu --time=04:00:00 slurm/train.sh my_job.yaml --max_steps 20000
#   sbatch --nodes=2 slurm/train.sh deepspeed_zero3 my_job.yaml --bf16            # a preset, as ./launch
#
# PRESET (optional) is an accelerate_configs/ name or an accelerate config file (one with distributed_type:);
# everything else goes to `python -m scaletune.train` (a config file and/or --key value).
# Submit with the Python environment that has scaletune installed activated: the job inherits it.
#
# The #SBATCH lines below are defaults. Options on the sbatch command line override them, and so do sbatch's
# SBATCH_* variables (SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_GPUS_PER_NODE, SBATCH_ACCOUNT, SBATCH_QOS, ...).
# Variables read by this script:
#   ACCELERATE_CONFIG  the preset when none is given as the first argument (default: single_gpu, multi_gpu
#                      or multi_node, from the process and node counts)
#   NPROC_PER_NODE     training processes per node (default: the GPUs allocated per node; without GPUs 1,
#                      and the job trains on CPU)
#   MAIN_PORT          rendezvous port on the first node (default: derived from the job id)
#   PYTHON             interpreter with scaletune installed (default: python on PATH)
#   SCALETUNE_HOME     the scaletune checkout (default: found from the submitted script's path)
#
# Preemption and time limits: on SIGUSR1 (sent 300 s before the time limit, --signal) or SIGTERM (preemption,
# scancel) every rank stops after the same update and a complete checkpoint is written. A job still RUNNING then
# requeues itself (--requeue); the next attempt resumes from the latest complete checkpoint, in the same W&B run.
# See docs/slurm.md.
#
#SBATCH --job-name=scaletune
#SBATCH --nodes=1
# One task per node: it starts one training process per GPU of its node.
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
# USR1 to the job step's processes (no B: prefix, so not only to this shell) 300 s before the time limit.
#SBATCH --signal=USR1@300
#SBATCH --requeue
# A requeued attempt appends to the same log.
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

die() { echo "scaletune: error: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job: submit it with \`sbatch slurm/train.sh ...\`" \
    "(on one machine use ./launch)."

# Installed first: a signal that reaches this shell before the step starts must not kill the job.
# USR1 sent to the batch shell only (--signal=B:USR1@N, scancel --batch) is forwarded to the training processes.
# TERM is not forwarded: Slurm sends it to the job step itself, and srun would answer it by killing the step.
# Trapping it keeps this shell, and the job log, alive while the step writes its checkpoint.
srun_pid=
trap 'echo "scaletune: batch shell received USR1; forwarding it to the job step" >&2
      [[ -n "$srun_pid" ]] && kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
trap 'echo "scaletune: batch shell received TERM; waiting for the job step to finish" >&2' TERM

PYTHON=${PYTHON:-python}
export PYTHON PYTHONUNBUFFERED=1
attempt=${SLURM_RESTART_COUNT:-0}

# sbatch runs a copy of this script from the spool directory: find the checkout from the submitted path.
submitted=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o ' Command=[^ ]*' | cut -d= -f2 || true)
home=${SCALETUNE_HOME:-$( [[ -n "$submitted" ]] && cd "$(dirname "$submitted")/.." 2>/dev/null && pwd || echo "$PWD")}
[[ -x "$home/launch" ]] || die "cannot find the scaletune checkout (no $home/launch); set SCALETUNE_HOME."

num_nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}                                             # "a100:4" -> 4
nproc_per_node=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}

# The first argument is the preset if it names one; otherwise ACCELERATE_CONFIG, otherwise single_gpu, multi_gpu
# or multi_node by the counts. The rule is scaletune.launch_plan.cluster_preset, shared with scaletune.k8s.
preset_out=$("$PYTHON" -m scaletune.launch_plan --cluster_preset --repo "$home" --num_machines "$num_nodes" \
    --num_processes "$nproc_per_node" -- "${1:-}" 2>&1) \
    || { error=$(echo "$preset_out" | sed -n 's/^launch: error: //p'); die "${error:-$preset_out}"; }
eval "$(echo "$preset_out" | grep -E '^PRESET(_GIVEN)?=')"
preset=$PRESET
(( PRESET_GIVEN == 0 )) || shift

train_args=("$@")
if (( attempt > 0 )); then
    # A requeued attempt (preemption, time limit): continue from the latest complete checkpoint. Appended last,
    # so it wins over a resume_from_checkpoint given earlier; with no checkpoint yet it starts fresh.
    train_args+=(--resume_from_checkpoint latest)
fi

# ---------------------------------------------------------------------------------------------- fail fast
# On the batch host, before any node starts: config, data files, output dir, trackers. A mistake costs seconds
# and its message is the first thing in the job log.
"$PYTHON" - "${train_args[@]}" <<'PY' || exit 2
import sys
try:
    from scaletune.config import load_config
    from scaletune.train import preflight
    preflight(load_config(sys.argv[1:]))
except (ValueError, RuntimeError, OSError, ImportError) as e:  # scaletune's errors name the fix
    print(f"scaletune: error: {e}", file=sys.stderr)
    sys.exit(2)
PY

# ---------------------------------------------------------------------------------------------- topology
num_processes=$(( num_nodes * nproc_per_node ))
hosts=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
main_host=${hosts[0]}
# From the job id, so jobs sharing a node do not collide; the attempt is mixed in because a requeued attempt
# may start before the previous attempt's port is free. Below Linux's ephemeral range (32768+).
main_port=${MAIN_PORT:-$(( 10000 + (SLURM_JOB_ID % 5000) * 4 + attempt % 4 ))}

launch_args=(--num_machines "$num_nodes" --num_processes "$nproc_per_node"
             --main_process_ip "$main_host" --main_process_port "$main_port")
# No GPU allocated: train on CPU (gloo), as ./launch --cpu does.
(( gpus > 0 )) || launch_args+=(--cpu "$nproc_per_node")

echo "scaletune: job ${SLURM_JOB_ID} attempt ${attempt}: ${num_nodes} node(s) x ${nproc_per_node}" \
     "process(es) = ${num_processes}, preset ${preset}, rendezvous ${main_host}:${main_port}"

# ---------------------------------------------------------------------------------------------- launch
# Signals under srun -> ./launch -> accelerate launch (torch elastic agent) -> training workers: Slurm signals
# every process of the step. The agent must neither die from USR1 (its default action) nor kill its workers on
# TERM: it starts with both ignored (inherited through exec) and torchrun is told not to install its TERM
# handler (PET_SIGNALS_TO_HANDLE is its --signals_to_handle). It then just waits for its workers, which handle
# the signals themselves (scaletune.preemption). SLURM_NODEID is expanded per task (single quotes).
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

srun_args=(--nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun (Slurm >= 22.05) does not inherit --cpus-per-task from the allocation.
[[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

srun "${srun_args[@]}" bash -c '
    trap "" USR1 TERM
    echo "scaletune: node ${SLURMD_NODENAME:-$(hostname)}: machine_rank ${SLURM_NODEID}"
    exec "$@" --machine_rank "$SLURM_NODEID"
' bash "$home/launch" "$preset" "${launch_args[@]}" "${train_args[@]}" &
srun_pid=$!

# `wait` returns early when a trapped signal arrives: keep waiting until srun has really exited.
while :; do
    status=0
    wait "$srun_pid" || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
exit "$status"
