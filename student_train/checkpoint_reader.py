"""Loading a checkpoint without running code from it.

torch.distributed.checkpoint (DCP) keeps a checkpoint's layout in `.metadata`,
a pickle that its FileSystemReader opens with plain `pickle.load`, and loads
non-tensor entries (the optimizer's param groups) with
`torch.load(weights_only=False)`: a crafted checkpoint directory would run its
payload on `--resume-from`. Here `.metadata` is read by an unpickler that
admits only DCP's own metadata classes and the few torch values they hold, and
non-tensor entries by `torch.load(weights_only=True)`; DCP already reads
tensors that way. Anything else is refused with a ValueError naming the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_FILE = ".metadata"
_PATH_CLASSES = {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}
# Everything a DCP `.metadata` refers to: its dataclasses (and the enum TensorProperties stores the memory format
# as), FileSystemWriter's storage entries, torch.Size, layouts (by name), the checkpoint id's Path; dtypes below.
ADMITTED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": _PATH_CLASSES,
    "pathlib._local": _PATH_CLASSES,  # where Python 3.13 defines them
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file refers to code that checkpoints never hold; nothing of it was run."""


class _Refused(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        admitted = name in ADMITTED_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not admitted:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def read_metadata(checkpoint: Path) -> Metadata:
    """The checkpoint's DCP metadata, unpickled through the allow-list above."""
    path = Path(checkpoint) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a complete checkpoint)") from None
    except _Refused as refused:
        raise UnsafeCheckpointError(
            f"{path}: refers to {refused}, which checkpoint metadata never holds; refused without running it (only "
            "torch.distributed.checkpoint's own metadata classes are admitted: is this checkpoint from a trusted "
            "run?)") from None
    except Exception as exc:  # noqa: BLE001 (a corrupt pickle can raise anything)
        raise ValueError(f"{path}: not readable as checkpoint metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class _PreparedReader(FileSystemReader):
    """FileSystemReader that hands DCP the metadata read above instead of unpickling `.metadata` itself."""

    def __init__(self, checkpoint: Path, metadata: Metadata):
        super().__init__(checkpoint)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:
        # What FileSystemReader.read_metadata does after its pickle.load.
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries are unpickled weights-only."""

    def __init__(self, checkpoint: Path):
        super().__init__()
        self._checkpoint = checkpoint

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = (str(exc).strip().splitlines() or ["refused"])[0]
            raise UnsafeCheckpointError(
                f"{self._checkpoint}: entry {read_item.dest_index.fqn!r} holds more than plain data; refused without "
                f"running it ({reason})") from None
        # The parent puts the value where the state dict wants it (flattened keys, in every torch version);
        # what it unpickles now is written here from plain data.
        rewritten = io.BytesIO()
        torch.save(plain, rewritten)
        rewritten.seek(0)
        super().load_bytes(read_item, rewritten)


def load_checkpoint_state(state: dict, checkpoint: Path, no_dist: bool) -> None:
    """`dcp.load` of `state` (in place) from the checkpoint directory, running nothing the files carry."""
    import torch.distributed.checkpoint as dcp

    checkpoint = Path(checkpoint)
    metadata = read_metadata(checkpoint)
    try:
        dcp.load(state, storage_reader=_PreparedReader(checkpoint, metadata),
                 planner=_WeightsOnlyPlanner(checkpoint), no_dist=no_dist)
    except dcp.CheckpointException as exc:  # DCP gathers every rank's exception into one
        refused = [error for error, _ in exc.failures.values() if isinstance(error, UnsafeCheckpointError)]
        if refused:
            raise refused[0] from None
        raise
