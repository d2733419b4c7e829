"""What every benchmark does at its end: say which machine it ran on, and publish its results as JSON and a
markdown table, printed and written to OUT/NAME.json and OUT/NAME.md (numbers differ up to 3x between
machines of one kind, so a result is never without its machine)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine(**settings) -> dict:
    """The machine and torch build, and the benchmark's own settings."""
    return {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, **settings}


def publish(out: str | Path, name: str, results: dict, table: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}.md").write_text(table.rstrip("\n") + "\n")
    print(json.dumps(results))
    print(table)
