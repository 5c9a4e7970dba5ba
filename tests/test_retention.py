"""Checkpoint retention: raytrainer's rule for storage (checkpoint/retention.py) deletes exactly what
transformers' rotate_checkpoints deletes (newest save_total_limit plus the best, never the latest)."""

from __future__ import annotations

import itertools
import os

from transformers.trainer_utils import rotate_checkpoints

from raytrainer.checkpoint.retention import checkpoints_to_delete


def test_same_deletions_as_transformers(tmp_path):
    cases = 0
    for n, limit in itertools.product(range(1, 6), (None, 1, 2, 3, 5)):
        for best in [None, *range(1, n + 1), 99]:
            run = tmp_path / f"{n}-{limit}-{best}"
            paths = {s * 2: str(run / f"checkpoint-{s * 2}") for s in range(1, n + 1)}
            for p in paths.values():
                os.makedirs(p)
            best_path = str(run / f"checkpoint-{best * 2}") if best else None
            expected_left = None
            rotate_checkpoints(str(run), save_total_limit=limit, best_model_checkpoint=best_path)
            expected_left = {p for p in paths.values() if os.path.isdir(p)}
            ours_left = set(paths.values()) - set(checkpoints_to_delete(paths, limit, best_path))
            assert ours_left == expected_left, (n, limit, best)
            cases += 1
    assert cases > 100
