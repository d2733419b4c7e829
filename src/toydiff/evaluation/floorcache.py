"""The noise-floor cache: floors of a dataset's iid draws computed once per (data, n, settings), kept whole.

The one thing toydiff writes outside a run directory (toydiff.core.machine.cache_dir); deleting it only
costs recomputation, and a damaged or edited entry is recomputed, never believed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from ..core.errors import ToydiffError, first_line, os_error
from ..core.files import atomic_write_text
from ..core.machine import cache_dir
from ..core.schema import Fields, MapOf, read_json
from .scores import FLOOR_VERSION, METRICS


def floor_cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "floors" / f"{digest}.json"


FLOOR_SCHEMA = MapOf(Fields({"mean": float, "std": float, "draws": int}, required=("mean", "std", "draws")))


def _floor_digest(key: dict, floors_: dict) -> str:
    return hashlib.sha256(json.dumps([key, floors_], sort_keys=True).encode()).hexdigest()


def cached_floors(key: dict, compute_floors: Callable[[], dict], log: Callable[[str], None] = lambda s: None
                  ) -> tuple[dict, bool]:
    """Floors from the cache when `key` (everything they depend on) was seen before; else computed and stored.

    A cache entry is used only when it is whole: the same key, floors of the schema every metric's floor has
    (finite mean, std >= 0, draws) for known metrics only, and a SHA-256 over key and floors that matches; any
    other entry (damaged, edited, a wrong type inside) is recomputed and replaced, so a tampered cache never
    changes a verdict. Entries are written atomically: two evaluations at once each write a whole file."""
    key = {**key, "floor_version": FLOOR_VERSION}
    path = floor_cache_path(key)
    if path.exists():
        try:
            stored = read_json(path, "noise-floor cache entry", Fields({"key": dict, "floors": FLOOR_SCHEMA,
                                                                         "sha256": str}))
            floors_ = stored["floors"]
            if (stored.get("key") == key and stored.get("sha256") == _floor_digest(key, floors_)
                    and set(floors_) <= set(METRICS) and all(f["std"] >= 0 and f["draws"] >= 2
                                                             for f in floors_.values())):
                return floors_, True
            log(f"the cached noise floors in '{path}' do not match what they vouch for; computing them again")
        except (ToydiffError, KeyError, TypeError) as e:
            log(f"the cached noise floors are damaged ({e}); computing them again")
    result = compute_floors()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "floors": result, "sha256": _floor_digest(key, result)}))
    except (OSError, ToydiffError) as e:  # a cache: the evaluation goes on, and only says so
        why = e if isinstance(e, ToydiffError) else os_error(e, doing="write")
        log(f"warning: the noise floors were not cached ({first_line(why)}); they will be computed again next "
            "time (TOYDIFF_CACHE moves the cache)")
    return result, False
