#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/gpu_suite.py says what it measures). On one H100/H200 it takes
# several minutes (--budget bounds it) and writes gpu_suite_results.md as rows finish (--out FILE to change that).
#
#   bash benchmarks/gpu_suite.sh                # the full suite on the visible GPU
#   bash benchmarks/gpu_suite.sh --tiny --cpu   # a 2-layer BERT on CPU in under a minute (CI's smoke run)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export PYTHONPATH="$repo/src:$here${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
cd "$repo"
exec "$python" "$here/gpu_suite.py" "$@"
