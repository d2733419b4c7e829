"""The one exception type that means "the user asked for something invalid", and its wording helpers.

The CLI turns a ToydiffError into a one-line message and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
import re
from pathlib import Path
from typing import Iterable, Optional, Union

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ToydiffError(ValueError):
    """Bad input: a config value, flag, data file or run directory. The message says how to fix it, on one line:
    control characters that came in with the user's input (a newline in a --set value) are shown escaped."""

    def __init__(self, message: str):
        super().__init__(_CONTROL.sub(lambda m: repr(m.group())[1:-1], str(message)))


class RunInterrupted(Exception):
    """Training stopped by a signal after saving a checkpoint; the message says how to resume. `code` is the
    shell's convention for the signal: 130 for Ctrl-C (SIGINT), 143 for SIGTERM, 129 for SIGHUP."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception summed up for a one-line error: its message's first line (at most `limit` characters),
    or its type's name when it has no message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the choice closest to a misspelled value (difflib), else ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, value: object, choices: Iterable[str]) -> ToydiffError:
    """The error for a name outside its vocabulary: "unknown KIND 'VALUE'; choose one of: ... (did you mean ...?)"."""
    choices = list(choices)
    return ToydiffError(f"unknown {kind} '{value}'; choose one of: {', '.join(choices)}{did_you_mean(value, choices)}")


# what to do about an OS error, by errno: the fix each one-line error ends with
_FIXES = {
    errno.ENOSPC: "the disk is full: free space on it (or write elsewhere) and run the command again",
    errno.EDQUOT: "the disk quota is used up: free space in it (or write elsewhere) and run the command again",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the filesystem is read-only: choose a folder on a writable disk",
    errno.ENAMETOOLONG: "the name is too long for the filesystem: choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n 4096`) and run the command again",
    errno.ENFILE: "the system has too many open files: close some programs and run the command again",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: check the path",
    errno.EIO: "the disk reported an I/O error: check the disk",
}


def os_error(e: OSError, path: Optional[Union[str, Path]] = None, doing: str = "access") -> ToydiffError:
    """The one-line error for an OS error (a full disk, a read-only folder, a name too long...): what failed, on
    which path, and the fix. Every OSError that reaches the command line is worded here."""
    path = path if path is not None else e.filename
    where = f" '{path}'" if path is not None else ""
    fix = _FIXES.get(e.errno, e.strerror or str(e))
    return ToydiffError(f"cannot {doing}{where}: {fix}")
