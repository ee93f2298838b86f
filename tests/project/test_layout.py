"""The shape of the code base: no import cycles (function-level imports included), short modules, a short entry
point and a README that fits its purpose. Cheap to check, and easy to lose one small change at a time."""
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
