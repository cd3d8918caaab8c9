"""The layering docs/ARCHITECTURE.md describes, checked on the source: no import cycle,
no import inside a function to get round one, no private name imported from another
module, and backends that import only the leaves."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

import afunix

PACKAGE = Path(afunix.__file__).resolve().parent
LEAVES = {"afunix._limits", "afunix._kernel", "afunix._sockets", "afunix._contract", "afunix._wakeups",
          "afunix._version"}
BACKENDS = {"afunix._cbackend", "afunix._stdlib"}
# Late imports that load less, not cycle dodges (there is no cycle: see below):
# the benchmark only for its command.
LATE: Set[Tuple[str, str]] = {("afunix.__main__", "afunix.bench.cli")}


def _modules() -> Iterator[Tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _imports(name: str, path: Path) -> Iterator[Tuple[ast.AST, str, List[str], bool]]:
    """(node, afunix module imported, names taken from it, at module level)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "afunix":
                continue
            names = [a.name for a in node.names]
            modules = [n for n in names if _is_module(target + "." + n)]
            for m in modules:
                yield node, target + "." + m, [], id(node) in top
            rest = [n for n in names if n not in modules]
            if rest or not modules:
                yield node, target, rest, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "afunix":
                    yield node, alias.name, [], id(node) in top


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for name, path in _modules():
        graph[name] = {target for _, target, _, top in _imports(name, path) if top}
    return graph


def test_no_import_cycle_among_the_modules() -> None:
    graph = _graph()
    done: Set[str] = set()

    def visit(node: str, stack: List[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            if nxt != node and not nxt.startswith(node + "."):  # a package importing its own modules
                visit(nxt, stack + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_no_module_imports_another_inside_a_function() -> None:
    late = {(name, target) for name, path in _modules()
            for _, target, _, top in _imports(name, path) if not top}
    assert late <= LATE, late - LATE


def test_no_private_name_is_imported_from_another_module() -> None:
    private = {(name, target, n) for name, path in _modules()
               for _, target, names, _ in _imports(name, path)
               for n in names if n.startswith("_") and not n.startswith("__")}
    assert not private, private


def test_leaves_import_nothing_and_backends_only_leaves() -> None:
    graph = _graph()
    for leaf in LEAVES:
        assert graph[leaf] == set(), (leaf, graph[leaf])
    for backend in BACKENDS:
        assert graph[backend] <= LEAVES, (backend, graph[backend] - LEAVES)


def test_the_architecture_page_names_every_module_of_the_channel() -> None:
    page = (PACKAGE.parent.parent / "docs" / "ARCHITECTURE.md")
    if not page.exists():
        pytest.skip("needs the source checkout")
    text = page.read_text()
    for module in ("channel", "frames", "codec", "framewriter", "_chanio", "aio"):
        assert "`%s`" % module in text or "`%s.py`" % module in text, module
