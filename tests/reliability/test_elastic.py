"""num_workers=(min, max): an elastic group that shrinks and grows with the same global batch (elastic.py).

On a 3-node local cluster (a head with no CPUs, two 1-CPU nodes: one worker each), num_workers=(1, 2),
per-device batch 2, accumulation 1: a global batch of 4, 6 steps per epoch of 24 samples, 2 epochs.
- At the end of step KILL_AT, rank 1 stops its own node's raylet (SIGTERM: the node goes away as
  `ray stop` on it would). The worker failure (max_failures=1) restarts the group; Ray's elastic
  policy finds one node, so the group comes back on 1 worker with accumulation 2, from checkpoint-4.
- That group parks after checkpoint-GROW_AT (at the next step's begin), and the test starts a third
  node. Ray's resize monitor (elastic_resize_monitor_interval_s=1) sees room for 2 workers and
  restarts the group on 2, from checkpoint-GROW_AT, to the end.
Every rank records, per micro-batch, the sample indices its compute_loss trained on and its group. A
step's update survives from the last group that ran it (a later group resumed before it): those
steps are exactly each epoch's order in global batches of 4, every sample of every epoch once, and
the final weights and losses are an uninterrupted run's (one process, batch 4) within gloo's rounding.
The driver runs in a subprocess (this pytest process may hold the suite's own Ray instance).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
    from tests.services import _ray_start, find_executable, free_port, start_ray_cluster
except ImportError:
    from helpers import lm_examples, tiny_gpt2
    from services import _ray_start, find_executable, free_port, start_ray_cluster

from raytrainer.data.sampling import epoch_permutation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N, EPOCHS, GLOBAL = 24, 2, 4
STEPS = N // GLOBAL * EPOCHS
SEED = 3
KILL_AT = 5  # after save step 4: the shrunk group trains step 5 again, from checkpoint-4
GROW_AT = 8  # a save step: the grown group resumes from checkpoint-8
PARK_S = 180  # a parked group that Ray never stops fails the run instead of hanging


def examples():
    """24 distinct rows (the index of a row is read back from its tokens)."""
    rows, starts = [], set()
    for row in lm_examples(96):
        if int(row["input_ids"][0]) not in starts:
            starts.add(int(row["input_ids"][0]))
            rows.append(row)
    assert len(rows) >= N
    return rows[:N]


class RecordingTrainer(raytrainer.Trainer):
    """Appends {group, rank, world, step, ids} for each micro-batch to <record_dir>/<pid>.jsonl."""

    record_dir = ""

    def compute_loss(self, model, inputs, *args, **kwargs):
        import torch.distributed as dist

        if not hasattr(self, "_ids"):
            self._ids = {int(row["input_ids"][0]): i for i, row in enumerate(self.train_dataset)}
            group = [os.getpid()]
            dist.broadcast_object_list(group, src=0)  # rank 0's pid names this worker group
            self._group = group[0]
        record = {"group": self._group, "rank": dist.get_rank(), "world": dist.get_world_size(),
                  "step": self.state.global_step + 1, "time": time.time(),
                  "ids": [self._ids[int(t)] for t in inputs["input_ids"][:, 0]]}
        with open(os.path.join(self.record_dir, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        return super().compute_loss(model, inputs, *args, **kwargs)


class KillNodeAt(transformers.TrainerCallback):
    """Rank 1 of the 2-worker group, at the end of `step`: stops its node's raylet (its parent process)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if state.global_step != self.step or dist.get_world_size() != 2 or dist.get_rank() != 1:
            return
        # Ray registers a reported checkpoint at its next poll of the workers (every 2 s): a node lost
        # before that restarts from the one before. Wait for checkpoint-<step-1>'s registration (Ray's snapshot)
        snapshot, limit = Path(args.output_dir) / "checkpoint_manager_snapshot.json", time.monotonic() + 60
        while f"checkpoint-{self.step - 1}" not in (snapshot.read_text() if snapshot.exists() else ""):
            assert time.monotonic() < limit, "Ray never registered the checkpoint"
            time.sleep(0.1)
        raylet = os.getppid()
        with open(f"/proc/{raylet}/cmdline", "rb") as f:
            assert b"raylet" in f.read(), "a Ray worker's parent is its node's raylet"
        os.kill(raylet, signal.SIGTERM)
        threading.Event().wait(PARK_S)  # the raylet takes this worker down with it
        raise RuntimeError("the node's raylet did not stop its worker")


