#!/usr/bin/env bash
# Install (idempotent), then run the whole test suite (unit, Ray, Tune, S3/MLflow e2e). ~35 min on 2 cores.
# --quick: the tests that start no Ray and no external service (a few minutes), for your own iterations.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
marks=()
if [[ "${1:-}" == "--quick" ]]; then
  shift
  marks=(-m "not ray and not e2e")
fi
exec "${PYTHON:-python3}" -m pytest tests -q -p no:cacheprovider --timeout=900 --durations=30 "${marks[@]}" "$@"
