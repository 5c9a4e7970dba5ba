"""An ASHA sweep of 2-worker trials on a Ray started without its dashboard is refused at once, before the
first trial, with the fix (raytrainer/tune/dashboard.py). Without the check the first stopped trial's placement
group is never freed and the sweep waits forever (issue 19, item 11)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
import ray
from ray import tune
from tests.test_tune_search import sweep_trainer
ray.init(include_dashboard=False, num_cpus=3)
trainer = sweep_trainer({out!r}, max_steps=4, num_workers=2)
start = time.monotonic()
try:
    trainer.hyperparameter_search(hp_space={{"learning_rate": tune.grid_search([1e-2, 1e-3])}}, n_trials=1,
                                  scheduler="asha", name="no-dashboard")
    print("RESULT: the sweep ran")
except ValueError as e:
    print(f"RESULT: refused after {{time.monotonic() - start:.1f}} s: {{e}}")
"""


@pytest.mark.ray
def test_asha_multi_worker_sweep_without_dashboard_is_refused_before_the_first_trial(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(SCRIPT.format(repo=repo, out=str(tmp_path / "out"))))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, without the dashboard
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=repo, capture_output=True, text=True, timeout=240)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT:")), None)
    assert line is not None, (done.stdout + done.stderr)[-3000:]
    assert "refused after" in line and "include_dashboard=True" in line and "num_workers=0" in line, line
    assert float(line.split("refused after ")[1].split(" s")[0]) < 30  # at once: no trial waited for CPUs
    assert not (tmp_path / "no-dashboard").exists() or not list((tmp_path / "no-dashboard").glob("run_trial*"))
    assert time.monotonic() - started < 240
