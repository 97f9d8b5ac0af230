"""The package's layers, read from its imports: who may import whom, no circles, and a node
that never loads the tooling."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "node" / "roomcast"

#: Modules every layer may use: settings, the clock, metrics and logging set-up.
FOUNDATION = ("roomcast.config", "roomcast.clock", "roomcast.metrics", "roomcast.logs",
              "roomcast.namespaces")
#: The backends' seams (interfaces and errors), as opposed to their Redis implementations.
SEAMS = ("roomcast.backends.broker", "roomcast.backends.history", "roomcast.backends.presence")

#: layer -> the roomcast modules it may import (prefix match). Order: bottom to top.
ALLOWED: dict[str, tuple[str, ...]] = {
    "roomcast.protocol": ("roomcast.protocol",),
    "roomcast.backends": ("roomcast.protocol", "roomcast.backends", *FOUNDATION),
    "roomcast.service": ("roomcast.protocol", "roomcast.backends", "roomcast.service",
                         *FOUNDATION),
    "roomcast.transports": ("roomcast.protocol", "roomcast.service", "roomcast.transports",
                            *SEAMS, *FOUNDATION),
    "roomcast.app": ("roomcast.protocol", "roomcast.backends", "roomcast.service",
                     "roomcast.transports", *FOUNDATION),
    "roomcast.tools": ("roomcast.protocol", "roomcast.tools", *FOUNDATION),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, *, top_level_only: bool = False) -> Iterator[str]:
    """The roomcast modules ``path`` imports, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = list(tree.body) if top_level_only else [tree]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            nodes.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("roomcast"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "roomcast"):
            known = modules()
            for alias in node.names:  # `from roomcast.protocol import envelopes` is a module.
                candidate = f"{node.module}.{alias.name}"
                yield candidate if candidate in known else node.module
        if not top_level_only or isinstance(node, ast.If | ast.Try):
            nodes.extend(ast.iter_child_nodes(node))


def layer_of(module: str) -> str | None:
    return next((layer for layer in ALLOWED if module == layer or module.startswith(
        layer + ".")), None)


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_the_layers_below_it(module: str) -> None:
    """protocol < backends < service < transports < app; tools beside them, on protocol only."""
    layer = layer_of(module)
    if layer is None:  # Foundation modules, cli and the package itself.
        allowed = ("roomcast.config",) if module in FOUNDATION else ()
        if module in FOUNDATION:
            bad = [m for m in imports(modules()[module]) if not m.startswith(allowed)]
            assert bad == [], f"{module} is a foundation module but imports {bad}"
        return
    bad = sorted({m for m in imports(modules()[module])
                  if not m.startswith(ALLOWED[layer]) and m != "roomcast"})
    assert bad == [], f"{module} ({layer}) may not import {bad}"


def test_only_the_backend_chooser_and_tests_name_redis_implementations() -> None:
    """Redis implementations are built in one place (roomcast.backends.build)."""
    for module, path in modules().items():
        if module.startswith("roomcast.backends"):
            continue
        redis_modules = [m for m in imports(path) if m.endswith(("_redis", "redis_common",
                                                                 "backends.keys"))]
        assert redis_modules == [], f"{module} imports {redis_modules}"


def test_nothing_in_the_product_imports_the_tools() -> None:
    """Only the command line reaches roomcast.tools (and only for a tool's own subcommand)."""
    for module, path in modules().items():
        if module.startswith("roomcast.tools") or module == "roomcast.cli":
            continue
        assert not [m for m in imports(path) if m.startswith("roomcast.tools")], module


def test_the_product_has_no_import_circle() -> None:
    """Module-level imports form no cycle (depth-first search over the import graph)."""
    graph = {m: {i for i in imports(p, top_level_only=True) if i in modules() and i != m}
             for m, p in modules().items()}
    # A package's __init__ importing its own submodules is not a circle through them.
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module):], module]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def _imported_modules(*args: str) -> set[str]:
    """Every module ``python -X importtime *args`` imported (from its stderr report)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                            text=True, timeout=60, check=False)
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_roomcast_node_help_does_not_import_tooling() -> None:
    """`python -X importtime -m roomcast node --help` loads no client, cluster, nginx or bench."""
    names = _imported_modules("-m", "roomcast", "node", "--help")
    assert "roomcast.config" in names  # The report was read.
    assert not {n for n in names if n.startswith(("roomcast.tools", "loadtest"))}


def test_a_serving_node_does_not_import_tooling() -> None:
    """Everything a running node imports (app, service, transports, Redis backends) leaves the
    client, the cluster supervisor, nginx and the load tools out."""
    names = _imported_modules(
        "-c", "import roomcast.app, roomcast.backends.broker_redis, "
              "roomcast.backends.presence_redis, roomcast.backends.history_redis; "
              "from roomcast.cli import build_parser; build_parser(only='node')")
    assert "roomcast.app" in names and "roomcast.transports.websocket" in names
    loaded = {n for n in names if n.startswith(("roomcast.tools", "loadtest"))}
    assert loaded == set()
    assert "websockets.asyncio.client" not in names
