"""The small actor through which an in-place PBT exploit travels: scheduler -> trial -> the trial's workers.

One board per sweep (search.py starts it, and kills it when the sweep ends). Values are posted under a key and
read by whoever waits on that key; a reader blocks until the value is there (a synch PBT barrier is such a wait):
* ("decision", trial_id, report): the scheduler's answer to a trial's n-th checkpointed report
  (pbt_scheduler.py): continue, exploit a donor's checkpoint with a mutated config, or restart (Tune's own pause);
* ("instruction", trial_id, generation, step): what the trial's workers do after their save at `step`
  (pbt_relay.py posts it, pbt_worker.py reads it on every rank: every rank reads the same value).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("raytrainer")
WAIT_LINE_S = 300.0  # a wait longer than this says so in the log once per period (a barrier may be long)


def _board_class():
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class PBTBoard:
        def __init__(self):
            self.values: dict = {}
            self.posted: dict = {}

        def _event(self, key):
            return self.posted.setdefault(key, asyncio.Event())

        async def post(self, key, value):
            self.values[key] = value
            self._event(key).set()

        async def take(self, key, timeout_s: float):
            """The value under key, once posted; ("waiting",) after timeout_s without it."""
            try:
                await asyncio.wait_for(self._event(key).wait(), timeout_s)
            except asyncio.TimeoutError:
                return ("waiting",)
            return self.values[key]

        async def forget(self, prefix: tuple):
            """Drop every key starting with prefix (a trial restarted by Tune counts its reports from 1 again)."""
            for key in [k for k in self.values if k[:len(prefix)] == prefix]:
                self.values.pop(key)
                self.posted.pop(key, None)

    return PBTBoard


def start_board():
    return _board_class().remote()


def wait_for(board, key: tuple, what: str):
    """Block until `key` is posted on the board; its value."""
    import ray

    while True:
        value = ray.get(board.take.remote(key, WAIT_LINE_S))
        if value != ("waiting",):
            return value
        logger.info("raytrainer: still waiting for %s (%s); a synch PBT waits for every trial to reach its "
                    "perturbation point", what, key)


def post(board, key: tuple, value) -> None:
    import ray

    ray.get(board.post.remote(key, value))
