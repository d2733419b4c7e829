"""Progress for every long phase (training, sampling, noise floors, likelihoods).

On a terminal, or in a notebook, it is tqdm's bar, redrawn as the phase moves (every step of
training). Anywhere else (a log file, CI, a pipe) it is one plain line at most every
LINE_SECONDS, with the count, the rate and the time left, so a log shows where a run is
without a wall of carriage returns. A phase shorter than that prints nothing. The math never
draws progress itself: callers tick a Progress from their loops and callbacks.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, TextIO

LINE_SECONDS = 5.0  # the most often a plain (non-terminal) progress line is written


def message_log(quiet: bool = False) -> Callable[[str], None]:
    """The `log` every job takes: messages to stderr; quiet silences all but warnings (those that start with
    "warning:"), for the command line (--quiet) and the Python API (quiet=True) alike."""
    def log(message: str) -> None:
        if not quiet or message.startswith("warning:"):
            print(message, file=sys.stderr, flush=True)
    return log


def _interactive(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class Progress:
    """update(n) as work is done; set_postfix(name=value) for a running figure (the loss); close() at the end.
    total=None counts without a goal (an adaptive solver's evaluations). Disabled, every call is a no-op."""

    def __init__(self, total: Optional[float], desc: str, unit: str = "it", *, enabled: bool = True,
                 initial: float = 0, stream: Optional[TextIO] = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n, self._start_n = initial, initial
        self.stream = stream or sys.stderr
        self._bar = None
        self._postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        if enabled and _interactive(self.stream):
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, file=self.stream,
                             dynamic_ncols=True)

    def update(self, n: float = 1) -> None:
        if not self.enabled:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= LINE_SECONDS:
            self._last = now
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        if not self.enabled:
            return
        self._postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def _line(self, now: float) -> None:
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n:g}/{self.total:g} {self.unit}" if self.total else f"{self.n:g} {self.unit}"
        if self.total:
            done += f" ({self.n / self.total:.0%})"
        left = f", {(self.total - self.n) / rate:.0f} s left" if self.total and rate > 0 else ""
        extra = "".join(f", {k} {v}" for k, v in self._postfix.items())
        print(f"{self.desc}: {done}, {rate:.3g} {self.unit}/s{left}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
