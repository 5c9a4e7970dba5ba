"""MLflow around transformers' own MLflowCallback (report_to="mlflow").

transformers' `MLflowCallback` (transformers/integrations/integration_utils.py) does the logging:
on the world's process zero it starts or joins a run (`MLFLOW_RUN_ID` reattaches, an active run is
used as is, `MLFLOW_EXPERIMENT_NAME` picks the experiment, `MLFLOW_NESTED_RUN` nests), logs
`args.to_dict()` merged with the model config as params, every `on_log` as metrics at
`step=state.global_step` (asynchronously), and ends the run it started at `on_train_end`. It never
sets a tracking URI itself: with `MLFLOW_TRACKING_URI` unset it uses MLflow's default, which in
MLflow 3 is `sqlite:///<current working directory>/mlflow.db` with artifacts in `./mlruns` (MLflow 2:
the `./mlruns` file store). On a Ray worker the working directory is Ray's temporary folder, so
that default would vanish with the job. What raytrainer adds:

* `safe_params(args)`: the params to log, flattened, with secrets redacted (transformers only masks
  fields ending in `_token`); `MLflowCallback` here is transformers' callback logging these.
* `driver_env()` / `apply_env(env)`: hand the driver's tracking setup (URI, the active run the user
  opened with `with mlflow.start_run():`, experiment) to the rank-0 worker, which then logs into the
  very run the driver holds.
* `default_tracking_uri(output_dir)` / `use_local_store(output_dir)`: when nothing is set, a local
  store inside output_dir (sqlite db + artifacts), which outlives the process that trained.
* `log_final_artifacts(...)`, `run_url(...)`: the plot PNG and the final model as run artifacts, and
  where to look at the run; `run_id_of(trainer)`: the run a train() logged into (also under Ray).
* `start_sweep_run` / `trial_run` / `finish_sweep_run`: hyperparameter_search as one parent run with a
  child run per trial (tagged mlflow.parentRunId, the trial's hyperparameters as its params).

mlflow is imported inside the functions only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

from transformers.integrations.integration_utils import MLflowCallback as _HFMLflowCallback

from ..redact import REDACTED, is_secret_name, redact, redact_text  # noqa: F401 - the one redaction

# environment that configures MLflow (and transformers' callback); handed to the worker as is
_PASSED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
               "MLFLOW_TAGS", "MLFLOW_NESTED_RUN", "MLFLOW_FLATTEN_PARAMS", "MLFLOW_MAX_LOG_PARAMS",
               "HF_MLFLOW_LOG_ARTIFACTS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
               "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_ENABLE_ASYNC_LOGGING")
# where a run goes: set by the driver, never inherited by a worker or a trial
_WHERE_ENV = ("MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
DEFAULT_EXPERIMENT = "raytrainer"
LOCAL_STORE_DIR = "mlflow"  # <output_dir>/mlflow/{mlflow.db, artifacts/}


# ------------------------------------------------------------------------------ (a) params


def strip_userinfo(text: str) -> str:
    """`s3://KEY:SECRET@bucket/p` -> `s3://bucket/p`: the one redaction (redact.py) of a string."""
    return redact_text(text)


def _safe_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return strip_userinfo(value)
    if hasattr(value, "value") and isinstance(getattr(value, "value"), (str, int)):  # an Enum
        return value.value
    if isinstance(value, (list, tuple)):
        return str([_safe_value(v) for v in value])
    # an object (a pyarrow S3FileSystem, a callable...): its type only. str() of an object may embed
    # its credentials, so it is never logged.
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def safe_params(args, model_config: Mapping | None = None, max_length: int = 6000) -> dict[str, Any]:
    """The params of a run, as MLflow should get them: flat, with no secret in them.

    `args`: TrainingArguments (its `to_dict()`) or a mapping. Nested dicts are flattened to
    `outer.inner` keys. Values of fields named like a secret (*token*, *secret*, *password*, *key*,
    *credential*, *auth*) are replaced by "<redacted>" when set; objects (storage_filesystem: an
    S3FileSystem holding credentials) are logged by type only; user:password@ is cut out of URIs.
    `model_config` (a model's config.to_dict()) is merged under the args, as transformers does.
    Values longer than MLflow's limit are dropped (transformers drops them too).
    """
    if isinstance(args, Mapping):
        raw = dict(args)
    else:
        raw = args.to_dict()
        for name in ("storage_filesystem",):  # to_dict() keeps the object itself
            if name in raw:
                raw[name] = getattr(args, name, raw[name])
    combined = {**dict(model_config or {}), **raw}
    out: dict[str, Any] = {}

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            if not value:
                out[prefix] = "{}"
            for k, v in value.items():
                put(f"{prefix}.{k}" if prefix else str(k), v)
            return
        name = prefix.rsplit(".", 1)[-1]
        if (is_secret_name(name) or is_secret_name(prefix)) and not isinstance(value, (bool, int, float)):
            out[prefix] = None if value in (None, "") else REDACTED
            return
        value = _safe_value(value)
        if value is not None and len(str(value)) > max_length:
            return
        out[prefix] = value

    for key, value in combined.items():
        put(str(key), value)
    return out


class MLflowCallback(_HFMLflowCallback):
    """transformers' MLflowCallback, logging `safe_params(args, model.config)` as the run's params.

    Everything else (run start/reattach, metrics at each on_log, end of run, checkpoint artifacts
    with HF_MLFLOW_LOG_ARTIFACTS) is transformers' own code, with one guard: only the process that
    started a run ends it. transformers' callback ends "its" run in on_train_end and in __del__; a
    copy of rank 0's callback state poured into the driver's callback after a Ray run (rank0_state.py)
    would otherwise end the run the *driver* holds active (`with mlflow.start_run():`) when that
    object is collected.
    """

    _owner_pid = None
    run_id = None  # the run this callback logged into (rank 0's; it reaches the driver's copy after a Ray run)

    def setup(self, args, state, model):
        config = getattr(model, "config", None)
        params = safe_params(args, config.to_dict() if config is not None else None)
        self._owner_pid = os.getpid()
        out = super().setup(_ArgsWithParams(args, params), state, None)
        active = self._ml_flow.active_run() if state.is_world_process_zero else None
        if active is not None:
            self.run_id = active.info.run_id
        return out

    def _owns_run(self) -> bool:
        return self._owner_pid == os.getpid()

    def on_train_end(self, args, state, control, **kwargs):
        if self._owns_run():
            return super().on_train_end(args, state, control, **kwargs)

    def __del__(self):
        if self._owns_run():
            super().__del__()


class _ArgsWithParams:
    """`args` as MLflowCallback.setup reads it, whose to_dict() is the safe params."""

    def __init__(self, args, params):
        self._args = args
        self._params = params

    def to_dict(self):
        return dict(self._params)

    def __getattr__(self, name):
        if name == "_args":  # unpickling looks attributes up before __dict__ is filled: no endless recursion
            raise AttributeError(name)
        return getattr(self._args, name)


def run_id_of(trainer) -> str | None:
    """The MLflow run a trainer's last train() logged into (in-process or on the rank-0 worker), else None."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, MLflowCallback) and cb.run_id:
            return cb.run_id
    return None


def use_safe_mlflow_callback(trainer) -> bool:
    """Swap transformers' MLflowCallback in `trainer` (report_to="mlflow") for the one above.

    Returns True when a callback was swapped. Call it before train().
    """
    handler = trainer.callback_handler
    for i, cb in enumerate(handler.callbacks):
        if type(cb) is _HFMLflowCallback:
            handler.callbacks[i] = MLflowCallback()
            return True
    return False


# ------------------------------------------------------------------------ (b) driver -> worker


def _absolute_uri(uri: str, base: str | None = None) -> str:
    """A tracking URI that means the same thing from any working directory."""
    base = base or os.getcwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.join(base, uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:///") and not uri.startswith("file://"):
        return "file://" + os.path.join(base, uri[len("file:"):])
    if "://" not in uri and ":" not in uri.split(os.sep, 1)[0]:  # a bare path
        return os.path.join(base, uri)
    return uri


def driver_env(output_dir: str | None = None) -> dict[str, str]:
    """On the driver: the MLflow environment the rank-0 worker needs to log where the driver would.

    - MLFLOW_TRACKING_URI: the one set (env or mlflow.set_tracking_uri), made absolute; if none is
      set and `output_dir` is given, the local store in output_dir (default_tracking_uri).
    - MLFLOW_RUN_ID / MLFLOW_EXPERIMENT_NAME: the driver's active run (`with mlflow.start_run():`)
      and its experiment, so the worker's MLflowCallback reattaches to that run.
    - the other MLFLOW_* / HF_MLFLOW_* variables the callback reads, as set.
    Returns {} when mlflow is not installed.
    """
    try:
        import mlflow
    except ImportError:
        return {}
    env = {k: os.environ[k] for k in _PASSED_ENV if os.environ.get(k)}
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None)
    if uri is None and output_dir is not None:
        uri = default_tracking_uri(output_dir)
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = _absolute_uri(str(uri))
    run = mlflow.active_run()
    if run is not None:
        env["MLFLOW_RUN_ID"] = run.info.run_id
        try:
            experiment = mlflow.MlflowClient(env.get("MLFLOW_TRACKING_URI")).get_experiment(run.info.experiment_id)
            env["MLFLOW_EXPERIMENT_NAME"] = experiment.name
        except Exception:  # noqa: BLE001 - the run id alone is enough to reattach
            pass
        env.pop("MLFLOW_EXPERIMENT_ID", None)
    elif "MLFLOW_EXPERIMENT_NAME" not in env and "MLFLOW_EXPERIMENT_ID" not in env:
        # mlflow.set_experiment(...) on the driver lives in this process only: the worker's callback
        # would start its run in the Default experiment
        name = _fluent_experiment_name(env.get("MLFLOW_TRACKING_URI"))
        if name:
            env["MLFLOW_EXPERIMENT_NAME"] = name
    # the driver prints the run's "View run ... at: <url>" line when it ends the run; rank 0 would print it too
    env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return env


def _fluent_experiment_name(tracking_uri: str | None) -> str | None:
    """The experiment mlflow.set_experiment() chose in this process, if any."""
    from mlflow.tracking import fluent

    experiment_id = getattr(fluent, "_active_experiment_id", None)
    if not experiment_id:
        return None
    try:
        import mlflow

        return mlflow.MlflowClient(tracking_uri).get_experiment(experiment_id).name
    except Exception:  # noqa: BLE001 - another store's id: the worker falls back to MLflow's default
        return None


def apply_env(env: Mapping[str, str]) -> None:
    """On the worker (before its Trainer's callbacks run): make `driver_env()`'s values current.

    Sets the variables and, when mlflow is already imported here with another tracking URI, points
    it at the driver's. Call it on rank 0 (harmless on the others: MLflowCallback acts on rank 0).
    """
    if not env:
        return
    if env.get("MLFLOW_TRACKING_URI"):
        # the driver's choice of run and experiment replaces what this process inherited (a raylet started
        # with MLFLOW_EXPERIMENT_NAME set would otherwise send rank 0's run to that experiment)
        for name in _WHERE_ENV:
            if name not in env:
                os.environ.pop(name, None)
    os.environ.update({k: str(v) for k, v in env.items()})
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and env.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])


