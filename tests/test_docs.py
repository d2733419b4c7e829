"""The documentation tells the truth: the README's Python example runs, every error shown in a console block is
the one the code prints, the architecture page lists every module in an order its imports respect, and every
link inside the repository resolves."""

import ast
import re
import shlex
from pathlib import Path

import pytest

import toydiff
from toydiff.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(toydiff.__file__).parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def console_examples():
    for page in PAGES:
        for block in blocks(page, "console"):
            lines = block.strip().splitlines()
            for command, expected in zip(lines[::2], lines[1::2]):
                yield pytest.param(command, expected, id=f"{page.name}: {command}")


@pytest.mark.parametrize("command, expected", list(console_examples()))
def test_every_error_shown_is_the_error_printed(command, expected, tmp_path, monkeypatch, capsys):
    assert command.startswith("$ toydiff ") and expected.startswith("toydiff: error: ")
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(command)[2:]) == 2
    err = capsys.readouterr().err.strip()
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    assert re.fullmatch(pattern, err), err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_the_readmes_python_example_runs(tmp_path, monkeypatch):
    (code,) = blocks(ROOT / "README.md", "python")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "api-demo" / "metrics.json").is_file()
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"


def _architecture_rows() -> list[tuple[str, int]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    return [(m, int(n)) for m, n in re.findall(r"^\| `(\w+)` \| (\d+) \|", text, flags=re.M)]


def _imports(path: Path) -> set[str]:
    """The toydiff modules a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found - {"__init__"}


def test_the_module_map_lists_every_module_in_an_order_its_imports_respect():
    rows = _architecture_rows()
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    assert sorted(m for m, _ in rows) == sorted(modules)
    order = {m: i for i, (m, _) in enumerate(rows)}
    for m, _ in rows:
        later = [d for d in _imports(SRC / f"{m}.py") if d in order and order[d] >= order[m]]
        assert not later, f"{m} imports {later}, listed below it"


def test_the_module_maps_line_counts_are_current():
    """Within a quarter or 20 lines: the map is rewritten when a module grows or shrinks materially."""
    for m, n in _architecture_rows():
        actual = len((SRC / f"{m}.py").read_text(encoding="utf-8").splitlines())
        assert abs(actual - n) <= max(20, n // 4), f"{m}: {n} in docs/architecture.md, {actual} in the code"


def test_every_link_inside_the_repository_resolves_and_none_leaves_it():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "shared/" not in text.replace("/shared/run", ""), page.name  # no path outside the repository
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"https?://", target):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
