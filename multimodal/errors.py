"""The one exception type for mistakes a user can cause (a bad path, a bad value).

The CLI prints its message as a single sentence and exits non-zero, without a traceback;
anything else that escapes is a bug and keeps its traceback.
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
