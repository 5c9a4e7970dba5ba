#!/usr/bin/env bash
# Idempotent install of raytrainer and its test dependencies into the current python3.
# torch is pinned first: an unpinned torch on a machine without it pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
# DeepSpeed (strategy="deepspeed"): after torch, built against it without build isolation and without
# compiled ops (DS_BUILD_OPS=0: ZeRO runs on CPU/gloo without them); torch is pinned to the installed
# version in the same command, so pip cannot replace it.
if ! $PY -c "import deepspeed" 2>/dev/null; then
  TORCH_VERSION=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
  DS_BUILD_OPS=0 $PY -m pip install -q --no-build-isolation deepspeed "torch==${TORCH_VERSION}"
fi
$PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" \
  || { echo "install.sh: torch changed while installing deepspeed" >&2; exit 1; }
$PY -m pip install -q -e ".[dev]"