class ParkAt(transformers.TrainerCallback):
    """The 1-worker group, at the begin of step+1 (checkpoint-<step> is reported): tells the test to add a
    node, then waits for Ray's resize to stop it."""

    def __init__(self, step, marker):
        self.step, self.marker = step, marker

    def on_step_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if state.global_step != self.step or dist.get_world_size() != 1:
            return
        Path(self.marker).write_text(str(time.time()))
        threading.Event().wait(PARK_S)
        raise RuntimeError("Ray's elastic policy did not grow the group after a node joined")


def _args(out, workers, per_device, **kw):
    return raytrainer.TrainingArguments(
        output_dir=str(out), num_workers=workers, num_train_epochs=EPOCHS, per_device_train_batch_size=per_device,
        learning_rate=1e-3, logging_steps=1, save_steps=4, report_to="none", disable_tqdm=True, seed=SEED, **kw)


def _drive(workdir: str) -> None:
    """The driver (a subprocess, RAY_ADDRESS set): the elastic run; its result goes to files."""
    records = os.path.join(workdir, "records")
    os.makedirs(records, exist_ok=True)
    RecordingTrainer.record_dir = records
    run = RecordingTrainer(
        model=tiny_gpt2(dropout=0.0), train_dataset=examples(),
        args=_args(os.path.join(workdir, "run"), (1, 2), 2, max_failures=1, elastic_resize_monitor_interval_s=1),
        callbacks=[KillNodeAt(KILL_AT), ParkAt(GROW_AT, os.path.join(workdir, "grow"))])
    t0 = time.perf_counter()
    run.train()
    torch.save(run.model.state_dict(), os.path.join(workdir, "weights.pt"))
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump({"run_s": time.perf_counter() - t0, "global_step": run.state.global_step,
                   "losses": [(e["step"], e["loss"]) for e in run.state.log_history if "loss" in e]}, f)


