"""Name -> implementation registries for every closed choice (datasets, schedules, models, samplers).

Each registry implements one vocabulary of toydiff.core.config: registering a name the vocabulary
lacks is a bug (KeyError at import), and `missing()` lists the names still without an
implementation (a test keeps it empty). Looking up an unknown name raises a ToydiffError that
lists the valid names and the nearest one.
"""

from __future__ import annotations

from typing import Callable, Generic, Optional, Sequence, TypeVar

from .errors import unknown

F = TypeVar("F")


class Registry(Generic[F]):
    def __init__(self, kind: str, vocabulary: Optional[Sequence[str]] = None):
        self.kind = kind
        self.vocabulary = tuple(vocabulary) if vocabulary is not None else None
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        if self.vocabulary is not None and name not in self.vocabulary:
            raise KeyError(f"{self.kind} '{name}' is not in its vocabulary (toydiff.core.config); declare it there first")

        def add(fn: F) -> F:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise unknown(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return list(self._items)

    def missing(self) -> list[str]:
        """Names of the vocabulary that nothing implements."""
        return [n for n in self.vocabulary or () if n not in self._items]

    def __contains__(self, name: str) -> bool:
        return name in self._items
