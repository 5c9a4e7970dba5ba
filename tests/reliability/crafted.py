"""Crafted checkpoint files for the trust tests: a payload that plain pickle would run (it creates a marker
file), and a DCP folder whose byte item holds it."""

from __future__ import annotations

import io
import pickle

import torch


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # plain pickle would create the marker file


def crafted_distcp(folder, marker, item="optimizer.param_groups.0.lr"):
    """A DCP folder whose byte item `item` unpickles to the payload (torch.save'd, as DCP writes byte items)."""
    import torch.distributed.checkpoint as dcp

    # no_dist: also from one rank of a live process group (a Ray test crafts it on rank 0 only)
    dcp.save({"optimizer": {"param_groups.0.lr": 0.1, "param_groups.0.params": [0]}}, checkpoint_id=str(folder),
             no_dist=True)
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file, just written
    info = metadata.storage_data[MetadataIndex(item)]
    buffer = io.BytesIO()
    torch.save(Payload(str(marker)), buffer)
    data = folder / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:  # the payload appended, the metadata pointed at it: a valid DCP folder
        f.write(buffer.getvalue())
    info.offset, info.length = offset, len(buffer.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
