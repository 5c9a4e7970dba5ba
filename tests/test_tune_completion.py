"""A trial's completion record (raytrainer/tune/completion.py): honoured only for the same Tune trial id."""

from __future__ import annotations

import pyarrow.fs as pafs

from raytrainer.tune.completion import DONE_FILE, all_recorded, record_done, recorded


def test_completion_is_recorded_atomically_and_honoured_for_its_own_trial_only(tmp_path):
    fs = pafs.LocalFileSystem()
    record_done(str(tmp_path), fs, "sweep", "trial_a", {"trial_id": "abc_00000", "objective": 1.5, "step": 4,
                                                         "not_json": object()})
    assert sorted(p.name for p in (tmp_path / "sweep" / "trial_a").iterdir()) == [DONE_FILE]  # no temporary left
    assert recorded(str(tmp_path), fs, "sweep", "trial_a", "abc_00000") == {"trial_id": "abc_00000",
                                                                            "objective": 1.5, "step": 4}
    # a fresh sweep reusing the name (hp_name gives the same folder) has other trial ids: it runs its trials
    assert recorded(str(tmp_path), fs, "sweep", "trial_a", "xyz_00000") is None
    assert recorded(str(tmp_path), fs, "sweep", "trial_b", "abc_00001") is None
    (tmp_path / "sweep" / "trial_c").mkdir()
    (tmp_path / "sweep" / "trial_c" / DONE_FILE).write_text("{half")  # torn or foreign: no record
    assert set(all_recorded(str(tmp_path), fs, "sweep")) == {"abc_00000"}
