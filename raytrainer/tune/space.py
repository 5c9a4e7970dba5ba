"""`hp_space` (any style transformers' `hyperparameter_search` documents) -> a Ray Tune param_space.

transformers passes `hp_space` to its backend untouched, so users write it in their backend's style:

(a) a dict of Tune domains and constants: `{"learning_rate": tune.loguniform(1e-6, 1e-4), "seed": 42}`;
(b) a function returning (a): the Ray backend's style, which transformers calls as `hp_space(None)`
    (`default_hp_space_ray(trial)` ignores its argument);
(c) the Optuna backend's style (the transformers docs' example): `def hp(trial): return {"learning_rate":
    trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True), ...}`. We call it once with a
    `RecordingTrial`, whose `suggest_*` return `Suggestion` markers, and map each marker to the Tune
    domain that samples the same values with the same probabilities as Optuna's random sampler:

    | Optuna call (bounds inclusive)              | Tune domain                                              |
    |---------------------------------------------|----------------------------------------------------------|
    | suggest_float(lo, hi)                       | tune.uniform(lo, hi)                                     |
    | suggest_float(lo, hi, log=True)             | tune.loguniform(lo, hi)                                  |
    | suggest_float(lo, hi, step=s)               | tune.choice([lo, lo+s, ..., <= hi])  (1)                 |
    | suggest_int(lo, hi)                         | tune.randint(lo, hi + 1)      (randint's upper is exclusive) |
    | suggest_int(lo, hi, step=s), lo % s == 0    | tune.qrandint(lo, hi, s)      (multiples of s in [lo, hi]) |
    | suggest_int(lo, hi, step=s), lo % s != 0    | tune.choice(range(lo, hi + 1, s))  (2)                   |
    | suggest_int(lo, hi, log=True)               | tune.lograndint(lo, hi + 1)   (3)                        |
    | suggest_categorical(name, choices)          | tune.choice(list(choices))                               |
    | suggest_uniform(lo, hi)                     | as suggest_float(lo, hi)                                 |
    | suggest_loguniform(lo, hi)                  | as suggest_float(lo, hi, log=True)                       |
    | suggest_discrete_uniform(lo, hi, q)         | as suggest_float(lo, hi, step=q)                         |
    | any numeric call with lo == hi              | the constant lo (Optuna returns it; a Tune range can't be empty) |

    (1) tune.quniform rounds to multiples of s counted from 0 (not from lo) and gives the two ends half
        the weight of the inner points; Optuna draws each grid point lo + k*s equally. Grids of more than
        `MAX_CHOICE_GRID` points use tune.quniform when lo and hi lie on multiples of s (the end effect
        is then negligible), and are refused otherwise.
    (2) qrandint's grid is the multiples of s, Optuna's starts at lo.
    (3) both are log-uniform over lo..hi; Tune floors a log-uniform draw, Optuna rounds one, so the
        per-integer weights differ slightly.

    Values the function returns that are not markers stay constants (also inside dicts, lists and
    tuples, which Tune resolves too). A value computed *from* a marker (`2 * x`, `int(x)`, `x > 3`)
    cannot be expressed as an independent Tune domain: that raises a ValueError naming the key and
    pointing at a Tune search-space dict (tune.sample_from for dependent values).
"""

from __future__ import annotations

import decimal
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from ray import tune

# A float `step=` grid up to this many points becomes an exact tune.choice (see the table above).
MAX_CHOICE_GRID = 10_000

_USE_TUNE = (
    "write hp_space as a Ray Tune search space instead, e.g. "
    '{"learning_rate": tune.loguniform(1e-6, 1e-4), "num_train_epochs": tune.randint(1, 6)} '
    "(tune.sample_from(lambda config: ...) for a value computed from another)"
)


class HpSpaceError(ValueError):
    """An hp_space that cannot be turned into a Ray Tune search space."""


class UnsupportedTrialAttribute(HpSpaceError, AttributeError):
    # An AttributeError too, so `hasattr(trial, "study")` in a user's hp_space stays False.
    pass


