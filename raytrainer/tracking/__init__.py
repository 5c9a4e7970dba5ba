"""Tracking around a run: plots of its logs (plots.py) and MLflow helpers (mlflow.py).

Both import their heavy dependency (matplotlib, mlflow) only when a function is called, so
`import raytrainer.tracking` costs nothing.
"""

from .plots import PlotCallback, plot_run, plot_sweep, sweep_trials

__all__ = ["PlotCallback", "plot_run", "plot_sweep", "sweep_trials"]
