"""enable_jit_checkpoint (transformers' field).

In-process: SIGTERM makes the loop write checkpoint-<step> at the next step boundary and stop; a resume
continues from that exact step. No optimizer step is lost or repeated: the resumed run's steps are
exactly the ones after the checkpoint, and its losses are the uninterrupted run's (dropout off).

Under Ray (num_workers=2): a real node drain, Ray's own API (the GCS DrainNode call `ray drain-node
--reason DRAIN_NODE_REASON_PREEMPTION` makes, with a deadline), on a 3-node local cluster (a head with
no CPUs, two 2-CPU nodes), issued by rank 0 when it reaches step DRAIN_AT. Ray Train's preemption
watcher marks the workers, the loop saves checkpoint-<DRAIN_AT> and stops stepping; at the deadline
Ray's controller restarts the group on the other node (charged to max_preemption_failures: the run has
max_failures=0), which resumes from that checkpoint. A callback logs each optimizer step as it runs:
steps 1..DRAIN_AT in the first worker group, DRAIN_AT+1..end in the second, none twice; the losses and
final weights are an uninterrupted run's (one process, same global batch: within gloo's rounding, as
in test_ray_train.py). The driver runs in a subprocess (this pytest process may hold the suite's own
Ray instance)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import transformers

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
    from tests.services import find_executable, start_ray_cluster
except ImportError:
    from helpers import lm_examples, tiny_gpt2
    from services import find_executable, start_ray_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TERM_AT = 5  # the step at whose end SIGTERM arrives (a spot instance's notice)


class SigtermAt(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == TERM_AT:
            os.kill(os.getpid(), signal.SIGTERM)


def make(out, **kw):
    args = raytrainer.TrainingArguments(output_dir=str(out), max_steps=40, per_device_train_batch_size=2,
                                        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                                        seed=3, **kw)
    return raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(64))


def losses(trainer, after=0):
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] > after]


@pytest.fixture
def keep_sigterm():
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_sigterm_checkpoints_the_current_step_and_resume_loses_nothing(tmp_path, keep_sigterm):
    full = make(tmp_path / "full")
    full.train()

    first = make(tmp_path / "run", enable_jit_checkpoint=True)
    jit = next(cb for cb in first.callback_handler.callbacks if type(cb).__name__ == "JITCheckpointCallback")
    jit.jit_manager.kill_wait = 0  # transformers waits 3 s for a SIGKILL that may follow; none comes here
    first.add_callback(SigtermAt())
    first.train()
    stopped = first.state.global_step
    assert TERM_AT <= stopped < 40  # stopped early, at the step boundary after the signal was handled
    # transformers' callback saves at the first event after the signal: a step's begin (before it runs: the
    # loop, like transformers', still finishes that step, whose update the checkpoint does not hold) or end
    checkpoints = [d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and int(checkpoints[0].split("-")[1]) in (stopped - 1, stopped), (checkpoints, stopped)
    saved = int(checkpoints[0].split("-")[1])
    with open(tmp_path / "run" / checkpoints[0] / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == saved
    assert not os.path.exists(tmp_path / "run" / checkpoints[0] / "checkpoint-is-incomplete.txt")

    resumed = make(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    assert [s for s, _ in losses(resumed, after=saved)] == list(range(saved + 1, 41))  # none lost or repeated
    assert losses(first) == losses(full)[:len(losses(first))]
    assert losses(resumed, after=saved) == pytest.approx(losses(full, after=saved), rel=1e-5)


# ------------------------------------------------------------------------------------------- under Ray
RAY_STEPS = 12
DRAIN_AT = 6  # not a multiple of save_steps: checkpoint-6 can only be the preemption's
DRAIN_DEADLINE_S = 6  # the drain's deadline: Ray restarts the group then (the JIT save takes < 2 s here)


def test_enabled_with_ray_workers(tmp_path):
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path), enable_jit_checkpoint=True, num_workers=2,
                                        max_preemption_failures=3, report_to="none")
    args.check_supported()  # no longer refused: Ray Train's preemption notice (raytrainer/preemption.py)
    with pytest.raises(ValueError, match="max_preemption_failures"):
        raytrainer.TrainingArguments(output_dir=str(tmp_path), max_preemption_failures=-2, report_to="none")


class DrainNodeAt(transformers.TrainerCallback):
    """Rank 0, at the end of `step` in the first worker group: drains its own node as a spot preemption
    (Ray's DrainNode, with a deadline), then waits for Ray Train's watcher to mark this worker, so the
    loop sees the notice at this very step (an event, not a sleep: bounded at 60 s)."""

    def __init__(self, step, marker, deadline_s):
        self.step, self.marker, self.deadline_s = step, marker, deadline_s

    def on_step_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if state.global_step != self.step or dist.get_rank() != 0 or os.path.exists(self.marker):
            return
        import ray
        from ray.core.generated import autoscaler_pb2
        from ray.train.v2._internal.execution.context import get_train_context

        node = ray.get_runtime_context().get_node_id()
        accepted, why = ray._private.worker.global_worker.gcs_client.drain_node(
            node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "test: spot preemption",
            int(time.time() * 1000) + self.deadline_s * 1000)
        drained_at = time.time()
        context = get_train_context().preemption_context
        limit = time.monotonic() + 60
        while context.preemption_info is None and time.monotonic() < limit:
            time.sleep(0.05)
        with open(self.marker, "w") as f:
            json.dump({"node": node, "accepted": accepted, "why": why, "drained_at": drained_at,
                       "notice_after_s": time.time() - drained_at}, f)


class StepLog(transformers.TrainerCallback):
    """Rank 0 appends "<pid> <step> <time>" for every optimizer step it runs (across worker-group restarts)."""

    def __init__(self, path):
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.get_rank() == 0:
            with open(self.path, "a") as f:
                f.write(f"{os.getpid()} {state.global_step} {time.time():.3f}\n")


def _ray_args(out, workers, per_device, **kw):
    return raytrainer.TrainingArguments(
        output_dir=str(out), num_workers=workers, max_steps=RAY_STEPS, per_device_train_batch_size=per_device,
        learning_rate=1e-3, logging_steps=1, save_steps=4, report_to="none", disable_tqdm=True, seed=3, **kw)


def _drive(workdir: str) -> None:
    """The driver (a subprocess, RAY_ADDRESS set): the preempted run; its result goes to files."""
    import torch

    marker, steps = os.path.join(workdir, "drained.json"), os.path.join(workdir, "steps.txt")
    run = raytrainer.Trainer(
        model=tiny_gpt2(dropout=0.0), train_dataset=lm_examples(64),
        args=_ray_args(os.path.join(workdir, "run"), 2, 2, enable_jit_checkpoint=True, max_failures=0,
                       max_preemption_failures=1),
        callbacks=[DrainNodeAt(DRAIN_AT, marker, DRAIN_DEADLINE_S), StepLog(steps)])
    t0, started = time.perf_counter(), time.time()
    run.train()
    torch.save(run.model.state_dict(), os.path.join(workdir, "weights.pt"))
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump({"preempted_run_s": time.perf_counter() - t0, "started": started, "global_step": run.state.global_step,
                   "losses": [(e["step"], e["loss"]) for e in run.state.log_history if "loss" in e]}, f)


@pytest.mark.ray
@pytest.mark.e2e
def test_node_preemption_under_ray_checkpoints_the_step_and_resumes_there(tmp_path):
    if find_executable("ray") is None:
        pytest.skip("`ray` executable not found")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    # the watcher polls GCS's draining nodes every 0.2 s (Ray's default is 5 s)
    # its 3 nodes share this machine's disk: the local output_dir is shared storage (raytrainer/shared_storage.py)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.2",
               RAYTRAINER_SHARED_STORAGE="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    t0 = time.perf_counter()
    (tmp_path / "cluster").mkdir()
    with start_ray_cluster(tmp_path / "cluster", cpus_per_node=(0, 2, 2), env=env) as cluster:
        driver_env = dict(cluster.env, RAY_ADDRESS=cluster.gcs_address)
        with open(tmp_path / "driver.log", "w") as log:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=ROOT,
                                  env=driver_env, stdout=log, stderr=subprocess.STDOUT, timeout=240)
        assert done.returncode == 0, (tmp_path / "driver.log").read_text()[-8000:]
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    with open(tmp_path / "drained.json") as f:
        drained = json.load(f)
    assert drained["accepted"], f"Ray refused the drain: {drained['why']}"
    with open(tmp_path / "steps.txt") as f:
        times = {int(s): float(t) for _, s, t in (line.split() for line in f if line.strip())}
    print(f"preemption under Ray: {time.perf_counter() - t0:.0f} s with the cluster; preempted run "
          f"{result['preempted_run_s']:.0f} s: step 1 after {times[1] - result['started']:.0f} s, notice "
          f"{drained['notice_after_s']:.1f} s after the drain, step {DRAIN_AT + 1} {times[DRAIN_AT + 1] - times[DRAIN_AT]:.0f} s "
          f"after step {DRAIN_AT}")

    # the checkpoint at the step where the notice came (save_steps=4 makes 4, 8 and 12 only)
    run_dir = tmp_path / "run"
    assert (run_dir / f"checkpoint-{DRAIN_AT}").is_dir(), sorted(os.listdir(run_dir))
    with open(run_dir / f"checkpoint-{DRAIN_AT}" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == DRAIN_AT
    # every optimizer step ran exactly once: 1..DRAIN_AT in the first worker group, the rest after the restart
    with open(tmp_path / "steps.txt") as f:
        ran = [(int(p), int(s)) for p, s, _ in (line.split() for line in f if line.strip())]
    assert [s for _, s in ran] == list(range(1, RAY_STEPS + 1)), ran
    pids = [p for p, _ in ran]
    assert len(set(pids[:DRAIN_AT])) == 1 and len(set(pids[DRAIN_AT:])) == 1 and pids[0] != pids[-1], ran
    # the run finished, through one restart that max_failures=0 would have refused: the preemption budget's
    assert result["global_step"] == RAY_STEPS
    log = (tmp_path / "driver.log").read_text()
    assert "PreemptionError" in log and "Source: preemption" in log, "Ray's controller logged no preemption retry"
    assert [s for s, _ in result["losses"]] == list(range(1, RAY_STEPS + 1))

    # the same training as one uninterrupted process (same global batch): 2 gloo workers vs 1 process agree
    # within rtol 1e-5 (test_ray_train.py); a lost or repeated step would be off by far more
    full = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=_ray_args(tmp_path / "full", 0, 4),
                              train_dataset=lm_examples(64))
    full.train()
    assert [loss for _, loss in result["losses"]] == pytest.approx(
        [e["loss"] for e in full.state.log_history if "loss" in e], rel=1e-5)
    import torch

    weights, reference = torch.load(tmp_path / "weights.pt"), full.model.state_dict()
    for k in reference:
        torch.testing.assert_close(weights[k], reference[k], rtol=0, atol=1e-5, msg=k)


if __name__ == "__main__":  # the Ray test's driver process
    _drive(sys.argv[1])
