"""Checks of the paths a user names, made before any work starts: an input that is missing or of the
wrong kind, an output that cannot be written where it is asked for, a checkpoint file of no known kind;
and of the names a user's file gives, which must stay inside the folder they are read from.
The command line runs them on its arguments before any heavy import; the library on its own arguments.
"""

import os
from pathlib import Path, PurePosixPath

from multimodal.errors import UserError

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
EXPORT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # open_clip state dicts


def check_output(path: str | Path, option: str, kind: str = "file", suffixes: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output `path` that cannot be what `option` asks for: a folder
    named where a file goes (or the reverse), a file standing where a parent folder must be, or a
    file name without one of `suffixes`. `option` names the setting in the caller's words."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        example = path / ("out" + (suffixes or ("",))[0])
        raise UserError(f"{option} {path} is a folder: give a file name, such as {example}.")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder: choose a folder (new or empty).")
    for parent in path.parents:  # the nearest folder that exists must be a folder this process may write
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path} cannot be written: {parent} is a file, not a folder.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{option} {path} cannot be written: the folder {parent} is not writable.")
            break
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path} must end in {', '.join(suffixes[:-1])}"
                        f"{' or ' if len(suffixes) > 1 else ''}{suffixes[-1]}.")


def check_input(path: str | Path, what: str, hint: str, kind: str = "file") -> None:
    """Refuse, before any work, an input `path` that is missing or not a `kind` ("file" or "folder"; a file is
    a regular one, never a named pipe or a device): `what` names it ("Checkpoint", "Image folder"), `hint`
    says what to pass instead."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist: {hint}.")
    if kind == "file" and path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file: {hint}.")
    if kind == "file" and not path.is_file():
        raise UserError(f"{what} {path} is not a regular file (a pipe, a device or a socket): {hint}.")
    if kind == "folder" and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder: {hint}.")


def inside(name: str) -> bool:
    """Whether the file name `name` (from a file the user gave: a caption file's image names) stays under the
    folder it is joined to: relative, with no `..` part. The name is confined, not what it resolves to: links
    inside the folder are followed wherever they point (a folder of links into a dataset store is common)."""
    path = PurePosixPath(name)
    return bool(name) and "\0" not in name and not path.is_absolute() and ".." not in path.parts


def check_checkpoint(path: str | Path) -> None:
    """A local checkpoint file of a known kind, not empty."""
    path = Path(path)
    check_input(path, "Checkpoint", "pass a local .ckpt, .pt, .bin or .safetensors file")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(f"{path} has an unknown checkpoint type: use a Lightning .ckpt or an open_clip "
                        f"state dict ({', '.join(CHECKPOINT_SUFFIXES[1:])}).")
    if path.stat().st_size == 0:
        raise UserError(f"Checkpoint {path} is empty (0 bytes), as a write that never finished leaves it: pass "
                        "another checkpoint.")
