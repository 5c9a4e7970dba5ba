"""A sweep that stops or pauses multi-worker trials needs Ray's dashboard; without it, it is refused at once.

Ray Train V2 frees the placement group of a trial's worker group, when Tune kills the trial (ASHA
stops it, PBT pauses it), through a PlacementGroupCleaner that asks the dashboard's state API whether
the trial's controller is alive. On a Ray started with `include_dashboard=False` that query fails
forever ("Failed to query Ray Train Controller actor state"), the stopped trial's CPUs are never
returned, and the next trial waits for them forever. The check runs on the driver before any trial.
"""

from __future__ import annotations

import time

DASHBOARD_WAIT_S = 10.0  # a dashboard started together with Ray registers its URL within seconds


def dashboard_running(wait_s: float = DASHBOARD_WAIT_S) -> bool:
    import ray
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and node.webui_url:  # this process started Ray with its dashboard
        return True
    deadline = time.monotonic() + wait_s
    while True:
        if internal_kv._internal_kv_get("webui:url", namespace=ray_constants.KV_NAMESPACE_DASHBOARD):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)  # polling Ray's key-value store for the dashboard's registration


def check_dashboard_for_stopping_scheduler(args, scheduler) -> None:
    """Refuse a stopping/pausing scheduler with multi-worker trials on a Ray without the dashboard."""
    if args.num_workers < 1 or scheduler is None or (isinstance(scheduler, str) and scheduler.lower() in ("none", "fifo")):
        return
    if dashboard_running():
        return
    name = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
    raise ValueError(
        f"hyperparameter_search(scheduler={name!r}) with num_workers={args.num_workers}: this Ray runs without its "
        "dashboard, and Ray Train frees a stopped or paused trial's workers (its placement group) through the "
        "dashboard's state API: the next trial would wait forever for their CPUs. Start Ray with the dashboard "
        "(ray.init(include_dashboard=True), or `ray start --head --include-dashboard=true`; it needs ray[default]), "
        "or run trials in-process (num_workers=0), or search without a scheduler.")
