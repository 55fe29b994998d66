"""The one boundary for mistakes a user can cause: a bad path, a bad value, a broken file.

`UserError` is the exception for them; the CLI prints its message as a single sentence and exits
with status 2, without a traceback. `reading(path)` and `writing(path)` are the one place that
turns what a file the user gave can raise (OSError, UnicodeDecodeError, JSON, NumPy and PIL format
errors) into such a sentence naming the path; `check_output` validates an output path before any
work starts. Anything else that escapes is a bug and keeps its traceback.
"""

import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
EXPORT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # open_clip state dicts


class UserError(Exception):
    """An error caused by input: its message names the thing and what to do about it."""


def message(exc: UserError) -> str:
    """The sentence of a UserError, also when a DataLoader worker raised it: PyTorch re-raises those
    in the main process with the worker's whole traceback as the message."""
    text = str(exc)
    if text.startswith("Caught UserError"):
        for line in reversed(text.splitlines()):
            if line.startswith(("UserError: ", "multimodal.errors.UserError: ")):
                return line.split("UserError: ", 1)[1]
    return text


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first line (its type name when it has no message), at most `limit` characters."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)


@contextmanager
def reading(path: str | Path, fix: str = "") -> Iterator[None]:
    """Whatever reading the user's file `path` raises, as one sentence naming it (`fix`: what to do)."""
    from PIL import UnidentifiedImageError  # here, not at import: the CLI's --help stays light

    fix = f": {fix.rstrip('.')}." if fix else "."
    try:
        yield
    except UserError:
        raise
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
                        f"save it as UTF-8{fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}){fix}") from None
    except (IsADirectoryError, NotADirectoryError, FileNotFoundError, PermissionError) as exc:
        raise UserError(f"{path} cannot be read ({_reason(exc)}){fix}") from None
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image that can be read{fix}") from None
    except (OSError, ValueError, EOFError, csv.Error) as exc:  # NumPy's, PIL's and CSV's format errors
        raise UserError(f"{path} cannot be read ({_reason(exc)}){fix}") from None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """A failed write of `path` (a read-only folder, a full disk) as one sentence naming it."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"{path} cannot be written ({_reason(exc)}): choose a writable folder with room "
                        "for it.") from None


def read_text(path: str | Path, fix: str = "") -> str:
    """A UTF-8 text file the user gave (a BOM is dropped)."""
    with reading(path, fix):
        return Path(path).read_text(encoding="utf-8-sig")


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file the user gave (texts, class names, templates), stripped;
    `what` names the file in the sentence when it is missing or holds none ("Text", "Class names")."""
    check_input(path, f"{what} file", "pass a UTF-8 text file with one entry a line")
    lines = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{what} file {path} is empty: write one entry a line.")
    return lines


def read_json(path: str | Path, fix: str = "", kind: type = dict):
    """A JSON file the user gave, whose top level must be of type `kind`."""
    with reading(path, fix):
        value = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    if not isinstance(value, kind):
        wanted = "object" if kind is dict else kind.__name__
        raise UserError(f"{path} holds a JSON {type(value).__name__} where a JSON {wanted} belongs"
                        f"{': ' + fix.rstrip('.') if fix else ''}.")
    return value


def check_output(path: str | Path, option: str, kind: str = "file", suffixes: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output `path` that cannot be what `option` asks for: a folder
    named where a file goes (or the reverse), a file standing where a parent folder must be, or a
    file name without one of `suffixes`."""
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
    """Refuse, before any work, an input `path` that is missing or not a `kind` ("file" or "folder"):
    `what` names it ("Checkpoint", "Image folder"), `hint` says what to pass instead."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist: {hint}.")
    if kind == "file" and not path.is_file():
        raise UserError(f"{what} {path} is a folder, not a file: {hint}.")
    if kind == "folder" and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder: {hint}.")


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


def settings_changed(path: Path, settings: dict, overwrite: bool, what: str) -> bool:
    """Whether earlier work beside the settings file `path` (JSON) was made with other `settings` and must be
    cleared before resuming; refused in one sentence naming the changed settings unless `overwrite`."""
    if not path.is_file():
        return False
    old = read_json(path, "pass --overwrite to start afresh, or choose another --out")
    if old != settings and not overwrite:
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        raise UserError(f"{path.parent} holds {what} made with other settings ({', '.join(changed)}): "
                        "pass --overwrite to replace them, or choose another --out.")
    return old != settings
