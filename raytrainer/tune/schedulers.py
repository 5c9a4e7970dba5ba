"""`scheduler=` of a search: "asha", "pbt", or a Ray Tune TrialScheduler passed through."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.tune.schedulers import (
    ASHAScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search.sample import Categorical, Domain, Function

SCHEDULERS = ("asha", "pbt")


def scheduler_problem(scheduler) -> str | None:
    """Why `scheduler` is not usable (a line naming the choices), or None."""
    if scheduler is None or isinstance(scheduler, TrialScheduler):
        return None
    if isinstance(scheduler, str):
        if scheduler.lower() in SCHEDULERS:
            return None
        return f"scheduler={scheduler!r} is unknown; use one of {', '.join(map(repr, SCHEDULERS))}, a Ray Tune " \
               "TrialScheduler (e.g. ASHAScheduler(...)), or None."
    if isinstance(scheduler, type) and issubclass(scheduler, TrialScheduler):
        return f"scheduler={scheduler.__name__} is a class: pass an instance, {scheduler.__name__}(...)."
    return (f"scheduler={scheduler!r} must be one of {', '.join(map(repr, SCHEDULERS))}, a Ray Tune "
            "TrialScheduler, or None.")


def needs_intermediate_results(scheduler) -> bool:
    """True for a scheduler that decides on the results trials report while they train.

    transformers checks the same classes (HyperBandForBOHB is a HyperBandScheduler, PB2 a
    PopulationBasedTraining) before its Ray search starts.
    """
    if isinstance(scheduler, str):
        return scheduler.lower() in SCHEDULERS
    return isinstance(scheduler, (ASHAScheduler, HyperBandScheduler, MedianStoppingRule, PopulationBasedTraining))


def is_pbt(scheduler) -> bool:
    return (isinstance(scheduler, str) and scheduler.lower() == "pbt") or isinstance(scheduler, PopulationBasedTraining)


def pbt_mutations(space: Mapping[str, Any]) -> dict[str, Any]:
    """PBT's hyperparam_mutations from a Tune space: what each searched key may be changed to.

    A tune.choice becomes its list of categories: PBT shifts a list value to a neighbour, but
    multiplies a Domain's value by 0.8 / 1.2, which fails for strings and leaves a batch-size choice.
    Numeric domains stay domains (resampled or perturbed); grid_search becomes its list. Constants
    and tune.sample_from (which PBT refuses) are not mutated.
    """
    out: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, Categorical):
            out[key] = list(value.categories)
        elif isinstance(value, Function):
            continue
        elif isinstance(value, Domain):
            out[key] = value
        elif isinstance(value, Mapping):
            if set(value) == {"grid_search"}:
                out[key] = list(value["grid_search"])
            elif nested := pbt_mutations(value):
                out[key] = nested
    return out


def build_scheduler(scheduler, *, metric: str = "objective", mode: str = "min",
                    time_attr: str = "training_iteration", max_t: int | None = None,
                    space: Mapping[str, Any] | None = None, perturbation_interval: float | None = None,
                    **options) -> TrialScheduler | None:
    """A Tune TrialScheduler for `scheduler` (None: Tune's default FIFO, every trial runs to the end).

    "asha": ASHAScheduler(grace_period=1, reduction_factor=2, max_t=max_t): for short fine-tuning
      runs, a trial may be stopped after its first report and half are stopped at each rung (Tune's
      default 4 keeps too few trials alive for a handful of trials). max_t, in time_attr units
      ("training_iteration": reports, i.e. evaluations; "step": the global step), is required.
    "pbt": PopulationBasedTraining(perturbation_interval=..., hyperparam_mutations=pbt_mutations(space)).
    A TrialScheduler instance is returned unchanged (Tune gives it metric/mode if it has none).
    options: further keyword arguments of the scheduler's class (they override the defaults above).
    """
    problem = scheduler_problem(scheduler)
    if problem:
        raise ValueError(problem)
    if scheduler is None or isinstance(scheduler, TrialScheduler):
        return scheduler
    if not isinstance(mode, str) or mode not in ("min", "max"):
        raise ValueError(
            f"mode={mode!r}: scheduler {scheduler!r} stops or exploits trials on one metric, so it needs mode "
            "'min' or 'max'; a multi-objective search cannot use a scheduler."
        )
    name = scheduler.lower()
    if name == "asha":
        if max_t is None or max_t < 1:
            raise ValueError(
                f"scheduler 'asha' needs max_t >= 1 (got {max_t!r}): the most {time_attr!r} a trial runs, "
                "e.g. its number of evaluations."
            )
        kwargs = dict(time_attr=time_attr, metric=metric, mode=mode, max_t=int(max_t), grace_period=1,
                      reduction_factor=2)
        kwargs.update(options)
        return ASHAScheduler(**kwargs)
    # "pbt"
    if perturbation_interval is None or perturbation_interval <= 0:
        raise ValueError(
            f"scheduler 'pbt' needs perturbation_interval > 0 (got {perturbation_interval!r}): how many "
            f"{time_attr!r} between two perturbations, e.g. every 2 evaluations."
        )
    mutations = options.pop("hyperparam_mutations", None) or pbt_mutations(space or {})
    if not mutations:
        raise ValueError("scheduler 'pbt' mutates the searched hyperparameters, and hp_space searches none: "
                         "give it Tune domains (tune.uniform, tune.choice, ...) to search.")
    return PopulationBasedTraining(time_attr=time_attr, metric=metric, mode=mode,
                                   perturbation_interval=perturbation_interval,
                                   hyperparam_mutations=mutations, **options)