# ---------------------------------------------------------------------------------------- markers
class _Traced:
    """Operators on a marker give a `_Derived` (so the returned dict shows which key used one);
    conversions to a plain value (int(), bool(), format) raise at once: they need a sampled value."""

    __slots__ = ()
    __array_ufunc__ = None  # numpy defers `np.float64(2) * x` to our __rmul__ instead of coercing

    def _sources(self) -> tuple["Suggestion", ...]:
        raise NotImplementedError

    def _derive(self, other=None):
        sources = self._sources() + (other._sources() if isinstance(other, _Traced) else ())
        return _Derived(sources)

    def _refuse(self, what: str):
        calls = ", ".join(s.call for s in self._sources())
        raise HpSpaceError(
            f"hp_space uses {what} on the value of {calls}: a suggestion has no value until a trial samples "
            f"it, so it cannot be translated to Ray Tune; {_USE_TUNE}."
        )

    def __bool__(self):
        self._refuse("bool() (an `if`, `and`/`or`, or a comparison)")

    def __int__(self):
        self._refuse("int()")

    def __float__(self):
        self._refuse("float()")

    def __complex__(self):
        self._refuse("complex()")

    def __index__(self):
        self._refuse("an index (range(), slicing)")

    def __str__(self):
        self._refuse("str()")

    def __format__(self, spec):
        self._refuse("string formatting")

    def __len__(self):
        self._refuse("len()")

    def __iter__(self):
        self._refuse("iteration")

    def __getitem__(self, key):
        self._refuse("indexing")

    def __contains__(self, item):
        self._refuse("`in`")

    __hash__ = object.__hash__  # __eq__ below would otherwise make markers unhashable


def _binary(name: str):
    def op(self, other=None, *_):  # *_: pow(x, y, mod), round(x, ndigits)
        return self._derive(other)

    op.__name__ = name
    return op


for _name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "lshift", "rshift", "and", "or", "xor",
    "divmod",
):
    setattr(_Traced, f"__{_name}__", _binary(f"__{_name}__"))
    setattr(_Traced, f"__r{_name}__", _binary(f"__r{_name}__"))
for _name in ("neg", "pos", "abs", "invert", "round", "trunc", "floor", "ceil", "lt", "le", "gt", "ge", "eq", "ne"):
    setattr(_Traced, f"__{_name}__", _binary(f"__{_name}__"))
del _name


