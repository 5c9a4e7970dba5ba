"""PNG plots of a run's logs and of a sweep's trials (matplotlib, Agg backend, imported lazily).

    plot_run(trainer.state.log_history, "out/training_plot.png")
    plot_sweep(sweep_trials(trainer.sweep_results, max_steps=args.max_steps), "out/sweep_plot.png")

`PlotCallback` writes `<output_dir>/training_plot.png` at the end of training on the world's
process zero. Every function copes with what a real run may lack (no evaluation, no loss, an
empty history): a panel without data is left out, and a figure with nothing to show says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from transformers import TrainerCallback

from ..redact import redact_text

PLOT_FILE = "training_plot.png"
SWEEP_PLOT_FILE = "sweep_plot.png"

# logged alongside eval metrics, not metrics of the model
_EVAL_BOOKKEEPING = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")
_TRAIN_CURVES = ("loss", "grad_norm")


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)  # files only: no display, safe in threads and on workers
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # a 0-d tensor / numpy scalar
            value = value.item()
        except Exception:  # noqa: BLE001
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def run_series(log_history: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, tuple[list, list]]]:
    """log_history -> {"train": {key: (steps, values)}, "eval": {...}, "lr": {...}}.

    An entry without a step (an evaluate() before training has none in some histories) counts as step 0.
    Only finite numbers are kept (logging_nan_inf_filter=False may log inf).
    """
    groups: dict[str, dict[str, tuple[list, list]]] = {"train": {}, "eval": {}, "lr": {}}
    for entry in log_history or []:
        if not isinstance(entry, Mapping):
            continue
        step = _number(entry.get("step", 0)) or 0.0
        for key, raw in entry.items():
            value = _number(raw)
            if value is None or key in ("step", "epoch", "total_flos"):
                continue
            if key == "learning_rate":
                group = "lr"
            elif key.startswith("eval_") or key.startswith("test_"):
                if key.endswith(_EVAL_BOOKKEEPING):
                    continue
                group = "eval"
            elif key in _TRAIN_CURVES:
                group = "train"
            else:
                continue  # train_runtime, train_loss (the run's mean), tokens seen ...
            steps, values = groups[group].setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    return groups


def plot_run(log_history, path: str | os.PathLike, title: str | None = None) -> str:
    """Write a PNG of train loss, eval metrics and learning rate against step; return its path.

    Panels: losses (train `loss` and every `eval_*loss`), other eval metrics (accuracy, ...),
    learning rate. A panel with no data is left out; with nothing at all the figure says so.
    """
    plt = _pyplot()
    series = run_series(log_history)
    losses = {k: v for k, v in series["train"].items() if k == "loss"}
    losses.update({k: v for k, v in series["eval"].items() if k.endswith("loss")})
    metrics = {k: v for k, v in series["eval"].items() if not k.endswith("loss")}
    panels = [(name, data) for name, data in (("loss", losses), ("eval metrics", metrics),
                                              ("learning rate", series["lr"])) if data]
    rows = max(1, len(panels))
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.8 * rows + 0.6), sharex=True, squeeze=False)
    axes = axes[:, 0]
    try:
        if not panels:
            axes[0].text(0.5, 0.5, "nothing logged (no loss, no eval metrics, no learning rate)",
                         ha="center", va="center", transform=axes[0].transAxes, color="0.4")
            axes[0].set_xticks([])
            axes[0].set_yticks([])
        for ax, (name, data) in zip(axes, panels):
            for key, (steps, values) in data.items():
                eval_curve = key.startswith(("eval_", "test_"))
                label = key.removeprefix("eval_") if name == "eval metrics" else key
                if name == "loss":
                    label = "train loss" if key == "loss" else key.replace("_", " ")
                ax.plot(steps, values, label=label, linewidth=1.6,
                        marker="o" if eval_curve or len(steps) <= 20 else None,
                        markersize=4, linestyle="--" if eval_curve and name == "loss" else "-")
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
            if name == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            if len(data) > 1 or name != "learning rate":
                ax.legend(loc="best", fontsize=9, frameon=False)
        axes[-1].set_xlabel("step")
        if title:
            fig.suptitle(redact_text(title))
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


# ------------------------------------------------------------------------------------ sweeps


def sweep_trials(results, max_steps: int | None = None, metric: str = "objective") -> list[dict]:
    """A Tune ResultGrid (trainer.sweep_results) -> the trial dicts plot_sweep takes.

    Each trial: {"name", "steps", "values", "stopped_early", "exploits": [(step, value), ...], "config"}.
    A trial is stopped early when its last reported step is below `max_steps` (ASHA stopped it; with
    max_steps unknown, below the longest trial's last step). A PBT exploit shows in Tune's results as
    a change of the trial's hyperparameters between two reports (the exploit copies the donor's
    state and mutates the hyperparameters): the report after the change is marked.
    """
    trials = []
    for result in results:
        frame = getattr(result, "metrics_dataframe", None)
        if frame is None or metric not in getattr(frame, "columns", ()):
            continue
        frame = frame[frame[metric].notna()]
        if "step" in frame.columns:
            steps = [float(s) for s in frame["step"]]
        else:
            steps = [float(s) for s in frame.get("training_iteration", range(1, len(frame) + 1))]
        values = [float(v) for v in frame[metric]]
        config_cols = [c for c in frame.columns if c.startswith("config/")]
        exploits = []
        previous = None
        for i, row in enumerate(frame[config_cols].itertuples(index=False, name=None) if config_cols else []):
            if previous is not None and row != previous:
                exploits.append((steps[i], values[i]))
            previous = row
        name = (result.metrics or {}).get("trial_id") or os.path.basename(str(getattr(result, "path", "")))
        trials.append({"name": str(name), "steps": steps, "values": values, "exploits": exploits,
                       "config": dict(result.config or {}), "stopped_early": None})
    longest = max((t["steps"][-1] for t in trials if t["steps"]), default=0)
    end = max_steps if max_steps and max_steps > 0 else longest
    for t in trials:
        t["stopped_early"] = bool(t["steps"]) and t["steps"][-1] < end
    return trials


def plot_sweep(trials, path: str | os.PathLike, metric: str = "objective", title: str | None = None,
               max_steps: int | None = None) -> str:
    """Write a PNG of each trial's objective against step; return its path.

    `trials`: a Tune ResultGrid, or a list of dicts {"name", "steps", "values", "stopped_early",
    "exploits": [(step, value), ...]} (sweep_trials makes them). A trial stopped early (ASHA) ends in
    a red cross, a completed one in a dot; a PBT exploit is a black triangle where the trial
    continued from a better trial's checkpoint.
    """
    trials = list(trials)
    if trials and not isinstance(trials[0], Mapping):  # Tune Results (a ResultGrid iterates over them)
        trials = sweep_trials(trials, max_steps=max_steps, metric=metric)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    try:
        drawn = [t for t in trials if t.get("steps")]
        colors = plt.get_cmap("tab10")
        stopped = exploited = finished = False
        for i, trial in enumerate(drawn):
            steps, values = list(trial["steps"]), list(trial["values"])
            color = colors(i % 10)
            ax.plot(steps, values, color=color, linewidth=1.5, alpha=0.9, marker="o", markersize=3,
                    label=str(trial.get("name", i)))  # a trial stopped at its first report is one point
            if trial.get("stopped_early"):
                ax.plot(steps[-1], values[-1], marker="X", markersize=10, color="crimson",
                        markeredgecolor="white", linestyle="none", zorder=5)
                stopped = True
            else:
                ax.plot(steps[-1], values[-1], marker="o", markersize=6, color=color, linestyle="none", zorder=5)
                finished = True
            for step, value in trial.get("exploits") or []:
                ax.plot(step, value, marker="^", markersize=9, color="black", linestyle="none", zorder=6)
                exploited = True
        if not drawn:
            ax.text(0.5, 0.5, "no trial reported an objective", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        from matplotlib.lines import Line2D

        handles, labels = ax.get_legend_handles_labels()
        if len(handles) > 8:  # many trials: the markers explain, the colours need no names
            handles, labels = [], []
        if finished:
            handles.append(Line2D([], [], marker="o", color="0.3", linestyle="none"))
            labels.append("ran to the end")
        if stopped:
            handles.append(Line2D([], [], marker="X", color="crimson", markersize=9, linestyle="none"))
            labels.append("stopped early (scheduler)")
        if exploited:
            handles.append(Line2D([], [], marker="^", color="black", linestyle="none"))
            labels.append("PBT exploit (continued from a better trial)")
        if handles:
            ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.set_title(redact_text(title or f"{len(drawn)} trials"))
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------- callback


class PlotCallback(TrainerCallback):
    """Writes `<output_dir>/training_plot.png` (plot_run of state.log_history) when training ends.

    Only the world's process zero plots. A failure to plot is logged, never raised: a plot must not
    fail a finished training run. `path` is the PNG written last (None before).
    """

    def __init__(self, filename: str = PLOT_FILE):
        self.filename = filename
        self.path: str | None = None

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        target = os.path.join(os.path.abspath(args.output_dir), self.filename)
        try:
            self.path = plot_run(state.log_history, target, title=args.run_name or None)
        except Exception as e:  # noqa: BLE001
            import logging

            logging.getLogger("raytrainer").warning("training plot not written to %s: %s: %s", target,
                                                    type(e).__name__, e)
