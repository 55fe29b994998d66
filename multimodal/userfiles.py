"""Reading the files a user gives, and writing where the user asked, with every failure as one sentence.

`reading(path)` and `writing(path)` are the one place that turns what a user's file can raise (OSError,
UnicodeDecodeError, JSON, NumPy and PIL format errors) into a `UserError` naming the path and what to
do; `read_text`, `read_lines` and `read_json` read the common kinds through it. (What the project
writes goes through `multimodal.files`, atomically.)
"""

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from multimodal.errors import UserError, first_line
from multimodal.paths import check_input


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