# ---------------------------------------------------------------------------- (c) local store


def local_store_dir(output_dir: str) -> str:
    return os.path.join(os.path.abspath(output_dir), LOCAL_STORE_DIR)


def default_tracking_uri(output_dir: str) -> str:
    """`sqlite:///<output_dir>/mlflow/mlflow.db`: the tracking store used when none is set."""
    return "sqlite:///" + os.path.join(local_store_dir(output_dir), "mlflow.db")


def use_local_store(output_dir: str, experiment_name: str | None = None) -> str:
    """Point MLflow at the local store in output_dir, with the experiment's artifacts there too.

    MLflow's sqlite store puts artifacts in `./mlruns` of the working directory unless the
    experiment says otherwise, so the experiment is created here with
    `artifact_location=<output_dir>/mlflow/artifacts`. Sets MLFLOW_TRACKING_URI and (if unset)
    MLFLOW_EXPERIMENT_NAME in os.environ, so transformers' callback uses them; returns the URI.
    """
    import mlflow

    store = local_store_dir(output_dir)
    os.makedirs(store, exist_ok=True)
    uri = default_tracking_uri(output_dir)
    name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location="file://" + os.path.join(store, "artifacts"))
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", name)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(name)  # the fluent API's experiment too (an earlier set_experiment names another store's)
    return uri


