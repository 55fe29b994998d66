"""Checkpoint files that survive being killed at any moment, and that load without unpickling code.

`AtomicCheckpointIO` (installed by `multimodal train`) writes each checkpoint to a hidden partial
file in the same folder, flushes and fsyncs it, and renames it over the target: a rename within
one file system is atomic, so a run killed with SIGKILL at any moment leaves either the previous
checkpoint or the new one, never a torn file. (Lightning's own writer goes through a temporary
file in /tmp, whose move into the run folder is a copy when /tmp is another file system, and
does not fsync.) Remote paths (s3://, gs://, ...) keep Lightning's writer.

Checkpoints load with `torch.load(weights_only=True)`: tensors and plain Python values only.
`check_loadable` runs that check before a run hands a file to Lightning, so an untrusted file is
refused with one sentence instead of being unpickled.
"""

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from multimodal.errors import UserError

PARTIAL_SUFFIX = ".partial"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` through a partial file in the same folder, fsynced and renamed.

    A write that fails (a full disk, a quota, a lost mount) removes the partial file and raises a
    UserError saying that the previous checkpoint at `path` is intact: the run stops there, to be
    continued with --resume once there is room, rather than train on without a way back.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "write" in str(exc).lower()):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:120]
            previous = "the previous checkpoint there is intact" if path.is_file() else "no checkpoint was there yet"
            raise UserError(f"Writing the checkpoint {path} failed ({reason}); {previous}. Make room on that "
                            "disk (or write checkpoints elsewhere), then continue the run with --resume.") from exc
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def check_loadable(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Raise a UserError unless `path` is a file that `torch.load(weights_only=True)` reads: a
    checkpoint holding anything but tensors and plain values (code to run, custom classes) is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The {what} {path} does not exist: pass an existing .ckpt file or run folder.")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"The {what} {path} cannot be loaded safely as a checkpoint (tensors and plain values "
                        f"only): {first[:200]}; pass a checkpoint written by `multimodal train`.") from None
