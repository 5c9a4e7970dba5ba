"""`TrainAgain`: raised out of a worker's train() to run train() again in the same worker group.

worker.py catches it and calls train() with what `prepare(trainer)` returns; no new processes, no new process
group, nothing imported again. A PBT exploit in a running trial is one (tune/pbt_worker.py).
"""

from __future__ import annotations


class TrainAgain(Exception):
    def prepare(self, trainer) -> tuple:
        """(resume_from_checkpoint, trial) for the next train() of `trainer`."""
        raise NotImplementedError
