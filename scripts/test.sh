#!/usr/bin/env bash
# Install (idempotent), then run the whole test suite (unit, Ray, Tune, S3/MLflow e2e). ~25 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m pytest tests -q -p no:cacheprovider --timeout=900 --durations=30 "$@"