# ------------------------------------------------------------------------------ (d) artifacts


def log_final_artifacts(run_id: str, plot_path: str | None = None, model_dir: str | None = None,
                        tracking_uri: str | None = None, extra: Mapping[str, str] | None = None) -> list[str]:
    """Log the plot PNG (at the artifact root) and the final model folder (under `model/`) to a run.

    Uses MlflowClient with the run id, so it works after transformers' callback has ended the run
    and from a process that never had it active. Returns the artifact paths logged. `extra`:
    {local_file_or_dir: artifact_dir} logged the same way.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    logged = []
    if plot_path and os.path.isfile(plot_path):
        client.log_artifact(run_id, plot_path)
        logged.append(os.path.basename(plot_path))
    if model_dir and os.path.isdir(model_dir):
        files = [f for f in os.listdir(model_dir) if not f.startswith(("checkpoint-", "tmp-checkpoint-"))
                 and f not in (LOCAL_STORE_DIR, "training_plot.png", "sweep_plot.png") and os.path.isfile(os.path.join(model_dir, f))]
        for name in sorted(files):  # the final model's files, not the checkpoints or the local store beside them
            client.log_artifact(run_id, os.path.join(model_dir, name), artifact_path="model")
        if files:
            logged.append("model")
    for local, artifact_dir in (extra or {}).items():
        if os.path.isdir(local):
            client.log_artifacts(run_id, local, artifact_path=artifact_dir)
        elif os.path.isfile(local):
            client.log_artifact(run_id, local, artifact_path=artifact_dir)
        else:
            continue
        logged.append(artifact_dir or os.path.basename(local))
    return logged


def run_url(run_id: str, tracking_uri: str | None = None) -> str:
    """Where a person looks at the run: the UI URL for an http(s) server, else the store and a command."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001
        experiment_id = None
    if uri.startswith(("http://", "https://")):
        base = strip_userinfo(uri).rstrip("/")
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else f"{base} (run {run_id})"
    uri = redact_text(uri)
    return f"{uri} run {run_id} (view: mlflow ui --backend-store-uri {uri})"


