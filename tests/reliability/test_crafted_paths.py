"""A crafted checkpoint cannot run code through load_best_model_at_end or a PBT exploit either (issue 19).

Both paths read through the same loaders as a resume (docs/trust-checkpoints.md); these tests drive each
path with the files crafted, in-process, and check the harmless payload's marker file never appears.
* load_best_model_at_end reads weights only: a crafted pytorch_model.bin is refused (weights_only), and every
  other crafted file of the best checkpoint is never read.
* A PBT exploit resumes from our copy of the donor's checkpoint, in-process (`restored_copy` + `prepare_exploit`,
  what run_trial does) or for a multi-worker trial (`CheckpointPointer.resume_from` copies it into the trial's
  run folder): every crafted file is refused, and the copy made for the exploit is removed.
"""

from __future__ import annotations

import glob
import os
import pickle
import shutil
import tempfile

import pytest
import torch
from transformers import TrainerCallback

import raytrainer
from raytrainer.checkpoint.pickle_check import UnsafeCheckpointError

try:
    from tests.helpers import lm_examples, tiny_gpt2
    from tests.reliability.crafted import Payload, crafted_distcp
except ImportError:
    from crafted import Payload, crafted_distcp
    from helpers import lm_examples, tiny_gpt2

WEIGHTS_ONLY = (pickle.UnpicklingError, "[Ww]eights only load failed")
SCANNED = (UnsafeCheckpointError, r"holds GLOBAL (builtins|io)\.open|latest names the DeepSpeed tag")
# file crafted -> what refuses it on a resume (None: never read, the payload cannot run)
CRAFTED = {"optimizer.pt": WEIGHTS_ONLY, "scheduler.pt": WEIGHTS_ONLY, "rng_state.pth": WEIGHTS_ONLY,
           "raytrainer_run.pt": WEIGHTS_ONLY, "pytorch_model.bin": WEIGHTS_ONLY, "training_args.bin": None,
           "latest": SCANNED, "global_step2": SCANNED, "optim_dcp": SCANNED}


def plant(checkpoint, name, marker) -> None:
    """Replace (or add) `name` in a genuine checkpoint with a payload that plain pickle would run."""
    checkpoint = str(checkpoint)
    if name == "pytorch_model.bin":  # without model.safetensors transformers falls back to the .bin (torch.load)
        os.remove(os.path.join(checkpoint, "model.safetensors"))
        torch.save({"transformer.wte.weight": Payload(str(marker))}, os.path.join(checkpoint, name))
    elif name == "latest":  # DeepSpeed's redirect to a folder of the attacker's choosing
        os.makedirs(os.path.join(checkpoint, "evil"))
        torch.save({"module": Payload(str(marker))}, os.path.join(checkpoint, "evil", "mp_rank_00_model_states.pt"))
        with open(os.path.join(checkpoint, "latest"), "w") as f:
            f.write("evil")
    elif name == "global_step2":
        os.makedirs(os.path.join(checkpoint, name))
        torch.save({"state": Payload(str(marker))},
                   os.path.join(checkpoint, name, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    elif name == "optim_dcp":
        from pathlib import Path

        crafted_distcp(Path(checkpoint) / name, marker)
    else:
        with open(os.path.join(checkpoint, name), "wb") as f:
            pickle.dump({"state": Payload(str(marker))}, f)


def _args(out, **kw):
    values = dict(output_dir=str(out), max_steps=2, save_steps=2, per_device_train_batch_size=4, report_to="none",
                  disable_tqdm=True)
    return raytrainer.TrainingArguments(**{**values, **kw})


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    out = tmp_path_factory.mktemp("genuine") / "run"
    raytrainer.Trainer(model=tiny_gpt2(), args=_args(out), train_dataset=lm_examples(8)).train()
    return out / "checkpoint-2"


# ------------------------------------------------------------------------------------------ load_best_model_at_end
class PlantInBest(TrainerCallback):
    """Crafts files in each checkpoint once it is complete (on_save), before load_best_model_at_end reads it."""

    def __init__(self, names, marker):
        self.names, self.marker = names, marker

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # on Ray, rank 0's folder in output_dir is what goes to storage
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        for name in self.names:
            plant(checkpoint, name, self.marker)


def _train_with_load_best(tmp_path, names):
    args = _args(tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)
    marker = tmp_path / "ran"
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8),
                                 eval_dataset=lm_examples(4), callbacks=[PlantInBest(names, marker)])
    return trainer, marker


def test_load_best_refuses_crafted_weights(tmp_path):
    trainer, marker = _train_with_load_best(tmp_path, ["pytorch_model.bin"])
    with pytest.raises(WEIGHTS_ONLY[0], match=WEIGHTS_ONLY[1]) as info:
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")  # load_best was reached, and refused it
    # torch's words (transformers names no file), then the checkpoint and what to do
    assert f"refused while loading the best model from {trainer.state.best_model_checkpoint}: " in str(info.value)
    assert not marker.exists()


