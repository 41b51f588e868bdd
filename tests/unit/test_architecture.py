"""Import contracts: the module graph has no cycles, pure modules stay pure, foreign code stays
in the one module that wraps it, and the sandbox stands alone (it runs as a script)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "builder"
PURE = {
    "dockerfile",
    "instructions",
    "mounts",
    "stages",
    "plan",
    "oci",
    "reference",
    "digest",
    "expansion",
    "cachekey",
    "config",
    "errors",
}
IMPURE_STDLIB = {"subprocess", "socket", "shutil", "tempfile", "fcntl", "ctypes", "time", "http", "urllib"}
OWNER_OF = {
    "dockerfile_parse": {"dockerfile"},
    "yaml": {"config"},
    "zstandard": {"compression"},
    "isal": {"compression"},
    "http": {"registry", "fetch"},
}


def _imports(module: str) -> set[str]:
    """Top-level names imported anywhere in a module (including lazily, inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
GRAPH = {m: {name.split(".")[1] for name in _imports(m) if name.startswith("builder.")} for m in MODULES}


def test_the_module_graph_has_no_cycles() -> None:
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in GRAPH[module]:
            visit(dep, (*path, module))
        done.add(module)

    for module in MODULES:
        visit(module, ())


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_do_no_io(module: str) -> None:
    foreign = {name.split(".")[0] for name in _imports(module)} & IMPURE_STDLIB
    assert not foreign, f"{module} is pure but imports {sorted(foreign)}"
    assert GRAPH[module] <= PURE, f"{module} is pure but imports {sorted(GRAPH[module] - PURE)}"


@pytest.mark.parametrize("library", sorted(OWNER_OF))
def test_foreign_code_lives_in_one_module(library: str) -> None:
    users = {m for m in MODULES if any(name.split(".")[0] == library for name in _imports(m))}
    assert users <= OWNER_OF[library], f"{library} is imported by {sorted(users - OWNER_OF[library])}"


def test_the_sandbox_imports_nothing_from_the_package() -> None:
    assert GRAPH["sandbox"] == set()


def test_the_sandbox_server_imports_only_the_sandbox() -> None:
    """Started from a thread, the server is a new Python that imports it: it must stay light."""
    assert GRAPH["sandboxserver"] == {"sandbox"}


def test_only_the_cli_prints() -> None:
    printers = [m for m in MODULES if m != "cli" and "print(" in (PACKAGE / f"{m}.py").read_text()]
    assert printers in ([], ["sandbox"]), f"modules other than cli print: {printers}"
