"""Fine-tune (or sweep) a model with raytrainer from a YAML config: the checkout's entry for `ray job submit`.

    python jobs/finetune.py                                      # the shipped tiny_gpt2 config
    python jobs/finetune.py --config minilm_sentiment --learning_rate 1e-4 --num_workers 2
    python jobs/finetune.py --config jobs/configs/minilm_sentiment.yaml --dry-run
    ray job submit --working-dir . -- python jobs/finetune.py --config tiny_gpt2

It is `raytrainer train` (or `raytrainer sweep` for a config with a search: section) for a checkout
without the package installed; the code is in raytrainer/cli/ and `raytrainer train --help` lists the
options. A bad config ends with one line naming the key, before Ray starts.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raytrainer.log_filter import skip_ray_noise  # noqa: E402

skip_ray_noise()  # before ray is imported (raytrainer loads lazily in this script: raytrainer/__init__.py)
from raytrainer.cli.job import cli, main  # noqa: E402,F401 - main: tests call it in-process

if __name__ == "__main__":
    if any(a in ("-h", "--help", "--help-all") for a in sys.argv[1:]):
        from raytrainer.cli.command import main as command

        sys.exit(command(["train", *sys.argv[1:]]))
    sys.exit(cli(prog="finetune.py"))
