"""num_workers=(min, max): an elastic worker group that keeps the global batch on every worker count.

Ray Train V2 (2.60) takes `ScalingConfig(num_workers=(min, max))`: its ElasticScalingPolicy starts the
group on as many workers as the cluster's alive nodes hold (at least min, at most max) and, while it
runs, looks again every `elastic_resize_monitor_interval_s`; a different count shuts the group down
and starts a new one. A node lost mid-run is a worker failure (`max_failures`) or, drained, a
preemption (`max_preemption_failures`); the restart then counts the nodes again, so it may come back
smaller. Every new group calls the train function afresh, and `ray.train.get_checkpoint()` hands it
the latest reported checkpoint.

Ray's own elastic mode leaves the per-worker batch as it is, so the global batch changes with the
count. Here the global batch is fixed at `per_device_train_batch_size * gradient_accumulation_steps *
max` and each group sets its accumulation to keep it (`adapt_to_world`). The checkpoint's data
position is in samples of an order that depends on (seed, epoch) only (data/sampling.py), so the
resumed group continues at the very next sample: the optimisation is the one a fixed group would do.
A range whose counts cannot all keep that batch is refused at train(), naming the accumulation that
would keep it.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger("raytrainer")


class WorkerRange(int):
    """num_workers=(min, max). An int equal to min, so every `num_workers >= 1` / capacity check of a
    fixed count holds unchanged (a run needs min workers to start); `.min`, `.max` go to Ray."""

    def __new__(cls, low: int, high: int):
        self = super().__new__(cls, low)
        self.min, self.max = low, high
        return self

    def __getnewargs__(self):
        return (self.min, self.max)

    def __repr__(self):
        return f"({self.min}, {self.max})"

    __str__ = __repr__


def normalise(args) -> None:
    """Turn a (min, max) num_workers into a WorkerRange; before the type checks, which expect an int."""
    value = args.num_workers
    if isinstance(value, (tuple, list)) and not isinstance(value, WorkerRange):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"num_workers={value!r} must be an int, or a (min, max) pair of ints for an elastic "
                             "worker group, e.g. num_workers=(1, 4).")
        low, high = value
        if low < 1:
            raise ValueError(f"num_workers={tuple(value)!r}: an elastic group needs min >= 1 (0 trains in this "
                             "process); e.g. num_workers=(1, 4).")
        if low > high:
            raise ValueError(f"num_workers={tuple(value)!r}: min must be <= max; e.g. num_workers=({high}, {low}).")
        object.__setattr__(args, "num_workers", low if low == high else WorkerRange(low, high))
    interval = getattr(args, "elastic_resize_monitor_interval_s", 0)
    if isinstance(interval, (int, float)) and not interval >= 0:
        raise ValueError(f"elastic_resize_monitor_interval_s={interval!r} must be >= 0 (seconds between Ray's "
                         "checks for a larger group).")


def is_elastic(args) -> bool:
    return isinstance(args.num_workers, WorkerRange)


def global_batch(args) -> int:
    """The global batch the user set: per-device batch x accumulation x the full group (max)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_workers.max


def accumulation_for(args, world: int) -> int | None:
    """The accumulation that keeps the global batch on `world` workers; None when none does."""
    per_step = args.per_device_train_batch_size * world
    batch = global_batch(args)
    return batch // per_step if batch % per_step == 0 else None


def check_train(args, datasets: dict) -> None:
    """At train(), on the driver before any Ray resource is taken: refuse what a resize cannot continue."""
    if not is_elastic(args):
        return
    workers = args.num_workers
    problems = []
    lost = [w for w in range(workers.min, workers.max + 1) if accumulation_for(args, w) is None]
    if lost:
        lcm = math.lcm(*range(workers.min, workers.max + 1))
        step = lcm // math.gcd(lcm, workers.max)  # accumulation x max must be a multiple of every count
        problems.append(
            f"num_workers={workers!r} cannot keep the global batch of {global_batch(args)} "
            f"(per_device_train_batch_size={args.per_device_train_batch_size} x gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} x {workers.max} workers) on {', '.join(map(str, lost))} worker(s): "
            f"it is not a multiple of per_device_train_batch_size x workers. Set gradient_accumulation_steps to a "
            f"multiple of {step}, or narrow the range.")
    if datasets:
        problems.append(
            f"num_workers={workers!r} with a ray.data.Dataset train_dataset is not supported: Ray's streaming_split "
            "deals the rows by worker count, so after a resize no position in the old split is one in the new "
            "(the run could not continue at the next sample). Use a fixed num_workers, or a map-style dataset "
            "(e.g. datasets.Dataset.from_pandas(ds.to_pandas())).")
    if args.strategy == "deepspeed":
        problems.append(
            f"num_workers={workers!r} with strategy='deepspeed' is not supported: ZeRO's partitioned optimizer "
            "state cannot be loaded on another worker count. Use strategy='fsdp' (its checkpoints reshard) or "
            "'ddp', or a fixed num_workers.")
    if problems:
        raise ValueError("\n".join(problems))
    if args.max_failures == 0:
        logger.warning("raytrainer: num_workers=%r with max_failures=0: a node that dies ends the run (a drained "
                       "node restarts the group, charged to max_preemption_failures); set max_failures to the node "
                       "losses to survive, or -1.", workers)


def scaling_kwargs(args) -> dict:
    """ScalingConfig's worker-count arguments."""
    if not is_elastic(args):
        return {"num_workers": args.num_workers}
    return {"num_workers": (args.num_workers.min, args.num_workers.max),
            "elastic_resize_monitor_interval_s": args.elastic_resize_monitor_interval_s}


def adapt_to_world(args, world: int) -> None:
    """On a worker, before its Trainer is built: the accumulation that keeps the global batch on `world`."""
    if not is_elastic(args):
        return
    steps = accumulation_for(args, world)
    if steps is None:  # check_train refused such a range on the driver
        raise ValueError(f"num_workers={args.num_workers!r}: the global batch of {global_batch(args)} cannot be "
                         f"kept on {world} workers.")
    if steps != args.gradient_accumulation_steps:
        logger.info("raytrainer: elastic group of %d worker(s): gradient_accumulation_steps=%d keeps the global "
                    "batch of %d", world, steps, global_batch(args))
    args.gradient_accumulation_steps = steps
