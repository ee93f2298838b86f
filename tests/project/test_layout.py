"""The shape of the code base: no import cycles (function-level imports included), short modules, a short entry
point, a README that fits its purpose, and tests named after the module they test (tests/test_<module>.py; what
tests the project as a whole is in tests/project/). Cheap to check, and easy to lose one small change at a time."""
from __future__ import annotations

import ast
from pathlib import Path

from support import REPO

MAX_MODULE_LINES = 420
MAX_TRAIN_PY_LINES = 150
MAX_README_BYTES = 15_000


def modules() -> dict:
    """vae module name -> path, packages included (vae.estimators -> vae/estimators/__init__.py)."""
    out = {}
    for path in (REPO / "vae").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: set) -> set:
    """The vae modules `path` imports anywhere in its body (a `from vae import x` counts as vae.x when x is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def test_no_module_imports_one_that_imports_it_back():
    mods = modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    # A package's __init__ importing its own submodules is how a package is built, not a cycle to untangle.
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_modules_stay_short():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "vae").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
    assert len((REPO / "train.py").read_text().splitlines()) <= MAX_TRAIN_PY_LINES


def test_readme_fits_and_leads_with_results():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= MAX_README_BYTES
    first_screen = "\n".join(text.splitlines()[:40])
    assert "| result |" in first_screen.lower() or "results" in first_screen.lower()


def module_names() -> set:
    """The names a top-level tests/test_<name>.py may have: the stem of a vae/**/*.py file, the name of a package under
    vae/ (for its __init__.py), or train (train.py)."""
    vae = REPO / "vae"
    stems = {p.stem for p in vae.rglob("*.py") if not p.stem.startswith("__")}
    packages = {p.parent.name for p in vae.rglob("__init__.py") if p.parent != vae}
    return stems | packages | {"train"}


def test_every_test_file_is_named_after_the_module_it_tests():
    names = module_names()
    stray = sorted(p.name for p in (REPO / "tests").glob("test_*.py") if p.stem[len("test_"):] not in names)
    assert stray == [], ("tests/test_<module>.py tests vae/**/<module>.py (a package's __init__.py: the package's "
                         "name; train.py: train); what tests the project as a whole goes in tests/project/")


def test_no_test_file_imports_conftest():
    """Fixtures come from conftest.py by pytest's own lookup; helpers that tests import live in tests/support.py."""
    importers = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Import) and any(a.name == "conftest" for a in node.names)) or \
                    (isinstance(node, ast.ImportFrom) and node.module == "conftest"):
                importers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert importers == []

