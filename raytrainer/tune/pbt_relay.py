"""A PBT exploit inside a running worker group: the trial's side (pbt_scheduler.py says why).

After each checkpointed report to Tune, the trial waits on the board for the scheduler's decision and hands its
workers an instruction for the step they wait at (pbt_worker.py). An exploit is prepared here exactly as a
restarted trial prepares it: the donor's checkpoint copied into this trial's run folder (CheckpointPointer.
resume_from: a server-side copy on S3, the donor's best forgotten), then planned and checked by the resume path
every train() takes (checkpoint/resume.plan_resume); the workers download that copy and compare it with the plan.
"""

from __future__ import annotations

from .. import storage
from ..checkpoint.resume import plan_resume
from ..data.ray_data import is_ray_dataset
from ..redact import redact_text
from .pbt_board import post, wait_for
from .pbt_scheduler import IN_PLACE, REPORT_KEY


class ExploitRelay:
    def __init__(self, board, trial_id: str, trainer, pointers, config: dict):
        import ray

        self.board, self.trial_id = board, trial_id
        self.trainer, self.pointers = trainer, pointers
        self.config = config  # the trial's config; an exploit mutates it (the completion record names it)
        self.reports = 0
        self.generation = 0  # in-place exploits so far (FollowExploits counts the same)
        # a trial Tune restarted counts its reports and exploits from the start again
        ray.get([board.forget.remote(("decision", trial_id)), board.forget.remote(("instruction", trial_id))])

    def numbered(self, tune_metrics: dict) -> dict:
        """The report's metrics with its number: the scheduler posts its decision under it."""
        self.reports += 1
        return {**tune_metrics, REPORT_KEY: self.reports}

    def after_report(self, state) -> None:
        """Once tune.report returned: the scheduler's decision for it, as the workers' instruction."""
        if state.global_step >= state.max_steps > 0:
            return  # the last step: the workers do not wait, nothing is left to exploit into
        decision = wait_for(self.board, ("decision", self.trial_id, self.reports),
                            f"Tune's PBT decision on trial {self.trial_id}'s step {state.global_step}")
        # "restart": Tune pauses this trial and restarts it from the donor; its workers go on until it stops them
        instruction = {"action": "continue"}
        if decision["action"] == "exploit":
            instruction = self._exploit(decision)
        post(self.board, ("instruction", self.trial_id, self.generation, state.global_step), instruction)
        if decision["action"] == "exploit":
            self.generation += 1

    def unreported(self, state) -> None:
        """A checkpoint Tune did not hear of (no evaluation at its step): the workers go on."""
        post(self.board, ("instruction", self.trial_id, self.generation, state.global_step), {"action": "continue"})

    def _exploit(self, decision: dict) -> dict:
        resume, _ = self.pointers.resume_from(decision["donor"])  # the copy, and its [hp-search] line
        args = self.trainer.args
        overrides = {k: decision["config"][k] for k in IN_PLACE if k in decision["config"]}
        for field, value in overrides.items():
            setattr(args, field, value)  # the driver's view of this trial matches its workers'
        self.config.clear()
        self.config.update(decision["config"])
        return {"action": "exploit", "plan": plan_for(args, resume, self.trainer.train_dataset),
                "overrides": overrides, "config": dict(decision["config"]), "donor_trial": decision["donor_trial"]}


def plan_for(args, resume: str, train_dataset):
    """The ResumePlan train(resume_from_checkpoint=resume) would make on this trial's run (launch.run_on_ray)."""
    from ..launch import storage_location

    storage_path, name = storage_location(args)
    fs, base = storage.resolve_storage(storage_path, args.storage_filesystem)
    return plan_resume(args, resume, fs=fs, run_dir=storage.join_path(base, name),
                       run_label=redact_text(f"{storage_path}/{name}"), ray_datasets=is_ray_dataset(train_dataset))
