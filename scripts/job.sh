#!/usr/bin/env bash
# Install (idempotent), then run the main job (default: jobs/configs/tiny_gpt2.yaml on 2 Ray workers of a local Ray).
# Extra arguments go to the job (jobs/finetune.py: the `raytrainer train` command from a checkout), e.g.:
#   scripts/job.sh --config minilm_sentiment --num_workers 1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" jobs/finetune.py "$@"
