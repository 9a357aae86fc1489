"""The house rules (docs/architecture.md), read from the source: which room may import which,
no import circles, nothing in core imports streamlit, files of one idea stay short, and the
public API and the one path of a policy hold."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# room -> the rooms it may import (itself included); everything else in core is forbidden
ALLOWED = {
    "core.method": {"core.method"},
    "core.models": {"core.method", "core.models"},
    "core.engine": {"core.method", "core.models", "core.engine"},
    "core.analysis": {"core.method", "core.models", "core.engine", "core.analysis"},
    "core.cli": {"core.method", "core.models", "core.engine", "core.analysis", "core.cli"},
}
ROOMS = tuple(ALLOWED)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports (top level and inside functions), absolute, with its line."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            # `from core.analysis import plots` imports the submodule core.analysis.plots
            for a in node.names:
                if (ROOT / Path(*f"{mod}.{a.name}".split("."))).with_suffix(".py").exists() or \
                        (ROOT / Path(*f"{mod}.{a.name}".split("."))).is_dir():
                    out.append((f"{mod}.{a.name}", node.lineno))
    return out


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def _room(module: str) -> str | None:
    return next((r for r in ROOMS if module == r or module.startswith(r + ".")), None)


def test_rooms_import_only_the_rooms_below_them():
    bad = []
    for path in _sources("core"):
        mine = _room(_module_name(path))
        for mod, line in _imports(path):
            theirs = _room(mod)
            if mine and theirs and theirs not in ALLOWED[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {mod} ({theirs})")
            if mod.split(".")[0] in ("ui", "pages", "app"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the app's {mod}")
    assert not bad, "\n".join(bad)


def test_core_never_imports_streamlit():
    offenders = [f"{p.relative_to(ROOT)}:{line}" for p in _sources("core") for mod, line in _imports(p)
                 if mod.split(".")[0] == "streamlit"]
    assert not offenders


def test_the_rule_checker_catches_a_forbidden_arrow(tmp_path, monkeypatch):
    """The checker itself: a method module importing the engine is reported."""
    fake = ROOT / "core" / "method" / "_arrow_probe.py"
    fake.write_text("from ..engine import config\n")
    try:
        with pytest.raises(AssertionError, match="_arrow_probe.py:1 \\(core.method\\) imports core.engine"):
            test_rooms_import_only_the_rooms_below_them()
    finally:
        fake.unlink()


def test_no_import_circle_among_project_modules():
    modules = {_module_name(p): p for p in _sources("core", "ui", "pages")}
    graph = {m: {mod for mod, _ in _imports(p) if mod in modules and mod != m} for m, p in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a circle: drop package -> own child
    for m in graph:
        if modules[m].name == "__init__.py":
            graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_files_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in _sources("core", "ui", "pages")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_core_has_rooms_each_saying_what_it_may_import():
    for room in ROOMS:
        init = ROOT / Path(*room.split(".")) / "__init__.py"
        assert init.is_file(), room
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{room}/__init__.py must say what it may import"


def test_public_api_and_the_command_line_need_no_ui_libraries():
    """`from core import ...` works, and `python -m core train/bench` import no streamlit,
    plotly or captum (the GPU machine has none of them)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('streamlit', 'plotly', 'captum'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from core import CompressionPolicy, compress_model, decompress_model, build_model, TrainConfig, train\n"
        "import core.cli\n"
        "from core.cli import main\n"
        "print(main(['train', '--help']) if False else 'ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
