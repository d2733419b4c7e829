"""What this machine gives a process: its cores, its free memory, its cache folder. No torch.

Asked where a choice depends on the machine (threads for distances, whether an array fits before it is
allocated, where the noise floors are cached), so the data layer and `toydiff --help` can ask it too.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ToydiffError


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset, a pinned test
    worker), not every core of the machine as os.cpu_count() says."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cache_dir() -> Path:
    """The one place toydiff writes outside a run directory (the noise-floor cache): $TOYDIFF_CACHE, else
    $XDG_CACHE_HOME/toydiff, else ~/.cache/toydiff. Deleting it only costs recomputation."""
    if os.environ.get("TOYDIFF_CACHE"):
        return Path(os.environ["TOYDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "toydiff"


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: float, what: str, fix: str) -> None:
    """Refuse, before allocating, something that needs more memory than this machine has available."""
    free = available_memory()
    if free is not None and need > free:
        raise ToydiffError(f"{what} needs about {need / 2**30:.1f} GiB of memory and {free / 2**30:.1f} GiB is "
                           f"available; {fix}")
