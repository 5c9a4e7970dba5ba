"""PBT for multi-worker trials without a worker-group restart at each perturbation.

Tune's PopulationBasedTraining pauses a trial to exploit it (and, with synch=True, pauses every trial at every
perturbation point until the last one gets there). Pausing a function trial stops its Ray Train worker group;
resuming starts a new one (~20 s here, minutes with a large model). `InPlacePBT` makes the same decisions
(its parent's code: quantiles, explore, synch barrier) but never pauses a trial whose exploit can be applied in
its running group: each decision goes to the trial through the board (pbt_board.py), and the trial's workers
load the donor's checkpoint themselves (pbt_relay.py, pbt_worker.py). The synch barrier is a wait on the board.
An exploit whose mutated config changes more than IN_PLACE keys (e.g. a model_init parameter) is Tune's pause
and restart, as before.
"""

from __future__ import annotations

import logging
import warnings

from ray.train._internal.session import _FutureTrainingResult
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from .pbt_board import post

logger = logging.getLogger("raytrainer")
REPORT_KEY = "pbt_report"  # the trial's count of checkpointed reports, in each result it sends Tune
IN_PLACE = frozenset({"learning_rate", "weight_decay"})  # what loop.apply_hyperparameters_after_resume sets


class InPlacePBT(PopulationBasedTraining):
    """Tune's PopulationBasedTraining, deciding for trials that wait in their running worker groups."""

    @classmethod
    def from_pbt(cls, pbt: PopulationBasedTraining, board) -> "InPlacePBT":
        scheduler = cls.__new__(cls)
        scheduler.__dict__.update(pbt.__dict__)  # the user's settings and state, as given
        scheduler._board = board
        scheduler._waiting = {}  # trial -> its report number; its workers wait for the decision
        scheduler._decided = {}  # trial -> the exploit decided for it at this perturbation
        scheduler._reporter = None
        return scheduler

    def __getstate__(self):  # the sweep's state file: a restored sweep runs Tune's own PBT (no board then)
        state = dict(self.__dict__, _board=None, _waiting={}, _decided={}, _reporter=None)
        return state

    def on_trial_result(self, tune_controller, trial, result):
        if self._board is None:
            return super().on_trial_result(tune_controller, trial, result)
        self._reporter = trial
        try:
            decision = super().on_trial_result(tune_controller, trial, result)
        finally:
            self._reporter = None
        if result.get(REPORT_KEY) is not None:
            self._waiting[trial] = result[REPORT_KEY]
        if decision == TrialScheduler.PAUSE and trial.status == Trial.RUNNING:
            # the synch barrier (or, async, a pending trial's turn): this trial waits in its running group
            decision = TrialScheduler.CONTINUE
        self._release()
        return decision

    def _release(self) -> None:
        """Post the decision of every waiting trial that is not held at the synch barrier."""
        for trial, report in list(self._waiting.items()):
            held = self._synch and trial not in self._decided and self._trial_state[trial].last_train_time >= \
                self._next_perturbation_sync and not trial.is_finished()
            if held:
                continue
            del self._waiting[trial]
            decision = self._decided.pop(trial, None) or {"action": "continue"}
            post(self._board, ("decision", trial.trial_id, report), decision)

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        super().on_trial_error(tune_controller, trial)
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial):
        super().on_trial_remove(tune_controller, trial)
        self._ended(tune_controller, trial)

    def _ended(self, tune_controller, trial) -> None:
        self._waiting.pop(trial, None)
        self._decided.pop(trial, None)
        if self._board is None:
            return
        # a trial that ended early (early stopping, an error) never reaches the barrier: once every live trial
        # waits at it, they go on without a perturbation there
        if all(t in self._waiting for t in tune_controller.get_live_trials() if t is not trial):
            for other in self._waiting:
                self._decided.setdefault(other, {"action": "continue"})
        self._release()

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        if self._board is not None and trial in upper_quantile and trial is not self._reporter \
                and trial.status == Trial.RUNNING:
            # waiting at the barrier: its actor sits in train() until it reports again, so a save asked of it now
            # would never be answered; its checkpoint is the one it reported (Tune's save of it, asked before
            # train(), may still be in flight)
            saving = trial.temporary_state.saving_to
            self._trial_state[trial].last_checkpoint = saving if isinstance(saving, _FutureTrainingResult) \
                else trial.checkpoint
            self._num_checkpoints += 1
            return
        super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)

    def _exploit(self, tune_controller, trial, trial_to_clone):
        if self._board is None:
            return super()._exploit(tune_controller, trial, trial_to_clone)
        donor = self._trial_state[trial_to_clone].last_checkpoint
        before = dict(trial.config)
        recorder = _PauseRecorder(tune_controller)
        super()._exploit(recorder, trial, trial_to_clone)  # explore, log, tag, set_config; no pause yet
        after = dict(trial.config)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        if recorder.paused and changed <= IN_PLACE:
            self._decided[trial] = {"action": "exploit", "donor": donor, "donor_trial": trial_to_clone.trial_id,
                                    "config": after}
            return
        if recorder.paused:  # a key the running group cannot take: Tune's pause, then a restart from the donor
            logger.info("raytrainer: PBT exploit of trial %s changes %s: its worker group restarts (only %s are "
                        "applied in place)", trial.trial_id, sorted(changed - IN_PLACE), sorted(IN_PLACE))
            tune_controller.pause_trial(*recorder.paused[0][0], **recorder.paused[0][1])
        self._decided[trial] = {"action": "restart"}


class _PauseRecorder:
    """The TuneController, except that pause_trial is only noted (InPlacePBT decides afterwards)."""

    def __init__(self, controller):
        self._controller = controller
        self.paused = []

    def pause_trial(self, *args, **kwargs):
        self.paused.append((args, kwargs))

    def __getattr__(self, name):
        return getattr(self._controller, name)


def in_place_pbt(scheduler, board, *, n_trials: int, space, max_concurrent: int, search_alg):
    """`scheduler` as an InPlacePBT when the whole population trains at once; else unchanged, with one warning."""
    if type(scheduler) is not PopulationBasedTraining:  # PB2, a user's subclass: its own pause logic, untouched
        return scheduler
    population = n_trials * _grid_size(space)
    why = ("a search_alg is given" if search_alg is not None else
           f"the population ({population} trials) does not train at once (max_concurrent_trials={max_concurrent})"
           if population > max_concurrent else None)
    if why:
        warnings.warn(f"raytrainer: PBT restarts a multi-worker trial's worker group at each pause, as Ray Tune "
                      f"does, because {why}; in-place exploits need every trial running at once.", stacklevel=3)
        return scheduler
    return InPlacePBT.from_pbt(scheduler, board)


def _grid_size(space) -> int:
    """How many trials one sample of `space` makes (Tune multiplies its grid_search lists)."""
    size = 1
    for value in (space or {}).values():
        if isinstance(value, dict):
            size *= len(value["grid_search"]) if set(value) == {"grid_search"} else _grid_size(value)
    return size
