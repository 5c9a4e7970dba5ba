"""Training progress as plain lines, for logs that are not a terminal (`ray job submit`, CI, a pipe).

tqdm redraws its bar with carriage returns and escape codes: in a job log that is one unreadable
line per update. `ProgressLines` replaces transformers' ProgressCallback there and prints, at most
once every `interval_s` (and always at the first and the last step):

    [progress] step 8/64 (12%) | loss 4.213 | 21.3 samples/s | elapsed 0:00:05 | ETA 0:00:35

plus each log dict on its own line, as ProgressCallback prints them. It is a ProgressCallback, so
under Ray it stays on the driver and is fed by rank 0's event stream (event_stream.py) like the bar;
times are then rank 0's (`sent_at`), since the driver receives the events in batches.
"""

from __future__ import annotations

import sys
import time

from transformers.trainer_callback import ProgressCallback
from ..redact import redact_text

PREFIX = "[progress]"


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLines(ProgressCallback):
    """A ProgressCallback that prints plain lines instead of drawing a tqdm bar."""

    def __init__(self, interval_s: float = 10.0, samples_per_step: int | None = None, stream=None,
                 max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.interval_s = interval_s
        self.samples_per_step = samples_per_step  # None: from the args (per-device batch x accumulation x world)
        self.stream = stream
        self._start = self._last_print = None
        self._first = None  # (time, step) of the first step seen: the speed is measured from there
        self._loss = None
        self.current_step = 0

    def _print(self, text: str) -> None:
        print(redact_text(text), file=self.stream or sys.stdout, flush=True)

    def _batch(self, args) -> int:
        if self.samples_per_step:
            return self.samples_per_step
        world = max(1, int(getattr(args, "num_workers", 0) or 0))
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * world

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = state.global_step
        if not state.is_world_process_zero:
            return
        self._start, self._last_print, self._first = kwargs.get("sent_at") or time.time(), None, None
        self._print(f"{PREFIX} training: {state.max_steps} steps, {self._batch(args)} samples per step")

    def on_step_end(self, args, state, control, **kwargs):
        self.current_step = state.global_step
        if not state.is_world_process_zero or self._start is None:
            return
        now = kwargs.get("sent_at") or time.time()
        if self._first is None:  # the speed counts from the first step (train begin includes set-up)
            self._first = (now, state.global_step)
        last = state.max_steps and state.global_step >= state.max_steps
        if self._last_print is not None and not last and now - self._last_print < self.interval_s:
            return
        self._last_print = now
        self._print(self.line(args, state, now))

    def line(self, args, state, now: float) -> str:
        done, total = state.global_step, state.max_steps or 0
        elapsed = now - self._start
        parts = [f"step {done}/{total}" + (f" ({100 * done // total}%)" if total else "")]
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4g}")
        first_time, first_step = self._first or (now, done)
        steps, span = done - first_step, now - first_time
        if steps > 0 and span > 0:
            parts.append(f"{steps * self._batch(args) / span:.1f} samples/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if steps > 0 and span > 0 and total > done:
            parts.append(f"ETA {_clock(span / steps * (total - done))}")
        return f"{PREFIX} " + " | ".join(parts)

    def on_prediction_step(self, args, state, control, **kwargs):
        pass  # no per-batch evaluation bar; the metrics come as a log line

    def on_evaluate(self, args, state, control, **kwargs):
        pass

    def on_predict(self, args, state, control, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if isinstance(logs.get("loss"), (int, float)):
            self._loss = float(logs["loss"])
        shown = {}
        for k, v in logs.items():
            if k == "total_flos":
                continue
            if isinstance(v, str) and len(v) > self.max_str_len:
                v = f"[a string of {len(v)} characters]"
            shown[k] = f"{v:.4g}" if isinstance(v, float) else v
        self._print(str(shown))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._start is not None:
            self._print(f"{PREFIX} training done: {state.global_step} steps in "
                        f"{_clock((kwargs.get('sent_at') or time.time()) - self._start)}")
        self._start = None


def use_progress_lines(trainer, interval_s: float = 10.0) -> bool:
    """Swap transformers' tqdm ProgressCallback in `trainer` for ProgressLines; True when swapped."""
    callbacks = trainer.callback_handler.callbacks
    for i, cb in enumerate(callbacks):
        if type(cb) is ProgressCallback:
            callbacks[i] = ProgressLines(interval_s=interval_s, max_str_len=cb.max_str_len)
            return True
    return False
