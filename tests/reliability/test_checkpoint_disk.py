"""Checkpoints on disk: durable (fsync down to every directory entry), never lost to their own replacement,
no partial folders left behind (a failed save now, a dead run's at the next start), and a full disk is one
error naming the folder and the space needed while the last complete checkpoint still resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

import raytrainer
from raytrainer.checkpoint import durable, leftovers
from raytrainer.checkpoint.writer import CheckpointWriter, Snapshot

try:
    from tests.helpers import lm_examples, state_dicts_equal, tiny_gpt2
except ImportError:
    from helpers import lm_examples, state_dicts_equal, tiny_gpt2


def _snapshot(final_dir, writer, text):
    """A sharded-looking save: files in subfolders (as DCP / DeepSpeed write them) and trainer_state.json."""
    tmp = writer.tmp_dir_for(final_dir)
    for sub, name in (("model_dcp", "__0_0.distcp"), ("global_step2", "mp_rank_00_model_states.pt")):
        os.makedirs(os.path.join(tmp, sub))
        with open(os.path.join(tmp, sub, name), "w") as f:
            f.write(text)
    return Snapshot(final_dir=final_dir, tmp_dir=tmp, trainer_state_json='{"global_step": 2}')


def test_every_file_subfolder_and_the_parent_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = durable._fsync
    monkeypatch.setattr(durable, "_fsync", lambda path, flags: (synced.append(os.path.abspath(path)), real(path, flags)))
    writer = CheckpointWriter(background=False)
    final = str(tmp_path / "checkpoint-2")
    snap = _snapshot(final, writer, "one")
    tmp = snap.tmp_dir
    writer.save(snap)
    expected = [os.path.join(tmp, "model_dcp", "__0_0.distcp"), os.path.join(tmp, "model_dcp"),
                os.path.join(tmp, "global_step2", "mp_rank_00_model_states.pt"), os.path.join(tmp, "global_step2"),
                os.path.join(tmp, "trainer_state.json"), tmp]
    assert set(expected) <= set(synced), synced
    assert synced[-1] == str(tmp_path)  # the parent, after the rename
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_saving_a_step_again_never_deletes_it_before_the_new_one_is_in_place(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    final = tmp_path / "checkpoint-2"
    checked = []
    real_rmtree = durable.shutil.rmtree

    def rmtree(path, *args, **kwargs):  # whenever the older folder is deleted, the new one is complete
        if os.path.exists(path):
            checked.append((final / "model_dcp" / "__0_0.distcp").read_text())
        real_rmtree(path, *args, **kwargs)

    writer = CheckpointWriter(background=False)
    writer.save(_snapshot(str(final), writer, "first"))
    monkeypatch.setattr(durable.shutil, "rmtree", rmtree)
    writer.save(_snapshot(str(final), writer, "second"))
    assert checked == ["second"]
    assert (final / "global_step2" / "mp_rank_00_model_states.pt").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_runs_left_overs_are_removed_at_the_next_start(tmp_path):
    host = leftovers.owner_tag().rsplit("-", 1)[0]
    dead = _dead_pid()
    run = tmp_path / "run"
    names = {
        f"tmp-checkpoint-4-{host}-{dead}-1": False,          # a dead run's partial save: removed
        f"tmp-checkpoint-4-{host}-{os.getppid()}-1": True,   # a live process's: kept
        f"tmp-checkpoint-4-otherhost-{dead}-1": True,        # another machine's (a shared folder): kept
        "tmp-checkpoint-6": True,                            # not named by raytrainer: kept
    }
    for name in names:
        (run / name).mkdir(parents=True)
        (run / name / "optimizer.pt").write_bytes(b"partial")
    args = raytrainer.TrainingArguments(output_dir=str(run), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True)
    raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8)).train()
    assert sorted(os.listdir(run)) == sorted(["checkpoint-2"] + [n for n, kept in names.items() if kept])
    # the temp folders of a Ray worker (resume downloads, staging) the same way, at the next one's creation
    stale = tempfile.mkdtemp(prefix=f"raytrainer-resume-{host}-{dead}-")
    leftovers._cleaned.clear()
    fresh = leftovers.temp_dir("resume")
    try:
        assert not os.path.exists(stale) and os.path.isdir(fresh)
    finally:
        leftovers.release(fresh)
    assert not os.path.exists(fresh)


def test_a_failed_save_leaves_no_partial_folder(tmp_path):
    writer = CheckpointWriter(background=True)
    final = str(tmp_path / "checkpoint-2")

    def broken(out_dir, state):
        with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("the save broke half-way")

    writer.save(Snapshot(final_dir=final, model_state={}, save_model_fn=broken, trainer_state_json="{}"))
    with pytest.raises(RuntimeError, match="writing a checkpoint failed: the save broke half-way"):
        writer.wait()
    writer.close()
    assert os.listdir(tmp_path) == []


class BrokenSave(raytrainer.Trainer):
    """An overridden save_model (transformers' hook path: it writes into the folder the writer renames)."""

    def save_model(self, output_dir=None, _internal_call=False):
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("save_model broke half-way")


def test_a_save_that_breaks_before_the_writer_leaves_no_partial_folder(tmp_path):
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2,
                                        per_device_train_batch_size=4, report_to="none", disable_tqdm=True)
    with pytest.raises(RuntimeError, match="^save_model broke half-way$"):
        BrokenSave(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8)).train()
    assert os.listdir(tmp_path / "run") == []


