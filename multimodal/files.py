"""Every file the project writes is written atomically: to a hidden partial file in the target's
folder, flushed and fsynced, then renamed over the target (a rename within one file system is
atomic), and the rename fsynced with its folder. A process killed at any moment (SIGKILL, a lost
node) leaves the previous file or the new one, never a torn one; a write that fails leaves the
previous file and no partial one. Checkpoints, exported weights, shards and their manifests,
embedding parts and indexes, results and reports all come through here.
"""

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

PARTIAL_SUFFIX = ".partial"


def partial_of(name: str) -> str | None:
    """The target's name if `name` is a partial file's name (as `partial_path` makes them), else None."""
    found = re.fullmatch(r"\.(.+)\.\d+-[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX), name)
    return found.group(1) if found else None


def partial_path(path: Path) -> Path:
    """A hidden partial file of `path` that no other writer shares: two processes writing one target
    (two runs into one folder) each write their own, and the last rename wins whole."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write `path` through: in place only once the block has finished."""
    path = Path(path)
    partial = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new folder to fill in place of `path`, which must not exist: a hidden partial folder beside it, renamed
    to `path` once the block has finished (its files fsynced), removed whole if the block fails. A reader sees
    no folder or the finished one; a process killed meanwhile leaves only the hidden partial folder."""
    path = Path(path)
    partial = partial_path(path)
    try:
        partial.mkdir(parents=True)
        yield partial
        for file in partial.iterdir():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if path.exists():
            raise FileExistsError(17, "it exists already", str(path))
        os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value, indent: int = 1) -> None:
    write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def save_image(image, path: str | os.PathLike) -> None:
    """A PIL image to `path`, in the format its suffix names (.png, .jpg, .webp)."""
    from PIL import Image  # here: the CLI's light commands import this module

    with atomic_file(path) as f:
        image.save(f, format=Image.registered_extensions()[Path(path).suffix.lower()])
