"""Reading the files a user gives, and writing where the user asked, with every failure as one sentence.

`reading(path)` and `writing(path)` are the one place that turns what a user's file can raise (OSError,
UnicodeDecodeError, JSON, NumPy and PIL format errors) into a `UserError` naming the path and what to
do; `read_text`, `read_lines` and `read_json` read the common kinds through it. (What the project
writes goes through `multimodal.files`, atomically.)

What is read is bounded (`LIMITS`): `read_bytes` reads only a regular file, and only up to a size, so a
`.jpg` that is a named pipe, a link to /dev/zero or a sparse 20 GB file is refused at once, unread
(`Refused`), and a caption is cut to a length no model reads past (`cut_caption`).
"""

import csv
import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from multimodal.errors import UserError, first_line
from multimodal.paths import check_input

IMAGE_BYTES, TEXT_FILE_BYTES, CAPTION_CHARS, CONFIG_BYTES = (
    "MULTIMODAL_MAX_IMAGE_BYTES", "MULTIMODAL_MAX_TEXT_FILE_BYTES", "MULTIMODAL_MAX_CAPTION_CHARS",
    "MULTIMODAL_MAX_CONFIG_BYTES")
# The most a user's file may hold. Each is the default of the environment variable of its name, which
# raises (or lowers) it: a variable reaches every command, the training loader's workers and library
# callers alike, where an option would be threaded through each of them for a rarely needed change.
LIMITS = {
    IMAGE_BYTES: 512 << 20,  # an image file: twice an uncompressed 24-bit image of decode.MAX_IMAGE_PIXELS pixels
    TEXT_FILE_BYTES: 1 << 30,  # a caption, text or JSON file (COCO's captions_train2017.json: 92 MB)
    # a caption, cut to this many characters: no tokenizer reads further (CLIP's 77 tokens cover about
    # 400), and tokenizing 50 MB took a minute and gigabytes
    CAPTION_CHARS: 10_000,
    # a YAML config (a few kilobytes as written; YAML takes ~100x its size in memory as it is read), and
    # the most values its aliases may expand to
    CONFIG_BYTES: 1 << 20,
}


def limit(name: str) -> int:
    """The limit `name` (a key of LIMITS): its environment variable when set, else its default."""
    value = os.environ.get(name)
    if value is None:
        return LIMITS[name]
    if re.fullmatch(r"\s*[0-9]+\s*", value) is None or int(value) == 0:
        raise UserError(f"The environment variable {name} must be a positive whole number, got {value!r}.")
    return int(value)


def cut_caption(text: str) -> str:
    """`text` cut to the caption limit (CAPTION_CHARS), without the whitespace the cut leaves at its end."""
    most = limit(CAPTION_CHARS)
    return text if len(text) <= most else text[:most].rstrip()


class Refused(OSError):
    """A file not read: not a regular file, or over its size limit. Its `strerror` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.strerror = reason


def read_bytes(path: str | Path, limit_name: str = IMAGE_BYTES) -> bytes:
    """The bytes of the user's file `path`, a regular file of at most `limit(limit_name)` bytes; a named pipe
    (opened without waiting for a writer), a device, a folder or a larger file raises Refused, unread."""
    most = limit(limit_name)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check(os.fstat(fd), most, limit_name)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(most + 1)
    finally:
        os.close(fd)
    if len(data) > most:  # it grew while read
        raise Refused(_too_large(len(data), most, limit_name))
    return data


def check_file(path: str | Path, limit_name: str = TEXT_FILE_BYTES) -> None:
    """Refuse, in one sentence and before any work, what `read_bytes` would refuse of `path`."""
    with reading(path):
        _check(os.stat(path), limit(limit_name), limit_name)


def _check(info: os.stat_result, most: int, limit_name: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise Refused("a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise Refused("not a regular file (a pipe, a device or a socket)")
    if info.st_size > most:
        raise Refused(_too_large(info.st_size, most, limit_name))


def _too_large(size: int, most: int, limit_name: str) -> str:
    return f"{size} bytes, over the limit of {most} bytes (set {limit_name} to raise it)"


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
    except Refused as exc:
        raise UserError(f"{path} is {exc.strerror}{fix}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
                        f"save it as UTF-8{fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}){fix}") from None
    except (IsADirectoryError, NotADirectoryError, FileNotFoundError, PermissionError) as exc:
        raise UserError(f"{path} cannot be read ({_reason(exc)}){fix}") from None
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image that can be read{fix}") from None
    except (OSError, ValueError, EOFError, RecursionError, csv.Error) as exc:  # NumPy's, PIL's, CSV's, JSON nested
        # deeper than Python recurses
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
    """A UTF-8 text file the user gave (a BOM is dropped), of at most TEXT_FILE_BYTES."""
    with reading(path, fix):
        return read_bytes(path, TEXT_FILE_BYTES).decode("utf-8-sig")


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file the user gave (texts, class names, templates), stripped and
    cut to CAPTION_CHARS; `what` names the file in the sentence when it is missing or holds none ("Text",
    "Class names")."""
    check_input(path, f"{what} file", "pass a UTF-8 text file with one entry a line")
    lines = [cut_caption(line.strip()) for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{what} file {path} is empty: write one entry a line.")
    return lines


def read_json(path: str | Path, fix: str = "", kind: type = dict):
    """A JSON file the user gave, whose top level must be of type `kind`."""
    text = read_text(path, fix)
    with reading(path, fix):
        value = json.loads(text)
    if not isinstance(value, kind):
        wanted = "object" if kind is dict else kind.__name__
        raise UserError(f"{path} holds a JSON {type(value).__name__} where a JSON {wanted} belongs"
                        f"{': ' + fix.rstrip('.') if fix else ''}.")
    return value