class Suggestion(_Traced):
    """What `RecordingTrial.suggest_*` returns: the Optuna call, translated by `to_tune()`."""

    __slots__ = ("kind", "name", "low", "high", "step", "log", "choices", "call")

    def __init__(self, kind, name, call, low=None, high=None, step=None, log=False, choices=None):
        self.kind, self.name, self.call = kind, name, call
        self.low, self.high, self.step, self.log, self.choices = low, high, step, log, choices

    def _sources(self):
        return (self,)

    def __repr__(self):
        return f"<{self.call}>"

    def to_tune(self, key: str) -> Any:
        """The Tune domain (or constant) that samples like Optuna's random sampler (module table)."""
        if self.kind == "categorical":
            return tune.choice(list(self.choices))
        if self.kind == "int":
            return self._int_domain()
        return self._float_domain(key)

    def _int_domain(self):
        low, high, step = self.low, self.high, self.step
        high = low + (high - low) // step * step  # Optuna's own adjustment: the last grid point <= high
        if low == high:
            return low
        if self.log:
            return tune.lograndint(low, high + 1)  # Optuna's high is inclusive, lograndint's upper exclusive
        if step == 1:
            return tune.randint(low, high + 1)  # Optuna's high is inclusive, randint's upper exclusive
        if low % step == 0:
            return tune.qrandint(low, high, step)  # the multiples of step in [low, high], upper inclusive
        return tune.choice(list(range(low, high + 1, step)))  # qrandint's grid starts at 0, Optuna's at low

    def _float_domain(self, key: str):
        low, high, step = self.low, self.high, self.step
        if step is None:
            if low == high:
                return low
            return tune.loguniform(low, high) if self.log else tune.uniform(low, high)
        # decimal arithmetic, as Optuna adjusts high, so 0.1 steps give 0.3 and not 0.30000000000000004
        d_low, d_step = decimal.Decimal(str(low)), decimal.Decimal(str(step))
        count = int((decimal.Decimal(str(high)) - d_low) // d_step) + 1
        grid = [float(d_low + i * d_step) for i in range(count)]
        if count == 1:
            return grid[0]
        if count <= MAX_CHOICE_GRID:
            return tune.choice(grid)
        if _on_grid(low, step) and _on_grid(grid[-1], step):
            return tune.quniform(low, grid[-1], step)
        raise HpSpaceError(
            f"hp_space[{key!r}]: {self.call} has {count} grid points starting at {low}, which is not a multiple "
            f"of step={step}: Tune's quniform counts its grid from 0; use bounds that are multiples of the step, "
            f"or tune.quniform(...) directly."
        )


class _Derived(_Traced):
    """A value computed from markers (`2 * x`): it has no Tune domain."""

    __slots__ = ("sources",)

    def __init__(self, sources):
        self.sources = sources

    def _sources(self):
        return self.sources

    def __repr__(self):
        return f"<value computed from {', '.join(s.call for s in self.sources)}>"


def _on_grid(value: float, step: float) -> bool:
    return math.isclose(value / step, round(value / step))


# ------------------------------------------------------------------------------------ the trial
class RecordingTrial:
    """Stands in for `optuna.Trial`: records each suggest_* call and returns a `Suggestion`.

    Argument checks are Optuna's (low <= high, step > 0, step and log exclusive, log needs low > 0),
    so a space Optuna would refuse is refused here, naming the call.
    """

    def __init__(self):
        self.suggestions: dict[str, Suggestion] = {}

    def suggest_float(self, name, low, high, *, step=None, log=False):
        call = _call("suggest_float", name, low, high, step=step, log=log or None)
        low, high = _number(low, call, "low"), _number(high, call, "high")
        if step is not None:
            step = _number(step, call, "step")
            if log:
                raise HpSpaceError(f"{call}: step and log=True cannot be used together (Optuna refuses it too).")
            if step <= 0:
                raise HpSpaceError(f"{call}: step must be > 0.")
        return self._record(Suggestion("float", name, call, low, high, step, bool(log)), log)

    def suggest_int(self, name, low, high, step=1, log=False):
        call = _call("suggest_int", name, low, high, step=None if step == 1 else step, log=log or None)
        low, high, step = _integer(low, call, "low"), _integer(high, call, "high"), _integer(step, call, "step")
        if step < 1:
            raise HpSpaceError(f"{call}: step must be >= 1.")
        if log and step != 1:
            raise HpSpaceError(f"{call}: step != 1 and log=True cannot be used together (Optuna refuses it too).")
        return self._record(Suggestion("int", name, call, low, high, step, bool(log)), log)

    def suggest_categorical(self, name, choices):
        call = _call("suggest_categorical", name, choices)
        if isinstance(choices, (str, bytes, Mapping)) or not hasattr(choices, "__iter__"):
            raise HpSpaceError(f"{call}: choices must be a list or tuple of values.")
        choices = tuple(choices)
        if not choices:
            raise HpSpaceError(f"{call}: choices is empty; give at least one value.")
        return self._record(Suggestion("categorical", name, call, choices=choices), False)

    # the older Optuna names, still in many scripts
    def suggest_uniform(self, name, low, high):
        return self.suggest_float(name, low, high)

    def suggest_loguniform(self, name, low, high):
        return self.suggest_float(name, low, high, log=True)

    def suggest_discrete_uniform(self, name, low, high, q):
        return self.suggest_float(name, low, high, step=q)

    def _record(self, suggestion: Suggestion, log) -> Suggestion:
        if suggestion.kind != "categorical":
            if suggestion.low > suggestion.high:
                raise HpSpaceError(f"{suggestion.call}: low must be <= high.")
            if log and suggestion.low <= 0:
                raise HpSpaceError(f"{suggestion.call}: log=True needs low > 0.")
        # Optuna returns the same value for a name suggested twice in one trial: the same marker here
        return self.suggestions.setdefault(suggestion.name, suggestion)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise UnsupportedTrialAttribute(
            f"hp_space reads trial.{name}: only trial.suggest_float / suggest_int / suggest_categorical "
            f"(and suggest_uniform / suggest_loguniform / suggest_discrete_uniform) can be translated to a "
            f"Ray Tune search space; {_USE_TUNE}."
        )


def _call(method: str, name, *args, **kwargs) -> str:
    # keyword arguments given as None are left out: the call as a user would have written it
    shown = [repr(name), *map(repr, args)] + [f"{k}={v!r}" for k, v in kwargs.items() if v is not None]
    return f"trial.{method}({', '.join(shown)})"


def _number(value, call: str, what: str):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HpSpaceError(f"{call}: {what} must be a number, got {value!r}.")
    return value


def _integer(value, call: str, what: str) -> int:
    _number(value, call, what)
    if int(value) != value:
        raise HpSpaceError(f"{call}: {what} must be an integer, got {value!r}.")
    return int(value)


# ---------------------------------------------------------------------------------- translation
def to_tune_space(hp_space, trial_probe=None) -> dict[str, Any]:
    """Return `{key: Tune domain or constant}` for hp_space in any of the styles the module describes.

    hp_space: a dict; a function of no argument; or a function of one argument (a trial), called with
    a `RecordingTrial`, which an Optuna-style function records its suggestions on and a Ray-style
    function ignores. A one-argument function that fails with the recording trial before suggesting
    anything is called again with `trial_probe` (None: what transformers' Ray backend passes).
    None: transformers' Ray default (`default_hp_space_ray`).
    """
    if hp_space is None:
        from transformers.trainer_utils import default_hp_space_ray

        hp_space = default_hp_space_ray
    space = _call_hp_space(hp_space, trial_probe) if callable(hp_space) else hp_space
    if not isinstance(space, Mapping):
        raise HpSpaceError(
            f"hp_space must be a dict (or a function returning one) of hyperparameter names to Tune domains or "
            f"values; got {type(space).__name__}"
            + (" (a list: the SigOpt backend's style)" if isinstance(space, list) else "")
            + f"; {_USE_TUNE}."
        )
    if isinstance(space.get("parameters"), Mapping) and ("method" in space or "metric" in space):
        raise HpSpaceError(
            "hp_space is a Weights & Biases sweep config ({'method': ..., 'parameters': ...}); "
            f"Ray Tune needs the hyperparameters themselves: {_USE_TUNE}."
        )
    for key in space:
        if not isinstance(key, str):
            raise HpSpaceError(
                f"hp_space keys must be strings (TrainingArguments fields or model_init keys); got {key!r}."
            )
    owners: dict[int, str] = {}
    return {key: _translate(value, key, owners) for key, value in space.items()}


def _call_hp_space(fn: Callable, trial_probe) -> Any:
    if not _takes_an_argument(fn):
        return fn()
    recorder = RecordingTrial()
    try:
        return fn(recorder)
    except Exception as first:
        if recorder.suggestions or isinstance(first, HpSpaceError):
            raise  # an Optuna-style function: its own error, or ours naming the call
        try:  # a Ray-style function that needs transformers' own argument (None)
            return fn(trial_probe)
        except Exception:
            raise first from None


def _takes_an_argument(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it as transformers would
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def _translate(value: Any, path: str, owners: dict[int, str]) -> Any:
    if isinstance(value, Suggestion):
        # Optuna gives one value to both keys; two Tune domains would be sampled independently
        if id(value) in owners:
            raise HpSpaceError(
                f"hp_space[{owners[id(value)]!r}] and hp_space[{path!r}] are both {value.call}: Optuna gives both "
                f"the same value, independent Tune domains would not; {_USE_TUNE}."
            )
        owners[id(value)] = path
        return value.to_tune(path)
    if isinstance(value, _Derived):
        raise HpSpaceError(
            f"hp_space[{path!r}] is computed from {', '.join(s.call for s in value.sources)}: it is neither a "
            f"suggestion nor a constant, and cannot be translated to Ray Tune; {_USE_TUNE}."
        )
    if isinstance(value, Mapping):
        return {k: _translate(v, f"{path}.{k}", owners) for k, v in value.items()}
    if isinstance(value, list):
        return [_translate(v, f"{path}[{i}]", owners) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_translate(v, f"{path}[{i}]", owners) for i, v in enumerate(value))
    if isinstance(value, (set, frozenset)) and any(isinstance(v, _Traced) for v in value):
        raise HpSpaceError(
            f"hp_space[{path!r}] is a set holding a suggestion; Tune only resolves dicts, lists and tuples."
        )
    return value
