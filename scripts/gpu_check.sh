#!/usr/bin/env bash
# Checking a GPU machine (issue 21): one command for a machine with one NVIDIA GPU and no network, at most
# about 8 minutes. It writes ONE markdown file as it goes (a run cut short keeps what it measured):
#   1. the machine: GPU, driver, Python, and the version and path of each package a run imports (found where an
#      import would find it, without running it);
#   2. tests/gpu: fp16/bf16 end-to-end runs (evaluation, best reload, export, predict) with transformers'
#      kernelize raising and the network refused (zero Hub access), fp16 overflow skips and losses against
#      transformers.Trainer, compiled against eager losses, exact resume;
#   3. benchmarks/gpu_suite.py: BERT-base bare / Trainer / scaletune at s128 b64 and s512 b16, bf16 and fp16,
#      the fast path (torch_compile) at b64 and b256, data wait, a save in the window;
#   4. benchmarks/checkpoint_stall.py: a background save's stall against a synchronous save.
# Each part has its own time limit, so one stuck part does not take the others' time.
#
#   bash scripts/gpu_check.sh [--out FILE]     # default: gpu_check.md in the repository root (git-ignored)
#   bash scripts/gpu_check.sh --cpu --tiny     # the same parts, tiny and on CPU, in about two minutes (CI)
#
# Python: $PYTHON, else `python3` from PATH -- with packages carried as wheels, put them on PYTHONPATH first
# (see the README, "Checking a GPU machine"). Everything runs offline (HF_HUB_OFFLINE=1); hub kernels are
# not switched off here: that scaletune does it by itself is part of the check.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/gpu_check.md"
small=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a file" >&2; exit 2; }
           out="$(realpath -m "$2")"; shift 2 ;;
    --cpu|--tiny) small=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/{/^#/p}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "gpu_check.sh: no $python on PATH: set PYTHON" >&2; exit 2; }
export PYTHONPATH="$repo/src:$repo/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
cd "$repo"
started=$SECONDS
summary=()

note() { printf '%s\n' "$@" >> "$out"; }

# part NAME LIMIT_S KIND CMD...: KIND log: the command's output goes into the file, in a code block, as it
# comes; KIND md: the command appends its own markdown to the file, and its output goes to FILE.log.
part() {
  local name="$1" limit="$2" kind="$3"; shift 3
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s)"
  note "" "## $name" "" "\`$*\`" ""
  if [ "$kind" = log ]; then
    note '```'
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out"
    rc=${PIPESTATUS[0]}
    note '```' ""
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out.log"
    rc=${PIPESTATUS[0]}
    note ""
  fi
  local verdict="ok"
  [ "$rc" -eq 0 ] || verdict="failed (exit $rc)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="stopped at its ${limit}s limit"
  note "$name: $verdict, $((SECONDS - t0)) s"
  summary+=("| $name | $verdict | $((SECONDS - t0)) s |")
}

probe="$(mktemp)"; trap 'rm -f "$probe"' EXIT
cat > "$probe" <<'PY'
import importlib.metadata, importlib.util, platform, subprocess, sys
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip())
except (OSError, subprocess.SubprocessError):
    print("nvidia-smi: none")
print("python", platform.python_version(), sys.executable)
# Where each package would be imported from, and its version, found on sys.path as an import finds them: without
# running the packages (importing all of them took 13 s of a 2-core machine, much of it DeepSpeed and peft).
for name in ("torch", "transformers", "accelerate", "huggingface_hub", "tokenizers", "kernels", "datasets",
             "deepspeed", "peft", "pytest", "scaletune"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(f"{name}: not importable (not found)")
        continue
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    print(name, version, spec.origin or " ".join(spec.submodule_search_locations or []))
import torch
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY

if [ "$small" -eq 1 ]; then
  # Every CPU group, 2 repeats and padding_free's lines: the whole tiny suite, its only smoke run in the tests.
  tests_limit=120; suite=(--tiny --cpu --budget 120); suite_limit=240
  stall=(--tiny --saves 2); stall_limit=90
else
  tests_limit=150; suite=(--budget 165); suite_limit=230; stall=(--bert-base --saves 3); stall_limit=70
fi

: > "$out"; : > "$out.log"
note "# GPU check" "" "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(
  [ -n "$(git status --porcelain 2>/dev/null | grep -v '^??' | head -1)" ] && echo ' (with local changes)'), \`$0\`"
echo "writing $out"

part "Machine" 30 log "$python" "$probe"
part "tests/gpu" "$tests_limit" log "$python" -m pytest -q -rA -p no:cacheprovider tests/gpu
part "Benchmarks: benchmarks/gpu_suite.py" "$suite_limit" md \
  "$python" benchmarks/gpu_suite.py --out "$out" --append "${suite[@]}"
part "Checkpoint save stall: benchmarks/checkpoint_stall.py" "$stall_limit" log \
  "$python" benchmarks/checkpoint_stall.py "${stall[@]}"

note "" "## Summary" "" "| part | result | time |" "|---|---|---|" "${summary[@]}" "" "total $((SECONDS - started)) s"
hub="$(grep -E '^(PASSED|FAILED|ERROR).*test_end_to_end_on_cuda_runs_no_hub_code' "$out" | tr '\n' ' ')"
note "zero Hub access (end-to-end runs with kernelize raising and the network refused): ${hub:-not run}"
echo "wrote $out"
