#!/bin/bash
# A scaletune hyperparameter search on a SLURM cluster: one job array, each array task a search worker
# (`python -m scaletune.search`) on one node, all of them sharing one Optuna study.
#
#   sbatch slurm/search.sh [PRESET] CONFIG --space SPACE.yaml --n_trials N [--metric eval_f1] [--key value ...]
#
#   sbatch slurm/search.sh my_job.yaml --space space.yaml --n_trials 32 --output_dir /shared/$USER/sweep1
#   sbatch --array=0-3 --gpus-per-node=2 slurm/search.sh multi_gpu my_job.yaml --space space.yaml --n_trials 16
#
# Every task runs trials one after the other, each an ordinary run in output_dir/trial-K/ launched with ./launch
# on the task's node (PRESET as in slurm/train.sh: the first argument if it names one, else from the GPU count).
# --n_trials is the study's total: the tasks stop once that many trials have started, whoever ran them.
#
# The study is SQLite in output_dir/study.db: output_dir MUST be on a filesystem every node sees (NFS, Lustre,
# GPFS...). SQLite's locking on a network filesystem serialises writes (a handful per evaluation), which is fine
# for tens of workers; for more, use a database server (Optuna RDB storage) instead.
#
# Preemption (SIGTERM to every process of the task, scancel): the search worker exits, the trial's processes write
# a checkpoint and requeue the task (scaletune.preemption); the requeued task (same SLURM_ARRAY_TASK_ID) resumes
# its unfinished trial from that checkpoint. No --signal before the time limit: there is no job step to send it
# to (the trials run in the batch step); set --time for the whole worker.
# Variables read by this script: PYTHON (interpreter with scaletune[search], default python on PATH),
# SCALETUNE_HOME (the checkout, default: found from the submitted script's path). See docs/slurm.md.
#
#SBATCH --job-name=scaletune-search
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail

die() { echo "scaletune: error: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]] \
    || die "not inside a Slurm job array: submit it with \`sbatch slurm/search.sh ...\` (one machine:" \
           "python -m scaletune.search)."
[[ " $* " == *" --space "* || " $* " == *" --space="* ]] || die "--space SPACE.yaml is required."

PYTHON=${PYTHON:-python}
export PYTHON PYTHONUNBUFFERED=1

submitted=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o ' Command=[^ ]*' | cut -d= -f2 || true)
home=${SCALETUNE_HOME:-$( [[ -n "$submitted" ]] && cd "$(dirname "$submitted")/.." 2>/dev/null && pwd || echo "$PWD")}
[[ -x "$home/launch" ]] || die "cannot find the scaletune checkout (no $home/launch); set SCALETUNE_HOME."
export SCALETUNE_HOME=$home
# As slurm/train.sh: torch's elastic agent leaves SIGTERM to the workers, which checkpoint before they exit.
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}                                             # "a100:4" -> 4
search_args=()
# The preset: the first argument if it names one (the rule of slurm/train.sh, scaletune.launch_plan).
if [[ $# -gt 0 && "$1" != -* ]] && { [[ -f "$home/accelerate_configs/$1.yaml" ]] || grep -qs '^distributed_type:' "$1"; }; then
    search_args+=(--preset "$1"); shift
fi
# No GPU allocated: each trial trains on CPU (gloo), as ./launch --cpu does.
(( gpus > 0 )) || search_args+=(--cpu "${NPROC_PER_NODE:-1}")

echo "scaletune: search worker ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID} on" \
     "$(hostname), ${gpus} GPU(s)"
exec "$PYTHON" -m scaletune.search "${search_args[@]}" "$@"
