"""Callback events from rank 0 to the driver, live: progress bars and printed logs show once, on the driver.

Under Ray the display callbacks (ProgressCallback, PrinterCallback, notebook progress) stay on the
driver; rank 0 carries a StreamToDriver callback instead, which posts the events they need
(train begin/end, step end, log, evaluate, predict) to a small EventBox actor. A thread on the
driver drains the box every quarter second and calls the driver's display callbacks, so logs appear
as plain driver lines, not as worker tqdm escape codes. Rank 0's final callback state travels back
the same way (rank0_state.py).
"""

from __future__ import annotations

import copy
import logging
import threading
import time

from transformers import TrainerCallback, TrainerState

from .spec import is_display_callback

logger = logging.getLogger("raytrainer")
STATE_FIELDS = ("global_step", "max_steps", "epoch", "num_train_epochs", "logging_steps", "eval_steps",
                "save_steps", "train_batch_size", "best_metric", "best_global_step", "best_model_checkpoint")
STEP_INTERVAL_S = 0.5  # at most two progress updates a second (the last step always goes)


def _event_box_class():
    import ray

    @ray.remote(num_cpus=0)
    class EventBox:
        def __init__(self):
            self.items = []

        def put(self, item):
            self.items.append(item)

        def drain(self):
            items, self.items = self.items, []
            return items

    return EventBox


class StreamToDriver(TrainerCallback):
    """On rank 0: post display events to the driver (fire and forget; the actor keeps their order)."""

    def __init__(self, box):
        self.box = box
        self._last_step_sent = 0.0

    def _post(self, event, state, **kwargs):
        fields = {k: getattr(state, k, None) for k in STATE_FIELDS}
        # when it happened on rank 0: the driver drains events in batches (progress speeds need the real time)
        self.box.put.remote((event, fields, {**kwargs, "sent_at": time.time()}))

    def on_train_begin(self, args, state, control, **kwargs):
        self._post("on_train_begin", state)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self._last_step_sent >= STEP_INTERVAL_S or state.global_step >= state.max_steps:
            self._last_step_sent = now
            self._post("on_step_end", state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._post("on_log", state, logs=dict(logs or {}))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._post("on_evaluate", state, metrics=dict(metrics or {}))

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self._post("on_predict", state, metrics=dict(metrics or {}))

    def on_train_end(self, args, state, control, **kwargs):
        self._post("on_train_end", state)

    def checkpoint_persisted(self, state, path_in_storage: str) -> None:
        """Rank 0, once Ray has the checkpoint of this step in storage (a PBT trial reports it to Tune)."""
        self._post("checkpoint_persisted", state, path=path_in_storage)


class DriverStream:
    """`with DriverStream(trainer) as s:` around a Ray fit; afterwards s.final_state holds rank 0's state.

    `listeners` get ("evaluate", metrics, state) for each evaluation and ("checkpoint", path in storage,
    state) once a checkpoint is persisted, live: a multi-worker Tune trial reports them to Tune.
    """

    listeners: list = []

    def __init__(self, trainer, display: bool = True):
        self.trainer = trainer
        self.display = [cb for cb in trainer.callback_handler.callbacks if is_display_callback(cb)] if display else []
        self.box = None
        self.final_state = None
        self.eval_result = None
        self.error = None  # the RayError that ended the pump early, if one did
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the head node: a worker node may go away mid-run (elastic groups, preemption), the head does not
        # without the cluster (the driver's own node may be a worker node: several raylets on one address).
        # Hard: a soft affinity to a head with num-cpus=0 put the box on a worker node 3 times in 4 (measured)
        here = NodeAffinitySchedulingStrategy(_head_node_id(), soft=False)
        self.box = _event_box_class().options(scheduling_strategy=here).remote()
        self._thread = threading.Thread(target=self._pump, name="raytrainer-driver-stream", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import ray

        self._stop.set()
        self._thread.join()
        try:
            self._dispatch(ray.get(self.box.drain.remote()))  # whatever arrived after the last poll
        finally:
            ray.kill(self.box)
        return False

    def _pump(self):
        import ray

        while not self._stop.wait(0.25):
            try:
                items = ray.get(self.box.drain.remote())
            except ray.exceptions.RayError as e:
                if self._stop.is_set():  # the fit ended meanwhile (Tune paused or stopped the trial)
                    return
                # the box is gone (its node died, Ray shut down): progress lines stop; training goes on
                self.error = e
                logger.warning("raytrainer: the driver lost the event stream from rank 0 (%s: %s); progress and "
                               "log lines stop here, the run itself goes on.", type(e).__name__,
                               str(e).splitlines()[0][:200] if str(e) else "")
                return
            self._dispatch(items)

    def _dispatch(self, items):
        trainer = self.trainer
        for event, fields, kwargs in items:
            if event in ("final_state", "eval_result"):  # rank 0's state / evaluate()'s or predict()'s result
                setattr(self, event, fields)
                continue
            state = copy.copy(trainer.state) if isinstance(trainer.state, TrainerState) else TrainerState()
            for k, v in fields.items():
                setattr(state, k, v)
            state.is_world_process_zero = state.is_local_process_zero = True
            if event == "on_evaluate":
                self._tell("evaluate", kwargs.get("metrics") or {}, state)
            if event == "checkpoint_persisted":
                self._tell("checkpoint", kwargs["path"], state)
                continue
            for cb in self.display:
                getattr(cb, event)(trainer.args, state, trainer.control, **kwargs)

    def _tell(self, kind, payload, state):
        for listener in list(self.listeners):
            listener((kind, payload, state))


def _head_node_id() -> str:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()
