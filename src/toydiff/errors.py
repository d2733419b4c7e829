"""The one exception type that means "the user asked for something invalid".

The CLI turns a ToydiffError into a one-line message and exit code 2; anything
else is a bug and keeps its traceback.
"""

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ToydiffError(ValueError):
    """Bad input: a config value, flag, data file or run directory. The message says how to fix it, on one line:
    control characters that came in with the user's input (a newline in a --set value) are shown escaped."""

    def __init__(self, message: str):
        super().__init__(_CONTROL.sub(lambda m: repr(m.group())[1:-1], str(message)))


class RunInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint; the message says how to resume (exit code 130)."""
