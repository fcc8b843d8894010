"""No import circles among the project's modules (issue 13).

The graph is read from the source with ``ast``: an edge ``a → b`` for every ``import b`` /
``from b import x`` in ``a`` (``from pkg import sub`` points at the submodule). Imports inside
functions count too: deferring an import hides a circle from the interpreter, not from a reader
(the two circles issue 13 found, ``extract ↔ distributed`` and ``registry → timm_generic →
timm_vit → registry``, were both closed by deferred imports). ``if TYPE_CHECKING:`` blocks do not
run and are left out.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featstore", "featviews", "pipelines", "trainer", "featcache")
# Deferred circles known and owned elsewhere; each entry says why it is not fixed here.
KNOWN_DEFERRED: set[frozenset[str]] = set()


def _module_files() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    name = getattr(test, "id", None) or getattr(test, "attr", None)
    return isinstance(node, ast.If) and name == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements anywhere in ``tree``, except under ``if TYPE_CHECKING:``."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The project module ``name`` is, or is defined in (None: not the project's)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from`` import names (``from .x import y`` in ``package`` → ``package.x``)."""
    if not node.level:
        return str(node.module)
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _targets(
    node: ast.Import | ast.ImportFrom, mods: dict[str, Path], package: str = ""
) -> set[str]:
    if isinstance(node, ast.Import):
        return {t for a in node.names if (t := _owner(a.name, mods))}
    module = _absolute(node, package)
    out = set()
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        target = sub if sub in mods else _owner(module, mods)
        if target:
            out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    """Project module → project modules it imports."""
    mods = _module_files()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = (_targets(n, mods, package) for n in _imports(tree))
        graph[name] = set().union(*edges) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = {stack.pop()}
            while v not in comp:
                comp.add(stack.pop())
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_hand_built_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_deferred_imports_and_submodules_are_edges() -> None:
    mods = {"p": Path(), "p.a": Path(), "p.b": Path()}
    tree = ast.parse(
        "from p import b\nif TYPE_CHECKING:\n    import p.zz\ndef f():\n    from p.a import x\n"
    )
    assert set().union(*(_targets(n, mods) for n in _imports(tree))) == {"p.a", "p.b"}
    relative = ast.parse("from .a import x\nfrom . import b\n")
    assert set().union(*(_targets(n, mods, "p") for n in _imports(relative))) == {"p.a", "p.b"}


def test_the_project_has_no_import_circles() -> None:
    found = [c for c in cycles(import_graph()) if c not in KNOWN_DEFERRED]
    assert not found, f"import circles among project modules: {[sorted(c) for c in found]}"


def test_issue_13_circles_are_gone() -> None:
    named = {f"pipelines.teachers.{m}" for m in ("registry", "timm_generic", "timm_vit")}
    named |= {"pipelines.extract", "pipelines.distributed"}
    assert not any(c & named for c in cycles(import_graph()))


# `__main__` modules run the CLI when imported.
@pytest.mark.parametrize("name", sorted(m for m in _module_files() if not m.endswith("__main__")))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)
