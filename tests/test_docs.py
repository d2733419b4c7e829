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


def _units() -> dict[str, list[Path]]:
    """The map's units: each module of toydiff's top folder, and each subpackage as one (its files together)."""
    units = {p.stem: [p] for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")}
    units.update({d.name: sorted(d.glob("*.py")) for d in SRC.iterdir()
                  if (d / "__init__.py").is_file() and len(list(d.glob("*.py"))) > 1})  # not presets/, studies/
    return units


def _imports(paths: list[Path]) -> set[str]:
    """The toydiff units the files import, at the top or inside functions (a subpackage's own modules aside)."""
    found = set()
    for path in paths:
        up = 1 if path.parent == SRC else 2  # a subpackage's module reaches toydiff's modules with `from ..`
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == up:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found - {"__init__"}


def test_the_module_map_lists_every_module_in_an_order_its_imports_respect():
    rows, units = _architecture_rows(), _units()
    assert sorted(m for m, _ in rows) == sorted(units)
    order = {m: i for i, (m, _) in enumerate(rows)}
    for m, _ in rows:
        later = [d for d in _imports(units[m]) if d in order and order[d] >= order[m]]
        assert not later, f"{m} imports {later}, listed below it"


def test_the_module_maps_line_counts_are_current():
    """Within a quarter or 20 lines: the map is rewritten when a module grows or shrinks materially."""
    units = _units()
    for m, n in _architecture_rows():
        actual = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in units[m])
        assert abs(actual - n) <= max(20, n // 4), f"{m}: {n} in docs/architecture.md, {actual} in the code"


def test_no_module_outside_the_methods_wing_tests_a_method_s_name():
    """A method's name (and the process or objective names that pick one) is compared only inside
    toydiff/methods: everywhere else a method is an object asked for what it does."""
    from toydiff import config as C

    names = "|".join(sorted(set(C.METHODS + C.DISTILL_METHODS + C.OBJECTIVES + C.PROCESSES)))
    quoted = rf"""["']({names})["']"""
    tests = re.compile(rf"(==|!=|\bin\b)\s*\(?\s*{quoted}|{quoted}\s*(==|!=|\bin\b)|"
                       rf"\.(process|objective)\s*(==|!=|\bin\b)|isinstance\(.*(Denoising|FlowMatching|MeanFlow|"
                       rf"Consistency|Progressive)")
    found = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in sorted(SRC.rglob("*.py"))
             if "methods" not in p.relative_to(SRC).parts
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if tests.search(line)]
    assert not found, found


def test_every_link_inside_the_repository_resolves_and_none_leaves_it():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "shared/" not in text.replace("/shared/run", ""), page.name  # no path outside the repository
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"https?://", target):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