def add_ray_node(cluster, cpus: int, timeout_s: float = 120.0) -> None:
    """One more node on the cluster of start_ray_cluster (its own temp dir and ports; stop() ends it)."""
    cluster.temp_dirs.append(Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp")))
    _ray_start(cluster, [f"--address={cluster.gcs_address}", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
                         f"--temp-dir={cluster.temp_dirs[-1]}", f"--node-manager-port={free_port()}",
                         f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                         f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                         f"--metrics-export-port={free_port()}"], timeout_s)


def surviving_steps(records: list[dict]) -> dict[int, list[dict]]:
    """step -> the micro-batch records of the last group that ran it (its update is the one kept)."""
    start = {}
    for r in records:
        start[r["group"]] = min(start.get(r["group"], r["time"]), r["time"])
    steps: dict[int, dict[int, list]] = {}
    for r in records:
        steps.setdefault(r["step"], {}).setdefault(r["group"], []).append(r)
    return {s: by_group[max(by_group, key=start.get)] for s, by_group in steps.items()}


@pytest.mark.ray
@pytest.mark.e2e
def test_group_shrinks_and_grows_with_the_same_global_batch(tmp_path):
    if find_executable("ray") is None:
        pytest.skip("`ray` executable not found")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    # a group placed on a node that is going away gives up after 20 s (Ray's default: 60 s)
    # its 3 nodes share this machine's disk: the local output_dir is shared storage (raytrainer/shared_storage.py)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
               RAYTRAINER_SHARED_STORAGE="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    t0 = time.perf_counter()
    (tmp_path / "cluster").mkdir()
    with start_ray_cluster(tmp_path / "cluster", cpus_per_node=(0, 1, 1), env=env) as cluster:
        cluster_s = time.perf_counter() - t0
        driver_env = dict(cluster.env, RAY_ADDRESS=cluster.gcs_address)
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=ROOT,
                                      env=driver_env, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 300
                while not (tmp_path / "grow").exists() and driver.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)  # a file the parked group writes: the event this waits for
                assert (tmp_path / "grow").exists(), (tmp_path / "driver.log").read_text()[-8000:]
                parked_at = float((tmp_path / "grow").read_text())
                add_ray_node(cluster, 1)
                node_added = time.time()
                code = driver.wait(timeout=300)
            finally:
                if driver.poll() is None:
                    driver.kill()
        assert code == 0, (tmp_path / "driver.log").read_text()[-8000:]
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    records = []
    for name in os.listdir(tmp_path / "records"):
        with open(tmp_path / "records" / name) as f:
            records += [json.loads(line) for line in f if line.strip()]
    kept = surviving_steps(records)
    first_grown = min(r["time"] for r in records if r["step"] == GROW_AT + 1 and r["world"] == 2)
    print(f"elastic run: {time.perf_counter() - t0:.0f} s with the cluster ({cluster_s:.0f} s to start it); the "
          f"run {result['run_s']:.0f} s; node added {node_added - parked_at:.1f} s after the park, step "
          f"{GROW_AT + 1} on 2 workers {first_grown - node_added:.1f} s after the node was added")

    # the groups: 2 workers to KILL_AT, 1 worker (accumulation 2) from checkpoint-4 to GROW_AT, 2 to the end
    worlds = {s: {r["world"] for r in rs} for s, rs in kept.items()}
    assert sorted(kept) == list(range(1, STEPS + 1)), sorted(kept)
    assert all(worlds[s] == {2} for s in range(1, 5)), worlds
    assert all(worlds[s] == {1} for s in range(5, GROW_AT + 1)), worlds
    assert all(worlds[s] == {2} for s in range(GROW_AT + 1, STEPS + 1)), worlds
    groups = [{r["group"] for r in kept[s]} for s in (1, 5, GROW_AT + 1)]
    assert all(len(g) == 1 for g in groups) and len(set().union(*groups)) == 3, groups
    for s, rs in kept.items():  # the same global batch: 2 ranks x 1 micro-batch, or 1 rank x 2 micro-batches
        assert len(rs) == 2 and all(len(r["ids"]) == 2 for r in rs), (s, rs)
    # the first group's step KILL_AT (and its step KILL_AT+1 on rank 0, cut short) were done again, nothing else
    redone = {r["step"] for r in records if r not in [x for rs in kept.values() for x in rs]}
    assert redone <= {KILL_AT, KILL_AT + 1}, redone

    # each step trained the next global batch of its epoch's order: every sample of every epoch exactly once
    per_epoch = N // GLOBAL
    for s, rs in kept.items():
        epoch, k = divmod(s - 1, per_epoch)
        expected = epoch_permutation(N, SEED, epoch).tolist()[k * GLOBAL:(k + 1) * GLOBAL]
        trained = sorted(i for r in rs for i in r["ids"])
        assert trained == sorted(expected), (s, trained, expected)
    for epoch in range(EPOCHS):
        ids = [i for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for r in kept[s] for i in r["ids"]]
        assert sorted(ids) == list(range(N)), (epoch, ids)
    meta = torch.load(tmp_path / "run" / f"checkpoint-{GROW_AT}" / "raytrainer_run.pt", weights_only=True)
    assert meta["world_size"] == 1 and meta["global_batch_size"] == GLOBAL, meta

    # the same training as one uninterrupted process with a batch of 4
    assert result["global_step"] == STEPS and [s for s, _ in result["losses"]] == list(range(1, STEPS + 1))
    full = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=_args(tmp_path / "full", 0, GLOBAL),
                              train_dataset=examples())
    full.train()
    assert [loss for _, loss in result["losses"]] == pytest.approx(
        [e["loss"] for e in full.state.log_history if "loss" in e], rel=1e-5)
    weights, reference = torch.load(tmp_path / "weights.pt"), full.model.state_dict()
    for k in reference:
        torch.testing.assert_close(weights[k], reference[k], rtol=1e-5, atol=1e-5, msg=k)


def test_ranges_are_checked_on_the_driver(tmp_path):
    """min >= 1, min <= max at construction; at train(), a range where the global batch cannot be kept,
    Ray Data streams and DeepSpeed are refused before any Ray resource is taken, each naming the fix."""
    from raytrainer.elastic import accumulation_for, check_train

    for bad, words in (((0, 2), "min >= 1"), ((3, 2), "min must be <= max"), ((1, 2, 3), "(min, max) pair")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            raytrainer.TrainingArguments(output_dir=str(tmp_path), num_workers=bad, report_to="none")
    assert raytrainer.TrainingArguments(output_dir=str(tmp_path), num_workers=(2, 2), report_to="none").num_workers == 2
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path), num_workers=(1, 3), per_device_train_batch_size=2,
                                        report_to="none", max_failures=-1)
    assert repr(args.num_workers) == "(1, 3)" and args.num_workers >= 1  # every fixed-count check still holds
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(ValueError, match=r"global batch of 6 .* on 2 worker\(s\).*gradient_accumulation_steps to a "
                                         r"multiple of 2"):
        trainer.train()
    args.gradient_accumulation_steps = 2  # 12 = 2 x 6 x 1 = 2 x 3 x 2 = 2 x 2 x 3
    assert [accumulation_for(args, w) for w in (1, 2, 3)] == [6, 3, 2]
    check_train(args, {})
    with pytest.raises(ValueError, match="ray.data.Dataset .* streaming_split"):
        check_train(args, {"train": object()})


if __name__ == "__main__":  # the Ray test's driver process
    _drive(sys.argv[1])
