"""The error a user can cause: a bad path, a bad value, a broken file.

`UserError` is the exception for them; the CLI prints its message as a single sentence and exits
with status 2, without a traceback. Anything else that escapes is a bug and keeps its traceback.
Reading users' files is `multimodal.userfiles`, checking the paths they name `multimodal.paths`.
"""


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
