"""JSON read back from disk, checked against a schema before anything uses it.

A damaged or hostile file (a manifest, a cache entry, a training state's metadata) ends in one line naming
the file and the field, never in a TypeError deep inside the code that trusted it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ToydiffError
from .files import read_text


def parse_json(text: str, where: str) -> Any:
    """JSON text, or a one-line error naming `where` (nesting too deep for the parser included)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ToydiffError(f"{where} is not valid JSON ({reason}); the file is damaged") from None


def read_json(path: str | Path, what: str = "file", schema: Any = object) -> Any:
    """A JSON file, checked against `schema` (see `check_schema`) before anything uses it."""
    where = f"{what} '{path}'"
    value = parse_json(read_text(path, what), where)
    check_schema(value, schema, where)
    return value


class Fields(dict):
    """A schema for a JSON object: the listed keys, where present, match their schemas (`required` must be
    present); other keys are let through."""

    def __init__(self, fields: dict, required: tuple[str, ...] = ()):
        super().__init__(fields)
        self.required = required


class MapOf:
    """A schema for a JSON object whose every value matches `schema` (a table keyed by names)."""

    def __init__(self, schema: Any):
        self.schema = schema


def check_schema(value: Any, schema: Any, where: str, at: str = "") -> None:
    """Check a value read from disk against a schema, so that damaged or hostile metadata ends in one line
    instead of a TypeError deep inside: a type (int: not bool; float or NUMBER: a finite number), None (null),
    a tuple (any of), a list of one schema (a list of such items), Fields or MapOf (objects), object (anything)."""
    if _matches(value, schema, where, at):
        return
    name = at or "the top level"
    raise ToydiffError(f"{where} is damaged: {name} should be {_describe(schema)}, not {type(value).__name__} "
                       f"{_short(value)}; the file was edited or corrupted")


def _matches(value: Any, schema: Any, where: str, at: str) -> bool:
    if schema is object:
        return True
    if schema is None:
        return value is None
    if isinstance(schema, tuple):  # a container of the wrong kind is False; a wrong item inside one raises
        return any(_matches(value, s, where, at) for s in schema)
    if isinstance(schema, (Fields, MapOf, list)):
        return _nested(value, schema, where, at)
    if schema is float:
        return isinstance(value, int) and not isinstance(value, bool) or \
            isinstance(value, float) and bool(np.isfinite(value))
    if schema is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, schema)


def _nested(value: Any, schema: Any, where: str, at: str) -> bool:
    """Containers: False when the container's own type is wrong; an item that is wrong raises, named."""
    if isinstance(schema, list):
        if not isinstance(value, list):
            return False
        for i, item in enumerate(value):
            check_schema(item, schema[0], where, f"{at}[{i}]")
        return True
    if not isinstance(value, dict):
        return False
    if isinstance(schema, MapOf):
        for k, v in value.items():
            check_schema(v, schema.schema, where, f"{at}.{k}" if at else k)
        return True
    missing = [k for k in schema.required if k not in value]
    if missing:
        raise ToydiffError(f"{where} is damaged: {f'{at}.' if at else ''}{missing[0]} is missing; the file was "
                           "edited or corrupted")
    for k, s in schema.items():
        if k in value:
            check_schema(value[k], s, where, f"{at}.{k}" if at else k)
    return True


def _describe(schema: Any) -> str:
    if isinstance(schema, tuple):
        return " or ".join(dict.fromkeys(_describe(s) for s in schema))
    if isinstance(schema, list):
        return f"a list of {_describe(schema[0])}"
    if isinstance(schema, (Fields, MapOf)):
        return "an object"
    return {None: "null", int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            dict: "an object", list: "a list"}.get(schema, getattr(schema, "__name__", str(schema)))


def _short(value: Any) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, float) or np.isfinite(value) else repr(value)
    except (ValueError, RecursionError):
        text = "..."
    return text if len(text) <= 40 else text[:37] + "..."
