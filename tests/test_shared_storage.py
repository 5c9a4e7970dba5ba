"""raytrainer/shared_storage.py: which storage counts as shared (the refusal on a 2-node cluster is
tested in tests/test_job_submit.py, on its real 2-node cluster)."""

from __future__ import annotations

import pyarrow.fs as pafs

from raytrainer.shared_storage import check_shared_storage, mount_type

MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /dev tmpfs rw 0 0
10.0.0.5:/export /mnt/nfs nfs4 rw,vers=4.1 0 0
gcsfuse /mnt/bucket fuse.gcsfuse rw 0 0
/dev/sda1 /mnt/nfs/local ext4 rw 0 0
"""


def test_mount_type_is_the_longest_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert mount_type("/mnt/nfs/runs/a", str(mounts)) == "nfs4"
    assert mount_type("/mnt/nfs/local/x", str(mounts)) == "ext4"  # a local disk mounted inside the share
    assert mount_type("/mnt/nfsx", str(mounts)) == "overlay"  # not under /mnt/nfs
    assert mount_type("/mnt/bucket/run", str(mounts)) == "fuse.gcsfuse"
    assert mount_type("/x", str(tmp_path / "none")) is None


def test_object_stores_pass_without_asking_ray(tmp_path):
    # not a LocalFileSystem: nothing to check, Ray is not even asked
    check_shared_storage(pafs.SubTreeFileSystem("/", pafs.LocalFileSystem()), str(tmp_path))
