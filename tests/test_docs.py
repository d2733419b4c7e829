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
    return [(m, int(n)) for m, n in re.findall(r"^\| `([\w.]+)` \| (\d+) \|", text, flags=re.M)]


def _modules() -> dict[str, Path]:
    """Every module of toydiff by its dotted name under the package (core.errors, methods.ddpm, api); a package's
    __init__ goes by the package's name (methods), the empty ones aside."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[0] in ("presets", "studies") or parts[-1] == "__main__" or len(parts) == 1 and parts[0] == "__init__":
            continue
        if parts[-1] == "__init__":
            if not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(path.read_text()))):
                continue  # a package's docstring
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The toydiff modules a file imports, at the top or inside functions, by dotted name; "" is toydiff itself
    (its __init__: `__version__` and the public names sit at the top of the house)."""
    package = list(path.relative_to(SRC).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "toydiff"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "toydiff":
                base = node.module.split(".")[1:]
            else:
                continue
            for a in node.names:  # `from ..data import datasets` imports a module; `from ..core.config import X` a name
                dotted = ".".join(base + [a.name])
                found.add(dotted if dotted in modules else ".".join(base))
    return found


def test_the_module_map_lists_every_module_in_an_order_its_imports_respect():
    """The layering test: packages in the order of the flow of data, each module importing only what is listed
    above it (a lower package, or an earlier module of its own); importing toydiff itself (its `__version__`,
    its public names) from inside fails, as does a package split over two places in the map."""
    rows, modules = _architecture_rows(), _modules()
    assert sorted(m for m, _ in rows) == sorted(modules)
    packages = [m.split(".")[0] for m, _ in rows]
    assert [p for i, p in enumerate(packages) if i == 0 or p != packages[i - 1]] == list(dict.fromkeys(packages)), \
        "a package's modules are not together in the map"
    order = {m: i for i, (m, _) in enumerate(rows)}
    for m, _ in rows:
        up = [d or "toydiff" for d in _imports(modules[m], modules) if d == "" or order.get(d, -1) >= order[m]]
        assert not up, f"{m} imports {up}, listed below it"


def test_the_module_maps_line_counts_are_current():
    """Within a quarter or 20 lines: the map is rewritten when a module grows or shrinks materially."""
    modules = _modules()
    for m, n in _architecture_rows():
        actual = len(modules[m].read_text(encoding="utf-8").splitlines())
        assert abs(actual - n) <= max(20, n // 4), f"{m}: {n} in docs/architecture.md, {actual} in the code"


def test_no_module_outside_the_methods_wing_tests_a_method_s_name():
    """A method's name (and the process or objective names that pick one) is compared only inside
    toydiff/methods: everywhere else a method is an object asked for what it does."""
    from toydiff.core import config as C

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


def test_every_folder_of_modules_is_a_package_that_git_keeps():
    """A folder of modules without its __init__.py still imports from a checkout (a namespace package), but a
    built wheel leaves it out; and a source file that .gitignore matches (a `runs/` rule met toydiff/runs/) is
    missing from every fresh clone. Both are checked here, the second where this is a git checkout."""
    import shutil
    import subprocess
    folders = {p.parent for p in SRC.rglob("*.py")}
    assert not [str(d.relative_to(SRC)) for d in folders if not (d / "__init__.py").is_file()]
    if shutil.which("git") and (ROOT / ".git").exists():
        files = [str(p.relative_to(ROOT)) for p in sorted(SRC.rglob("*")) if p.is_file() and "__pycache__" not in
                 p.parts]
        ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True,
                                 text=True).stdout.split()
        assert not ignored, f"ignored by .gitignore: {ignored}"
