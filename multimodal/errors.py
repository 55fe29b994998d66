"""The one exception type for mistakes a user can cause (a bad path, a bad value).

The CLI prints its message as a single sentence and exits non-zero, without a traceback;
anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by input: its message names the thing and what to do about it."""
