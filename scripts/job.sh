#!/usr/bin/env bash
# Install (idempotent), then run the main job (default: jobs/configs/tiny_gpt2.yaml on 2 Ray workers of a local Ray).
# Extra arguments go to jobs/finetune.py, e.g.: scripts/job.sh --config jobs/configs/minilm_sentiment.yaml --num_workers 1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" jobs/finetune.py "$@"
