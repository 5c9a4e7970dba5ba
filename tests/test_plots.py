"""raytrainer.tracking.plots: PNGs of a run and of a sweep, robust to what a run may lack."""

from __future__ import annotations

import math

import pytest

from raytrainer.tracking.plots import PlotCallback, plot_run, plot_sweep, run_series, sweep_trials


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG header (the file is a real PNG, not just a file)."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def history(steps=20, eval_every=5, with_eval=True, with_loss=True):
    out = []
    for s in range(1, steps + 1):
        entry = {"learning_rate": 1e-3 * (1 - s / steps), "epoch": s / steps, "step": s, "grad_norm": 1.0}
        if with_loss:
            entry["loss"] = 3 * math.exp(-s / 8)
        out.append(entry)
        if with_eval and s % eval_every == 0:
            out.append({"eval_loss": 3 * math.exp(-s / 8) + 0.2, "eval_accuracy": 1 - math.exp(-s / 5),
                        "eval_runtime": 0.1, "eval_samples_per_second": 99.0, "epoch": s / steps, "step": s})
    out.append({"train_runtime": 1.0, "train_loss": 1.0, "total_flos": 1.0, "epoch": 1.0, "step": steps})
    return out


def test_run_series_splits_train_eval_lr():
    series = run_series(history())
    assert series["train"]["loss"][0] == list(map(float, range(1, 21)))
    assert set(series["eval"]) == {"eval_loss", "eval_accuracy"}  # runtime/throughput are not metrics
    assert series["eval"]["eval_loss"][0] == [5.0, 10.0, 15.0, 20.0]
    assert len(series["lr"]["learning_rate"][1]) == 20
    assert "train_loss" not in series["train"]  # the run's mean is not a curve


@pytest.mark.parametrize("case", ["full", "no_eval", "no_loss", "only_eval", "empty", "nan", "no_step"])
def test_plot_run_never_fails(tmp_path, case):
    logs = {
        "full": history(),
        "no_eval": history(with_eval=False),
        "no_loss": history(with_loss=False),
        "only_eval": [{"eval_loss": 1.0, "step": 0}],
        "empty": [],
        "nan": [{"loss": float("nan"), "step": 1}, {"loss": float("inf"), "step": 2}, {"loss": 1.0, "step": 3}],
        "no_step": [{"loss": 1.0}, {"loss": 0.5}],
    }[case]
    path = plot_run(logs, tmp_path / "sub" / "plot.png", title=case)
    width, height = png_size(path)
    assert width > 400 and height > 200


def test_plot_run_has_one_panel_per_kind_of_data(tmp_path):
    """3 panels (loss, eval metrics, lr) make a taller figure than 1 (lr only)."""
    _, full = png_size(plot_run(history(), tmp_path / "a.png"))
    _, lr_only = png_size(plot_run([{"learning_rate": 1e-3, "step": 1}], tmp_path / "b.png"))
    assert full > 2 * lr_only


class _State:
    def __init__(self, zero, logs):
        self.is_world_process_zero = zero
        self.log_history = logs


class _Args:
    def __init__(self, output_dir):
        self.output_dir = str(output_dir)
        self.run_name = "r"


def test_plot_callback_writes_on_process_zero_only(tmp_path):
    cb = PlotCallback()
    cb.on_train_end(_Args(tmp_path / "rank1"), _State(False, history()), None)
    assert not (tmp_path / "rank1").exists()
    cb.on_train_end(_Args(tmp_path / "rank0"), _State(True, []), None)  # empty history: still a PNG
    assert cb.path == str(tmp_path / "rank0" / "training_plot.png")
    png_size(cb.path)


def test_plot_callback_in_a_real_trainer(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import raytrainer

    rows = [{"input_ids": torch.arange(8) + i, "labels": torch.arange(8) + i} for i in range(16)]
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=1, report_to=[],
                                        per_device_train_batch_size=4, save_strategy="no", eval_strategy="steps",
                                        eval_steps=2)
    trainer = raytrainer.Trainer(model=GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)),
                                 args=args, train_dataset=rows, eval_dataset=rows[:4], callbacks=[PlotCallback()])
    trainer.train()
    png_size(tmp_path / "training_plot.png")


class _Result:
    """What sweep_trials reads from a Tune Result: metrics_dataframe, metrics, config, path."""

    def __init__(self, trial_id, rows, config):
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame(rows)
        self.metrics = {"trial_id": trial_id}
        self.config = config
        self.path = f"/x/{trial_id}"


def test_sweep_trials_find_early_stops_and_exploits():
    grid = [
        _Result("a", [{"step": s, "objective": 3 - s / 10, "config/learning_rate": 1e-3} for s in (4, 8, 12, 16)],
                {"learning_rate": 1e-3}),
        _Result("b", [{"step": s, "objective": 4 - s / 20, "config/learning_rate": 1e-5} for s in (4, 8)],
                {"learning_rate": 1e-5}),
        _Result("c", [{"step": 4, "objective": 3.5, "config/learning_rate": 1e-4},
                      {"step": 8, "objective": 2.3, "config/learning_rate": 1.2e-3},  # exploited a, mutated lr
                      {"step": 12, "objective": 2.0, "config/learning_rate": 1.2e-3},
                      {"step": 16, "objective": 1.6, "config/learning_rate": 1.2e-3}], {"learning_rate": 1.2e-3}),
    ]
    trials = {t["name"]: t for t in sweep_trials(grid, max_steps=16)}
    assert trials["b"]["stopped_early"] and not trials["a"]["stopped_early"] and not trials["c"]["stopped_early"]
    assert trials["c"]["exploits"] == [(8.0, 2.3)] and trials["a"]["exploits"] == []
    assert trials["a"]["steps"] == [4.0, 8.0, 12.0, 16.0]


def test_plot_sweep_from_results_and_from_dicts(tmp_path):
    grid = [_Result(str(i), [{"step": s, "objective": 3 - s / (10 + i)} for s in range(2, 2 + 2 * (i + 1), 2)], {})
            for i in range(12)]
    png_size(plot_sweep(grid, tmp_path / "many.png", max_steps=24))  # 12 trials: legend of markers only
    png_size(plot_sweep([], tmp_path / "none.png"))
    png_size(plot_sweep([{"name": "x", "steps": [1], "values": [1.0], "stopped_early": True,
                          "exploits": [(1, 1.0)]}], tmp_path / "one.png"))
