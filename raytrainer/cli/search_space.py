"""A sweep's search: section's hp_space ({name: {type: loguniform|uniform|choice|randint, ...}}) as Ray
Tune domains, checked on the driver."""

from __future__ import annotations

from .arguments import HP_TYPES, ConfigError, closest

def tune_space(hp_space: dict, training_fields) -> dict:
    """{name: {type: loguniform|uniform|choice|randint, ...}} -> Ray Tune domains (checked first)."""
    from ray import tune

    if not hp_space:
        raise ConfigError("search.hp_space is empty: give {name: {type: ..., low: ..., high: ...}}")
    space = {}
    for name, spec in hp_space.items():
        where = f"search.hp_space.{name}"
        if name not in training_fields:
            raise ConfigError(f"{where}: not a TrainingArguments field{closest(name, training_fields)}")
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: give a mapping with type: one of {list(HP_TYPES)}")
        kind = spec["type"]
        allowed = {"loguniform": {"low", "high"}, "uniform": {"low", "high"}, "randint": {"low", "high"},
                   "choice": {"values"}}.get(kind)
        if allowed is None:
            raise ConfigError(f"{where}.type={kind!r} is unknown; use one of {list(HP_TYPES)}"
                              f"{closest(str(kind), HP_TYPES)}")
        for key in spec:
            if key != "type" and key not in allowed:
                raise ConfigError(f"{where}.{key} is not a key of type {kind} (keys: {sorted(allowed)})"
                                  f"{closest(str(key), allowed)}")
        missing = allowed - set(spec)
        if missing:
            raise ConfigError(f"{where}: type {kind} needs {', '.join(sorted(missing))}")
        if kind == "choice":
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise ConfigError(f"{where}.values must be a non-empty list")
            space[name] = tune.choice(spec["values"])
            continue
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ConfigError(f"{where}: low={low!r} and high={high!r} must be numbers with low < high")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0 (got {low})")
        if kind == "randint":
            if not all(isinstance(v, int) for v in (low, high)):
                raise ConfigError(f"{where}: randint needs integer low and high (high exclusive)")
            space[name] = tune.randint(low, high)
        else:
            space[name] = (tune.loguniform if kind == "loguniform" else tune.uniform)(float(low), float(high))
    return space

