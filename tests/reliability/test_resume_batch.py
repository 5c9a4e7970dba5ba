"""Resume with another global batch (per-device batch, gradient accumulation or worker count), in-process.

A checkpoint records its data position in samples (raytrainer_run.pt: epoch, samples trained). The epoch
order is a function of (seed, epoch) only, so a resume with another global batch continues at that
sample when the new global batch divides it, else at the new batch's last boundary before it (the
samples in between are trained twice, and a warning counts them). A recording dataset shows which
sample indices each run trained on: the first run up to checkpoint-3 and the resumed run together are
exactly one pass over each epoch's order (or that pass plus the counted repeats).
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import raytrainer
from raytrainer.data.checks import SAMPLE_ROWS
from raytrainer.data.sampling import epoch_permutation
from tests.helpers import CountingDataset, StopAt, lm_examples, make_args, tiny_gpt2

N = 24  # samples per epoch
SEED = 42  # make_args' seed: the sampler's order is epoch_permutation(N, SEED, epoch)
CKPT_STEP = 3  # the first run (batch 4, no accumulation) stops after checkpoint-3: 12 samples into epoch 0



def order(epoch):
    return epoch_permutation(N, SEED, epoch).tolist()


def trainer_for(out, data, batch, ga, callbacks=(), trainer_cls=raytrainer.Trainer, **kw):
    args = make_args(raytrainer.TrainingArguments, out, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=ga, **kw)
    return trainer_cls(model=tiny_gpt2(seed=123), args=args, train_dataset=data, callbacks=list(callbacks))


def trained(data):
    """The indices the loop fetched (data/checks.py reads the first SAMPLE_ROWS rows before training)."""
    assert data.fetched[:SAMPLE_ROWS] == list(range(SAMPLE_ROWS))
    return data.fetched[SAMPLE_ROWS:]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """Batch 4 x accumulation 1 (global batch 4), stopped after checkpoint-3; returns (checkpoint, indices)."""
    out = tmp_path_factory.mktemp("first")
    data = CountingDataset(lm_examples(N))
    trainer = trainer_for(out, data, 4, 1, [StopAt(CKPT_STEP)], save_strategy="steps", save_steps=CKPT_STEP)
    trainer.train()
    trainer.wait_for_checkpoints()
    return out / f"checkpoint-{CKPT_STEP}", trained(data)


def resume(tmp_path, checkpoint, batch, ga, **kw):
    data = CountingDataset(lm_examples(N))
    trainer = trainer_for(tmp_path, data, batch, ga, **kw)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, trained(data)


def test_checkpoint_records_its_data_position_in_samples(first):
    checkpoint, seen = first
    meta = torch.load(checkpoint / "raytrainer_run.pt", weights_only=True)
    assert meta["global_batch_size"] == 4 and meta["world_size"] == 1
    assert meta["data_position"] == {"epoch": 0, "samples": 12, "num_samples": N, "order": "permutation"}
    assert seen == order(0)[:12]


# per-device batch, accumulation -> (global batch, steps per epoch): 12 samples trained divide each
@pytest.mark.parametrize("batch,ga,steps_per_epoch", [(2, 1, 12), (2, 3, 4)], ids=["batch2", "batch2xga3"])
def test_dividing_global_batch_continues_at_the_next_sample(tmp_path, first, caplog, batch, ga, steps_per_epoch):
    checkpoint, seen = first
    with caplog.at_level(logging.INFO, logger="raytrainer"):
        trainer, resumed = resume(tmp_path, checkpoint, batch, ga)
    # epoch 0 continues at sample 12: with the first run's 12, one pass, nothing skipped or repeated
    assert seen + resumed[:N - 12] == order(0)
    assert resumed[N - 12:] == order(1)  # then the whole of epoch 1
    # global_step keeps counting optimizer steps: 3 + the rest of epoch 0 + epoch 1, at the new batch
    expected_steps = CKPT_STEP + (steps_per_epoch - 12 // (batch * ga)) + steps_per_epoch
    assert trainer.state.global_step == trainer.state.max_steps == expected_steps
    assert trainer.state.epoch == 2.0
    steps = [e["step"] for e in trainer.state.log_history if "loss" in e and e["step"] > CKPT_STEP]
    assert steps == list(range(CKPT_STEP + 1, expected_steps + 1))
    assert "at sample 12 of epoch 0" in caplog.text and "seen twice" not in caplog.text


def test_non_dividing_global_batch_restarts_at_the_earlier_boundary(tmp_path, first, caplog):
    checkpoint, seen = first
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        trainer, resumed = resume(tmp_path, checkpoint, 8, 1)  # 12 is not a multiple of 8: back to sample 8
    assert resumed[:N - 8] == order(0)[8:]
    assert resumed[N - 8:] == order(1)
    repeated = set(seen) & set(resumed[:N - 8])
    assert repeated == set(order(0)[8:12])  # the 4 samples the warning counts, and only those
    assert sorted(seen + resumed[:N - 8]) == sorted(list(range(N)) + sorted(repeated))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("resuming at sample 8" in m and "4 samples are seen twice" in m for m in warnings), warnings
    assert trainer.state.global_step == trainer.state.max_steps == CKPT_STEP + 2 + 3  # 3 steps of 8 per epoch


def test_explicit_max_steps_keeps_counting_optimizer_steps(tmp_path, first):
    checkpoint, seen = first
    trainer, resumed = resume(tmp_path, checkpoint, 2, 1, max_steps=10)  # 7 more steps of batch 2: 14 samples
    assert trainer.state.global_step == trainer.state.max_steps == 10
    # the epochs stretch to reach max_steps: the rest of epoch 0 (12 samples), then 2 of epoch 1
    assert seen + resumed == order(0) + order(1)[:2]
    assert trainer.state.num_train_epochs == 2


def test_checkpoint_without_a_position_falls_back(tmp_path, first, caplog):
    """An older raytrainer checkpoint (no data position) with another global batch resumes by global_step, as
    transformers does, with one warning saying the position is approximate; a transformers checkpoint (no
    raytrainer_run.pt) resumes by global_step too, silently."""
    checkpoint, _ = first
    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    meta = torch.load(old / "raytrainer_run.pt", weights_only=True)
    del meta["data_position"]
    torch.save(meta, old / "raytrainer_run.pt")
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        trainer, resumed = resume(tmp_path / "a", old, 2, 1, max_steps=4)
    warnings = [r.getMessage() for r in caplog.records if "Resuming by global_step" in r.getMessage()]
    assert len(warnings) == 1 and "records no data position" in warnings[0], warnings
    assert trainer.state.global_step == 4 and resumed == order(0)[6:8]

    (old / "raytrainer_run.pt").unlink()
    trainer, resumed = resume(tmp_path / "b", old, 2, 1, max_steps=4)
    # transformers' rule: global_step 3 of 12 steps per epoch -> skip 3 batches of 2 (6 samples, not 12)
    assert trainer.state.global_step == 4
    assert resumed == order(0)[6:8]


class CustomSampler(raytrainer.Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def test_data_that_cannot_seek_resumes_by_global_step(tmp_path, first, caplog):
    """transformers resumes this by global_step (skipping batches): so does raytrainer, with one warning."""
    checkpoint, _ = first
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        trainer, _ = resume(tmp_path, checkpoint, 2, 1, trainer_cls=CustomSampler, max_steps=5)
    warnings = [r.getMessage() for r in caplog.records if "Resuming by global_step" in r.getMessage()]
    assert len(warnings) == 1 and "cannot be placed at a sample" in warnings[0], warnings
    assert trainer.state.global_step == 5