# -------------------------------------------------------------------------------- (e) sweeps
# A sweep is one parent run (opened on the driver) with one child run per trial (opened in the
# trial's process, tagged mlflow.parentRunId): the MLflow UI shows the trials nested under the sweep.

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "raytrainer.trial_id"
SWEEP_TAG = "raytrainer.sweep"


def start_sweep_run(args, name: str, settings: Mapping[str, Any] | None = None) -> dict | None:
    """On the driver: the sweep's parent run, or None when report_to has no mlflow.

    The user's active run (`with mlflow.start_run():`) is the parent; else a run named after the
    sweep is started (in the experiment MLflow would pick; with no tracking URI set, the local store
    in output_dir). `settings` (n_trials, scheduler, the search space...) are logged as `sweep.*`
    params. Returns what the trials need (`trial_run`) and `finish_sweep_run` takes.
    """
    if "mlflow" not in (args.report_to or []):
        return None
    import mlflow

    active = mlflow.active_run()
    if active is None and not mlflow.is_tracking_uri_set():
        use_local_store(args.output_dir)
    run = active or mlflow.start_run(run_name=name, tags={SWEEP_TAG: redact_text(name)})
    if settings:
        try:
            mlflow.MlflowClient().log_batch(run.info.run_id, params=_params(
                {f"sweep.{k}": v for k, v in safe_params(dict(settings)).items() if v is not None}))
        except Exception as e:  # noqa: BLE001 - the user's own run may hold these params already
            import logging

            logging.getLogger("raytrainer").warning("sweep settings not logged to MLflow run %s: %s",
                                                    run.info.run_id, e)
    env = {k: os.environ[k] for k in _PASSED_ENV if os.environ.get(k) and k not in _WHERE_ENV}
    env["MLFLOW_TRACKING_URI"] = _absolute_uri(str(mlflow.get_tracking_uri()))
    return {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "env": env,
            "owned": active is None, "name": name}