def test_the_first_of_two_failed_background_writes_is_the_one_raised(tmp_path):
    """Both queued writes fail (checkpoint-4, then checkpoint-6 on the same full disk): the error the loop
    gets is checkpoint-4's, the first, not the later one that overwrote it."""
    import threading

    gate = threading.Event()

    def fail(name, first):
        def copy(snap):
            if first:
                gate.wait()
            raise OSError(f"{name} broke")
        return copy

    writer = CheckpointWriter(background=True)
    writer.save(Snapshot(final_dir=str(tmp_path / "checkpoint-4"), copy_fn=fail("checkpoint-4", True)))
    writer.save(Snapshot(final_dir=str(tmp_path / "checkpoint-6"), copy_fn=fail("checkpoint-6", False)))
    gate.set()  # both are queued now: they fail in order
    with pytest.raises(RuntimeError, match="checkpoint-4 broke") as info:
        writer.wait()
    assert info.value.checkpoint_dir == str(tmp_path / "checkpoint-4")
    writer.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB tmpfs: room for one tiny checkpoint (412 KiB) and not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)  # lazy: a failed test may hold a file


@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
def test_a_full_disk_stops_the_run_with_the_space_needed_and_the_last_checkpoint_resumes(small_disk, tmp_path,
                                                                                          background):
    run = small_disk / "run"
    args = raytrainer.TrainingArguments(output_dir=str(run), max_steps=6, save_steps=2, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True, seed=3, save_in_background=background)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(24))
    with pytest.raises((OSError, RuntimeError)) as info:
        trainer.train()
    message = str(info.value)
    found = re.search(rf"No space left on device: writing checkpoint {re.escape(str(run))}/checkpoint-(\d+) needs about",
                      message)
    assert found, message
    # checkpoint-4 does not fit. A background write's failure surfaces at the next save, and is named after the
    # checkpoint it was writing (also when torch's writer lost ENOSPC and the next save first finds the disk full)
    assert found.group(1) == "4", message
    assert "MiB free" in message and "last complete checkpoint is intact" in message
    assert message.count("needs about") == 1, message  # one error, not wrapped twice
    kept = sorted(os.listdir(run))
    assert kept == ["checkpoint-2"]  # no tmp-checkpoint-* left
    # checkpoint-2 resumes: the same weights as an uninterrupted run on normal disk
    full = raytrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "full", seed=3), train_dataset=lm_examples(24))
    full.train()
    resumed = raytrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "resumed", seed=3),
                                 train_dataset=lm_examples(24))
    resumed.train(resume_from_checkpoint=str(run / kept[-1]))
    assert resumed.state.global_step == 6 and state_dicts_equal(resumed.model, full.model)


def _args(out, **kw):
    return raytrainer.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True, save_strategy="no", **kw)

