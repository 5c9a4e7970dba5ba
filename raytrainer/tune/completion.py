"""A trial's completion, recorded by raytrainer itself in the trial's folder, so a resumed sweep never runs it twice.

Tune records a trial as done in its experiment state, which it saves every few seconds: a driver
killed after a trial's last result but before that save resumes the trial from scratch (it ran twice and
result.json got a second objective). Before a trial sends its final report to Tune, it writes
`<storage>/<sweep>/<trial>/raytrainer_trial_done.json` (Tune's trial id, the final metrics) atomically
(a temporary file, then a rename / a single-object put). A resumed trial with this record for its own
trial id returns at once; the sweep takes the trial's result from the record. The trial id (random per
sweep) keeps a fresh sweep reusing a name from skipping its trials.
"""

from __future__ import annotations

import json

DONE_FILE = "raytrainer_trial_done.json"


def _folder(storage_path: str, storage_filesystem, sweep: str, trial_name: str | None = None):
    from .. import storage

    fs, base = storage.resolve_storage(storage_path, storage_filesystem)
    folder = storage.join_path(base, sweep)
    return fs, (storage.join_path(folder, trial_name) if trial_name else folder)


def record_done(storage_path, storage_filesystem, sweep: str, trial_name: str, metrics: dict) -> None:
    fs, folder = _folder(storage_path, storage_filesystem, sweep, trial_name)
    fs.create_dir(folder, recursive=True)
    data = json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}).encode()
    tmp = f"{folder}/{DONE_FILE}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, f"{folder}/{DONE_FILE}")


def _read(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            record = json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def config_key(config: dict) -> str:
    """The trial's hyperparameters as recorded: a PBT exploit restarts a finished trial with other ones."""
    return json.dumps(config, sort_keys=True, default=str)


def recorded(storage_path, storage_filesystem, sweep: str, trial_name: str, trial_id: str,
             config: dict | None = None) -> dict | None:
    """The final metrics this very trial (same Tune trial id, same hyperparameters) recorded, or None.

    PBT may restore a trial after its final result with the donor's state and mutated hyperparameters:
    that is a new run of the trial, not a rerun of the finished one."""
    fs, folder = _folder(storage_path, storage_filesystem, sweep, trial_name)
    record = _read(fs, f"{folder}/{DONE_FILE}")
    if record is None or record.get("trial_id") != trial_id:
        return None
    if config is not None and record.get("config") not in (None, config_key(config)):
        return None
    return record


def all_recorded(storage_path, storage_filesystem, sweep: str) -> dict[str, dict]:
    """{Tune trial id: final metrics} of every trial of the sweep that recorded its completion."""
    from .. import storage

    fs, folder = _folder(storage_path, storage_filesystem, sweep)
    done = {}
    for name in storage.list_dirs(fs, folder):
        record = _read(fs, f"{folder}/{name}/{DONE_FILE}")
        if record is not None and record.get("trial_id"):
            done[record["trial_id"]] = record
    return done
