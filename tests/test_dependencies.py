"""The package's import graph has no cycle, deferred imports included, and the tests import only the package, their
helpers and installed distributions. (deptry checks pyproject.toml against src/'s imports, and import-linter the
layers of docs/design.md: both run in CI.)"""

import ast
import importlib.metadata
from pathlib import Path

from helpers import ROOT

from mnistgen import logged_model

SRC = ROOT / "src" / "mnistgen"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules `path` imports, at the top or inside a function alike."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mnistgen")}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module.startswith("mnistgen"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}
    return found


def test_the_import_graph_has_no_cycle():
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(graph) > 20  # the walk saw the package


def test_the_tests_import_only_the_package_their_helpers_and_installed_packages():
    """No test reaches into the repository's scripts: every import is the package, a module of tests/, or an
    installed distribution (or the standard library), and nothing edits sys.path."""
    tests = ROOT / "tests"
    own = {p.stem for p in tests.glob("*.py")}
    providers = importlib.metadata.packages_distributions()
    for path in sorted(tests.glob("*.py")):
        calls = [ast.unparse(n.func) for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        assert not [c for c in calls if c.startswith("sys.path.")], f"{path.name} edits sys.path"
        for name in logged_model.imported_packages([path]):
            assert name in own or name in providers or name == "conftest", f"{path.name} imports {name}"
