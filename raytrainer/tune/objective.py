"""The objective of a search and its best run, as transformers' `hyperparameter_search` defines them."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from transformers.trainer_utils import BestRun

DIRECTIONS = ("minimize", "maximize")


def default_objective(metrics: Mapping[str, float]) -> float:
    """transformers' `default_compute_objective`: the evaluation metrics' sum, or eval_loss alone.

    As transformers: eval_loss, epoch and the speed metrics (`*_runtime`, `*_per_second`) are
    removed; if nothing is left the objective is eval_loss (None without one), otherwise the sum of
    what is left (eval_loss is then *not* part of it). Also removed: a bare "step", which evaluate()
    never returns but our reports to Tune carry (the global step), so the result is transformers' for
    every dict evaluate() returns. One deliberate difference: `*_preparation_time` (transformers 5's
    eval_model_preparation_time, a timing) is a speed metric too; transformers 5.23 sums it, so a
    search without compute_metrics would optimise how fast the model was prepared.
    """
    metrics = dict(metrics)
    loss = metrics.pop("eval_loss", None)
    metrics.pop("epoch", None)
    metrics.pop("step", None)
    speed = ("_runtime", "_per_second", "_preparation_time", "_compilation_time")
    for name in [m for m in metrics if m.endswith(speed)]:
        metrics.pop(name)
    return loss if len(metrics) == 0 else sum(metrics.values())


def direction_to_mode(direction: str | list[str]) -> str | list[str]:
    """'minimize' -> 'min', 'maximize' -> 'max' (Tune's mode); a list maps element-wise."""
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r} must be 'minimize' or 'maximize' (or a list of them).")
        return direction[:3]
    if isinstance(direction, (list, tuple)) and direction:
        return [direction_to_mode(d) for d in direction]
    raise ValueError(f"direction={direction!r} must be 'minimize' or 'maximize', or a non-empty list of them.")


def best_run(rows, direction: str | list[str] = "minimize", run_summary: Any = None, metric: str = "objective",
             hp_keys: Iterable[str] | None = None) -> BestRun | list[BestRun]:
    """transformers' BestRun(run_id, objective, hyperparameters, run_summary) from the trials' results.

    rows: one mapping per trial, its last result (transformers' Ray backend compares each trial's last
    result, RAY_SCOPE="last"): {"trial_id", metric, "config": {...}}, or a row of
    `ResultGrid.get_dataframe()` / `ExperimentAnalysis.dataframe()` (config flattened as "config/<key>"),
    or that DataFrame itself. Rows whose objective is missing, NaN or infinite are skipped, as Tune's
    get_best_trial skips them; ties go to the first row, as there.
    direction: a string gives the best run; a list (multi-objective) gives the Pareto-optimal runs, as
    transformers' Optuna backend does.
    hp_keys: keep only these hyperparameters (default: the whole config, as transformers returns it).
    """
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.to_dict("records")
    mode = direction_to_mode(direction)
    runs = [run for row in rows if (run := _run_of(row, metric, mode, run_summary, hp_keys)) is not None]
    if not runs:
        raise ValueError(
            f"no trial reported a finite {metric!r}: every trial failed or none evaluated "
            "(check the trials' errors, and that evaluation runs: eval_dataset, eval_strategy)."
        )
    if isinstance(mode, str):
        best = runs[0]
        for run in runs[1:]:
            if (run.objective < best.objective) if mode == "min" else (run.objective > best.objective):
                best = run
        return best
    return [run for run in runs if not any(_dominates(other.objective, run.objective, mode) for other in runs)]


def _run_of(row: Mapping[str, Any], metric: str, mode, run_summary, hp_keys) -> BestRun | None:
    objective = row.get(metric)
    if isinstance(mode, str):
        if not _finite(objective):
            return None
        objective = float(objective)
    else:
        if not isinstance(objective, (list, tuple)) or len(objective) != len(mode) or not all(map(_finite, objective)):
            return None
        objective = [float(v) for v in objective]
    config = row.get("config")
    if not isinstance(config, Mapping):
        config = _unflatten({k[len("config/"):]: v for k, v in row.items() if k.startswith("config/")})
    config = {k: _plain(v) for k, v in config.items()}
    if hp_keys is not None:
        config = {k: config[k] for k in hp_keys if k in config}
    return BestRun(str(row.get("trial_id")), objective, config, run_summary)


def _dominates(a: list[float], b: list[float], modes: list[str]) -> bool:
    better = [(x < y) if m == "min" else (x > y) for x, y, m in zip(a, b, modes)]
    worse = [(x > y) if m == "min" else (x < y) for x, y, m in zip(a, b, modes)]
    return any(better) and not any(worse)


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    # Tune flattens nested config dicts with "/"; a DataFrame fills keys a row lacks with NaN
    out: dict[str, Any] = {}
    for path, value in flat.items():
        if isinstance(value, float) and math.isnan(value):
            continue
        *parents, leaf = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _plain(value):
    # numpy scalars (from a DataFrame) -> Python numbers, so the hyperparameters go into TrainingArguments as-is
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
