"""Tracking around a run: plots of its logs (plots.py), MLflow helpers (mlflow.py) and progress as plain
lines for job logs (progress.py).

They import their heavy dependency (matplotlib, mlflow) only when a function is called, so
`import raytrainer.tracking` costs nothing.
"""

from .plots import PlotCallback, plot_run, plot_sweep, sweep_trials

__all__ = ["PlotCallback", "plot_run", "plot_sweep", "sweep_trials"]
