"""The one exception type that means "the user asked for something invalid", and its wording helpers.

The CLI turns a ToydiffError into a one-line message and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ToydiffError(ValueError):
    """Bad input: a config value, flag, data file or run directory. The message says how to fix it, on one line:
    control characters that came in with the user's input (a newline in a --set value) are shown escaped."""

    def __init__(self, message: str):
        super().__init__(_CONTROL.sub(lambda m: repr(m.group())[1:-1], str(message)))


class RunInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint; the message says how to resume (exit code 130)."""


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the choice closest to a misspelled value (difflib), else ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, value: object, choices: Iterable[str]) -> ToydiffError:
    """The error for a name outside its vocabulary: "unknown KIND 'VALUE'; choose one of: ... (did you mean ...?)"."""
    choices = list(choices)
    return ToydiffError(f"unknown {kind} '{value}'; choose one of: {', '.join(choices)}{did_you_mean(value, choices)}")
