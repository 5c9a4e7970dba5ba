"""A local storage_path on a Ray cluster of several nodes is refused on the driver, before workers start.

Ray's rule: on more than one node, checkpoints must go where every node (and the driver) reads the
same files: cloud storage (s3://...) or a shared filesystem mounted at the same path everywhere. A
node-local folder would leave each checkpoint on whichever node's rank wrote it, and a resume or the
driver's final load would not find it. A path on a network filesystem (NFS, Lustre, CephFS, FUSE...)
is accepted as shared; for another shared mount, set RAYTRAINER_SHARED_STORAGE=1.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

SHARED_ENV = "RAYTRAINER_SHARED_STORAGE"
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "virtiofs",
              "9p", "efs")


def mount_type(path: str, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount holding `path` (Linux), or None when unknown."""
    try:
        with open(mounts) as f:
            entries = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    path = os.path.realpath(path)
    best = None
    for point, kind in entries:
        point = point.replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (best is None or len(point) > len(best[0])):
            best = (point, kind)
    return best[1] if best else None


def is_shared_mount(path: str) -> bool:
    kind = mount_type(path)
    return kind is not None and (kind in NETWORK_FS or kind.startswith("fuse."))


def check_shared_storage(fs, run_dir: str, field: str = "storage_path") -> None:
    """Raise ValueError when `fs` is local and the connected Ray cluster has more than one alive node."""
    if not isinstance(fs, pafs.LocalFileSystem) or os.environ.get(SHARED_ENV, "").lower() in ("1", "true", "yes"):
        return
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1 or is_shared_mount(run_dir):
        return
    raise ValueError(
        f"{field}: {run_dir} is a local folder, and the Ray cluster has {len(nodes)} nodes: each node would keep "
        f"its own checkpoints there, and a resume or the final load on the driver would not find them. Use cloud "
        f"storage, storage_path='s3://bucket/prefix' (or gs://, hdfs://), or a shared filesystem (NFS, Lustre, ...) "
        f"mounted at the same path on every node; if {run_dir} is one, set {SHARED_ENV}=1."
    )
