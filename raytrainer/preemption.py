"""`enable_jit_checkpoint=True` under Ray (num_workers >= 1): Ray Train's preemption watcher, not SIGTERM.

In-process, transformers' JITCheckpointCallback turns a SIGTERM (a spot instance's notice) into a
checkpoint at the next step boundary and a stop. On a Ray worker that cannot work: Ray Train V2 runs
the train function in a thread, and `signal.signal` only works in the main thread (transformers'
`Trainer.__init__` would raise ValueError there); the worker process's main thread belongs to Ray,
whose own SIGTERM handler exits the process, so a SIGTERM to one worker is a worker death (charged to
`max_failures`, resumed from the latest periodic checkpoint). With num_workers >= 1 the Trainer
therefore hides the field from transformers' `__init__` (loop_trainer.py), on the driver too: no SIGTERM
handler is installed anywhere. Under Ray a preemption notice is a node drain instead, and Ray 2.60 has
the machinery for it (ray/train/v2):

* a drain (the autoscaler's DrainNode, `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, the GCS
  client's `drain_node`; a cloud provider's spot notice goes through it) is in GCS's draining-nodes
  table with a deadline. Ray Train's `PreemptionWatcher` actor (one per worker group, started by the
  controller's `PreemptionCallback`, on by default: RAY_TRAIN_ENABLE_PREEMPTION_WATCHER) polls that
  table every RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S (5 s) and, for a node that hosts one of our workers,
  calls `mark_preempt` on every worker;
* `ray.train.get_preemption_info()` then returns a `PreemptionInfo` (deadline, preempted ranks). It is
  a collective (rank 0's value broadcast through Ray Train's synchronization actor: one actor round
  trip, ~4 ms on a loaded 2-core machine): every rank must call it the same number of times, so it is
  called once per optimizer step on every rank, never conditionally on one rank's state;
* the controller, seeing the mark in its poll, waits in PreemptingState until every worker has exited
  or the deadline (+ `FailureConfig.preemption_grace_s`) passes, then raises `PreemptionError` into its
  failure policy, which charges it to `FailureConfig.max_preemption_failures`, not `max_failures`, and
  restarts the worker group, which resumes from the latest reported checkpoint. A train function that
  *returns* counts as a finished run, preemption or not; one that *raises* is a worker failure
  (`max_failures`).

So the loop, when the info is non-None at an optimizer-step boundary: saves checkpoint-<global_step>
through the normal path (atomic write, on_save, reported to Ray, rotation), waits until it is in
storage, then parks: it trains no further step and waits for Ray to tear the group down at the
deadline. Ray's docs suggest training on after the save; steps done after it are thrown away by the
restart (which resumes from the saved step) and done again, so parking loses nothing and repeats
nothing. At the last step (or when a callback already stopped training) the run simply finishes.
The drained node's raylet exits once its workers are gone (a drained, idle node shuts down), and the
new worker group is placed on the remaining nodes.

Left at Ray's defaults: `relax_collectives_on_preemption` (False) and `preemption_grace_s` (0): the
save and its report (a barrier of every rank) must finish before the deadline, which holds when a
step plus a checkpoint fits in the drain window. A node reclaimed earlier (or a save that outlasts the
window) loses this checkpoint, not the run: the dead workers' `RayActorError.preempted` still charges
the restart to max_preemption_failures, and it resumes from the previous reported checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time

from transformers.trainer_utils import SaveStrategy

logger = logging.getLogger("raytrainer")

# Ray's controller tears the group down at the deadline; a worker still parked this long after it
# (Ray's fallback window, 120 s, when the drain has no deadline, plus a margin) raises instead of hanging
PARK_MARGIN_S = 600.0
NO_DEADLINE_S = 120.0  # ray.train.v2._internal.constants.DEFAULT_PREEMPTION_DEADLINE_S


class RayPreemption:
    """One per loop run on a Ray worker with enable_jit_checkpoint=True (`for_trainer` is None otherwise)."""

    @classmethod
    def for_trainer(cls, trainer) -> "RayPreemption | None":
        if trainer._ray is None or not trainer.args.enable_jit_checkpoint:
            return None
        import ray.train

        if not hasattr(ray.train, "get_preemption_info"):  # Ray < 2.60: no preemption watcher
            raise ValueError("enable_jit_checkpoint=True with num_workers >= 1 needs Ray >= 2.60 "
                             "(ray.train.get_preemption_info); upgrade Ray or set enable_jit_checkpoint=False.")
        return cls()

    def __init__(self):
        self._best_evaluated = False

    def before_save(self, trainer):
        """At an optimizer-step boundary, after on_step_end: Ray's PreemptionInfo, or None.

        A collective (see above): the loop calls it on every rank at every optimizer step. On a notice
        it asks the loop's save of this step (control.should_save), unless the run ends here anyway.
        """
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.ending(trainer):
            return None
        trainer.control.should_save = True
        # save_strategy="best" with an evaluation now: transformers saves only a new best (see park)
        self._best_evaluated = trainer.args.save_strategy == SaveStrategy.BEST and trainer.control.should_evaluate
        return info

    def park(self, trainer, model, trial, info) -> None:
        """After the just-in-time checkpoint: wait for Ray to stop this worker (never returns)."""
        t = trainer
        if self._best_evaluated and t.state.best_global_step != t.state.global_step:
            t._save_checkpoint(model, trial)  # not a new best: the loop did not save this step
            t.control = t.callback_handler.on_save(t.args, t.state, t.control)
        t._finish_saves(block=True)  # checkpoint-<step> written, on_save fired, reported to Ray
        t._ray.wait_for_uploads()  # remote storage: Ray's upload thread has finished it
        now = time.time()
        left = (info.deadline_ms / 1000 - now) if info.deadline_ms else NO_DEADLINE_S
        logger.warning("raytrainer: node preemption (ranks %s, %s): checkpoint-%d saved; waiting for Ray Train to "
                       "restart the worker group from it", info.preempted_ranks,
                       f"deadline in {left:.0f} s" if info.deadline_ms else "no deadline", t.state.global_step)
        threading.Event().wait(max(left, 0.0) + PARK_MARGIN_S)
        raise RuntimeError(
            f"raytrainer: checkpoint-{t.state.global_step} was saved for a node preemption, but Ray Train did not "
            f"stop the worker group within {PARK_MARGIN_S:.0f} s of the deadline; resume from that checkpoint."
        )

    @staticmethod
    def ending(trainer) -> bool:
        """The run ends at this step anyway: nothing to save for a restart."""
        return trainer.control.should_training_stop or trainer.state.global_step >= trainer.state.max_steps
