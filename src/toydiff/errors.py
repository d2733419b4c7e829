"""The one exception type that means "the user asked for something invalid".

The CLI turns a ToydiffError into a one-line message and exit code 2; anything
else is a bug and keeps its traceback.
"""


class ToydiffError(ValueError):
    """Bad input: a config value, flag, data file or run directory. The message says how to fix it."""


class RunInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint; the message says how to resume (exit code 130)."""
