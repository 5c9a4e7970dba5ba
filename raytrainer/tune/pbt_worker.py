"""A PBT exploit inside a running worker group: the workers' side (pbt_scheduler.py says why).

`FollowExploits` rides in the trial's callbacks to every rank. After a save at an evaluated step (a report to
Tune), before the next step, every rank waits on the board for the trial's instruction for that step (pbt_relay.py
posts it once Tune's scheduler decided). "continue": the step runs. "exploit": `ExploitInPlace` ends this train()
(no further event fires in it) and worker.py calls train() again from the donor's checkpoint, in the same
processes: downloaded and checked against the plan the trial made (checkpoint/resume.py's check_download, as any
resume), then loaded by the loop's own resume (weights, optimizer, scheduler, RNG, data position), with this
trial's mutated learning_rate / weight_decay applied on top (loop.apply_hyperparameters_after_resume).
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..checkpoint.resume import check_download
from ..train_again import TrainAgain
from .pbt_board import wait_for

logger = logging.getLogger("raytrainer")


class ExploitInPlace(TrainAgain):
    def __init__(self, instruction: dict):
        super().__init__(f"PBT exploit of {instruction['donor_trial']}'s checkpoint in this worker group")
        self.instruction = instruction

    def prepare(self, trainer) -> tuple:
        plan = self.instruction["plan"]
        local = trainer._ray.fetch_resume(plan.checkpoint) if plan.in_storage else plan.checkpoint
        check_download(plan, local)
        for field in ("learning_rate", "weight_decay"):  # the trial's mutated values (pbt_scheduler.IN_PLACE)
            if field in self.instruction["overrides"]:
                setattr(trainer.args, field, self.instruction["overrides"][field])
        trainer._hyperparameters_override_checkpoint = True  # the donor's state, then these values on top
        return local, self.instruction["config"]


class FollowExploits(TrainerCallback):
    """Every rank: wait for the trial's instruction after each reported save; an exploit restarts train() here."""

    def __init__(self, board, trial_id: str):
        self.board = board
        self.trial_id = trial_id
        self.generation = 0  # in-place exploits so far: a resumed run reaches the same steps again
        self._evaluated_at = None
        self._reported_at = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._evaluated_at = state.global_step

    def on_save(self, args, state, control, **kwargs):
        # an evaluation and its checkpoint at this step: the trial reports it to Tune (trial._run_multi_worker);
        # after the last step there is nothing left to decide
        if self._evaluated_at == state.global_step and state.global_step < state.max_steps:
            self._reported_at = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        if self._reported_at is None:
            return
        step, self._reported_at = self._reported_at, None
        instruction = wait_for(self.board, ("instruction", self.trial_id, self.generation, step),
                               f"the PBT decision for trial {self.trial_id}'s step {step}")
        if instruction["action"] == "exploit":
            self.generation += 1
            if state.is_world_process_zero:
                logger.info("raytrainer: trial %s loads trial %s's checkpoint in its running worker group (PBT "
                            "exploit after its step %d) with %s", self.trial_id, instruction["donor_trial"], step,
                            instruction["overrides"])
            raise ExploitInPlace(instruction)