def _params(values: Mapping[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


@contextmanager
def trial_run(sweep: Mapping[str, Any] | None, trial_name: str, trial_id: str,
              hyperparameters: Mapping[str, Any] | None = None, resumed: bool = False):
    """In a trial's process: `with trial_run(...):` keeps the trial's child run active while it trains.

    transformers' MLflowCallback logs into the active run (in-process trials); a multi-worker trial's
    rank 0 reattaches to it (driver_env() hands it MLFLOW_RUN_ID). `hyperparameters` that are no
    TrainingArguments field (model_init's) are logged here; the callback logs the fields with the
    trial's values. Ends FINISHED, or FAILED when the trial raises. `sweep` None: does nothing.
    """
    if sweep is None:
        yield None
        return
    import mlflow

    for name in _WHERE_ENV:
        os.environ.pop(name, None)
    apply_env(sweep["env"])
    while mlflow.active_run() is not None:  # a run left open by an earlier trial in this process
        mlflow.end_run()
    tags = {PARENT_TAG: sweep["run_id"], TRIAL_TAG: trial_id, SWEEP_TAG: redact_text(sweep["name"])}
    if resumed:  # Tune restarted the trial from a checkpoint (PBT exploit or pause): a run of its own
        tags["raytrainer.resumed"] = "true"
    run = mlflow.start_run(experiment_id=sweep["experiment_id"], run_name=trial_name, tags=tags)
    status = "FAILED"
    try:
        if hyperparameters:
            mlflow.log_params({k: v for k, v in safe_params(dict(hyperparameters)).items() if v is not None})
        yield run
        status = "FINISHED"
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:
            mlflow.end_run(status)
        else:  # a worker's callback ended it already (multi-worker trial): set the trial's status
            mlflow.MlflowClient().set_terminated(run.info.run_id, status)


def finish_sweep_run(sweep: Mapping[str, Any] | None, results=None, best=None, failed: bool = False) -> None:
    """On the driver after the sweep: end children a stopped trial left RUNNING, record the best trial
    on the parent, end the parent if the sweep started it."""
    if sweep is None:
        return
    import mlflow

    client = mlflow.MlflowClient()
    run_id = sweep["run_id"]
    errored = {(r.metrics or {}).get("trial_id") for r in (results or []) if getattr(r, "error", None)}
    try:
        # a trial the scheduler stopped (ASHA) is ended from outside, before its own code could end its run
        left = client.search_runs([sweep["experiment_id"]],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = 'RUNNING'")
        for child in left:
            client.set_terminated(child.info.run_id,
                                  "FAILED" if child.data.tags.get(TRIAL_TAG) in errored else "FINISHED")
        if best is not None:
            client.set_tag(run_id, "raytrainer.best_trial_id", str(best.run_id))
            if isinstance(best.objective, (int, float)):
                client.log_metric(run_id, "best_objective", float(best.objective))
            for k, v in safe_params(dict(best.hyperparameters or {})).items():
                client.set_tag(run_id, f"raytrainer.best.{k}", redact_text(str(v)))
    finally:
        if sweep["owned"]:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run("FAILED" if failed else "FINISHED")
            else:
                client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