def test_load_best_reads_no_other_crafted_file(tmp_path):
    """Every other crafted file of the best checkpoint stays unread: the run ends with the checkpoint's weights."""
    from safetensors.torch import load_file

    others = [n for n in CRAFTED if n != "pytorch_model.bin"]
    trainer, marker = _train_with_load_best(tmp_path, others)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2") and all(os.path.exists(os.path.join(best, n)) for n in others)
    saved = load_file(os.path.join(best, "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items() if k in saved)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ PBT exploit
def _exploit_folders():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "raytrainer-exploit-*")))


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_an_in_process_pbt_exploit_refuses_a_crafted_donor(genuine, tmp_path, name):
    """run_trial's in-process exploit: Tune's restored checkpoint copied (restored_copy), then resumed."""
    from ray import tune

    from raytrainer.tune.trial import prepare_exploit, restored_copy

    donor = tmp_path / "donor" / "checkpoint-2"
    shutil.copytree(genuine, donor)
    marker = tmp_path / "ran"
    plant(donor, name, marker)
    before = _exploit_folders()
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "me", max_steps=4),
                                 train_dataset=lm_examples(8))
    with restored_copy(tune.Checkpoint.from_directory(str(donor))) as resume:
        prepare_exploit(trainer, resume)
        if CRAFTED[name] is None:
            trainer.train(resume_from_checkpoint=resume)
            assert trainer.state.global_step == 4
        else:
            with pytest.raises(CRAFTED[name][0], match=CRAFTED[name][1]):
                trainer.train(resume_from_checkpoint=resume)
            assert not (tmp_path / "me").exists() or not os.listdir(tmp_path / "me")  # no step trained, nothing saved
    assert not marker.exists()
    assert _exploit_folders() == before  # the copy made for the exploit is gone


def exploit_copy_of_a_crafted_donor(genuine, tmp_path, name):
    """A donor trial's checkpoint-2 in storage with `name` crafted, as a PBT exploit copies it into trial "me"'s
    run folder through Tune's pointer; (the copy's path, its step, the marker its payload would create)."""
    from ray import tune

    from raytrainer.tune.trial import CheckpointPointer

    storage = tmp_path / "storage"
    donor = storage / "sweep" / "donor" / "checkpoint-2"
    shutil.copytree(genuine, donor)
    marker = tmp_path / "ran"
    plant(donor, name, marker)
    pointer = tmp_path / "pointer"
    with CheckpointPointer(str(storage), None, "donor").to_tune(str(donor), 2) as checkpoint:
        shutil.copytree(checkpoint.path, pointer)  # what Tune keeps of the donor's report
    resume, step = CheckpointPointer(str(storage), None, "me").resume_from(tune.Checkpoint.from_directory(str(pointer)))
    return resume, step, marker


@pytest.mark.parametrize("name", ["optimizer.pt", "latest", "optim_dcp"])
def test_a_multi_worker_pbt_exploit_refuses_a_crafted_donor(genuine, tmp_path, name):
    """A multi-worker trial's exploit: the pointer names the donor's checkpoint in storage, which is copied into
    this trial's run folder and resumed from there (on Ray workers in a sweep; the loaders are the same here)."""
    resume, step, marker = exploit_copy_of_a_crafted_donor(genuine, tmp_path, name)
    assert step == 2 and os.path.dirname(resume) == str(tmp_path / "storage" / "sweep" / "me")
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "me", max_steps=4),
                                 train_dataset=lm_examples(8))
    trainer._hyperparameters_override_checkpoint = True
    with pytest.raises(CRAFTED[name][0], match=CRAFTED[name][1]):
        trainer.train(resume_from_checkpoint=resume)
    assert not (tmp_path / "me").exists() or not os.listdir(tmp_path / "me")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ the same on 2 Ray workers
@pytest.mark.ray
def test_load_best_on_ray_refuses_crafted_weights_and_retention_survives_a_crafted_run_file(ray_cluster, tmp_path):
    """One 2-worker run (DDP): rank 0 crafts every file of each checkpoint before it goes to storage; at the end
    load_best_model_at_end fetches the best one from storage and refuses its weights. A foreign checkpoint with a
    crafted raytrainer_run.pt sits in the run folder: retention reads it weights-only, keeps it, and goes on."""
    storage = tmp_path / "storage"
    foreign = storage / "best" / "checkpoint-100"
    foreign.mkdir(parents=True)
    (foreign / "trainer_state.json").write_text('{"global_step": 100}')
    marker = tmp_path / "ran"
    plant(foreign, "raytrainer_run.pt", marker)
    args = _args(tmp_path / "out", max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 save_total_limit=1, num_workers=2, per_device_train_batch_size=2, storage_path=str(storage),
                 run_name="best")
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16),
                                 eval_dataset=lm_examples(4), callbacks=[PlantInBest(list(CRAFTED), marker)])
    before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("raytrainer-best-")}
    with pytest.raises(WEIGHTS_ONLY[0], match=WEIGHTS_ONLY[1]) as info:
        trainer.train()
    assert f"refused while loading the best model from {storage}/best/checkpoint-" in str(info.value)  # in storage
    assert not marker.exists()
    assert foreign.is_dir()  # another run's checkpoint: never rotated away
    assert (storage / "best" / "checkpoint-6" / "pytorch_model.bin").is_file()  # the crafted best reached storage
    assert {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("raytrainer-best-")} <= before
