"""Kill a sweep's driver at many points around a trial's end, resume it, and check no finished trial ran twice.

    flock /tmp/raytest.lock python scripts/stress_sweep_resume.py --kills 20

Each round starts a fresh 4-trial sweep (one trial at a time, 4 steps, evaluation every 2) in a subprocess,
waits until the first trial's last result line is in its result.json, then SIGKILLs the driver after a delay
that moves across the window in which Tune records the trial as done and starts the next one (0 to
--window seconds, spread over the rounds). The sweep is then resumed (resume=True, another process). A
trial whose record (raytrainer_trial_done.json, or a complete result.json) existed at the kill must have the
same result.json after the resume: no second run, no second objective. Prints one line per round and a
final count; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from ray import tune
from tests.test_tune_search import sweep_trainer
trainer = sweep_trainer({out!r}, max_steps=4, save_strategy="no")
trainer.hyperparameter_search(hp_space={{"learning_rate": tune.grid_search([1e-2, 5e-3, 2e-3, 1e-3])}}, n_trials=1,
                              max_concurrent_trials=1, name="resumable", resume={resume})
"""


def results(sweep: str) -> dict[str, list[dict]]:
    found = {}
    for name in sorted(os.listdir(sweep)) if os.path.isdir(sweep) else []:
        path = os.path.join(sweep, name, "result.json")
        if name.startswith("run_trial") and os.path.isfile(path):
            lines = [ln for ln in open(path).read().splitlines() if ln.endswith("}")]
            found[name] = [json.loads(ln) for ln in lines]
    return found


def finished(sweep: str) -> dict[str, str]:
    return {n: json.dumps(r) for n, r in results(sweep).items() if r and r[-1].get("training_iteration") == 2}


def done(sweep: str) -> set[str]:
    """Tune's trial folders whose trial ended: a complete result.json, or raytrainer's own completion record
    (written just before the final report: a kill between the two leaves result.json one line short)."""
    ids = set()
    for name in os.listdir(sweep) if os.path.isdir(sweep) else []:
        path = os.path.join(sweep, name, "raytrainer_trial_done.json")
        if os.path.isfile(path):
            ids.add(json.load(open(path))["trial_id"])
    return set(finished(sweep)) | {n for n in results(sweep) if any(i in n for i in ids)}


def run_round(k: int, delay: float, env: dict) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="stress-sweep-") as tmp:
        out, sweep = os.path.join(tmp, "resumable-out"), os.path.join(tmp, "resumable")
        script = os.path.join(tmp, "driver.py")
        open(script, "w").write(DRIVER.format(repo=REPO, out=out, resume=False))
        driver = subprocess.Popen([sys.executable, script], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        try:
            while not finished(sweep):
                if driver.poll() is not None or time.monotonic() > deadline:
                    return False, "the driver ended (or timed out) before the first trial finished"
                time.sleep(0.05)  # polling the sweep's files
            time.sleep(delay)  # the kill point inside the window around the trial's end
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        before = finished(sweep)
        open(script, "w").write(DRIVER.format(repo=REPO, out=out, resume=True))
        resumed = subprocess.run([sys.executable, script], env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=900)
        if resumed.returncode != 0:
            return False, f"the resume failed: {resumed.stderr[-1500:]}"
        after = results(sweep)
        rerun = [n for n, text in before.items() if json.dumps(after.get(n)) != text]
        twice = [n for n, r in after.items() if len({x.get('training_iteration') for x in r}) != len(r)]
        if rerun or twice or len(done(sweep)) != 4:
            return False, f"re-run: {rerun}, duplicate results: {twice}, ended: {len(done(sweep))}/4"
        return True, f"{len(before)} finished at the kill, none re-run, 4/4 ended"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--window", type=float, default=3.0, help="seconds after the trial's last result line")
    ns = parser.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=True)  # one cluster for every round: drivers connect to it
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    ok = 0
    try:
        for k in range(ns.kills):
            delay = ns.window * k / max(1, ns.kills - 1)
            passed, note = run_round(k, delay, env)
            ok += passed
            print(f"round {k + 1}/{ns.kills}: kill {delay:.2f} s after the first trial's last result: "
                  f"{'ok' if passed else 'FAILED'} ({note})", flush=True)
    finally:
        ray.shutdown()
    print(f"{ok}/{ns.kills} rounds without a finished trial run twice", flush=True)
    return 0 if ok == ns.kills else 1


if __name__ == "__main__":
    sys.exit(main())
