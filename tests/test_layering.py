"""Layers point one way: every module imports on its own, `alisa_sim` never imports torch (nor triton), and no two
modules import each other, directly or round a longer loop (imports inside functions included)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alisa_sim", "alisa_exec")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """The project modules a module imports anywhere in it (`from package import module` names the module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in MODULES and module != name}


def test_no_import_cycles():
    graph = nx.DiGraph()
    for name, path in MODULES.items():
        graph.add_node(name)
        graph.add_edges_from((name, other) for other in imported_modules(name, path))
    # A package's __init__ re-exporting its own submodules is not a loop back up to it.
    graph.remove_edges_from([(a, b) for a, b in graph.edges if a.startswith(b + ".")])
    cycles = sorted(" -> ".join(cycle + [cycle[0]]) for cycle in nx.simple_cycles(graph))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# Imports each module of each package (JSON lists in argv) with every project module dropped from sys.modules first,
# so each is imported on its own; after each package, which heavy modules are loaded. Third-party modules stay
# loaded, which keeps this to one interpreter; alisa_sim goes first, so torch is not yet loaded when it is checked.
IMPORT_EACH = """
import importlib, json, sys
report = {}
for package, modules in json.loads(sys.argv[1]).items():
    failed = {}
    for module in modules:
        for name in [m for m in sys.modules if m.split(".")[0] in ("alisa_sim", "alisa_exec")]:
            del sys.modules[name]
        try:
            importlib.import_module(module)
        except Exception as exc:
            failed[module] = f"{type(exc).__name__}: {exc}"
    report[package] = {"failed": failed, "heavy": [m for m in ("torch", "triton") if m in sys.modules]}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def imported_alone():
    modules = {package: [m for m in MODULES if m.split(".")[0] == package] for package in PACKAGES}
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(modules)], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_on_its_own(imported_alone, package):
    assert not imported_alone[package]["failed"], imported_alone[package]["failed"]


def test_the_simulator_never_imports_torch(imported_alone):
    heavy = imported_alone["alisa_sim"]["heavy"]
    assert not heavy, f"importing every alisa_sim module loads {heavy}"
