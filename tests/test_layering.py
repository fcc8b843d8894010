"""One-way dependencies: featstore <- featviews <- pipelines, trainer (docs/architecture.md).

Imports are read from the source with `ast`, so the test sees lazy imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# trainer may reach pipelines only for the online-teacher mode, lazily, in these modules.
ONLINE_MODULES = {"trainer/online.py", "trainer/prepare.py"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name.split(".")[0], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module.split(".")[0], id(node) in top_level))
    return out


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", _files("featstore"), ids=lambda p: p.name)
def test_featstore_imports_no_torch_and_no_upper_layer(path: Path) -> None:
    bad = {m for m, _ in _imports(path)} & {
        "torch",
        "timm",
        "open_clip",
        "pipelines",
        "trainer",
        "featcache",
    }
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _files("featviews"), ids=lambda p: p.name)
def test_featviews_imports_only_featstore_and_torch(path: Path) -> None:
    bad = {m for m, _ in _imports(path)} & {
        "pipelines",
        "trainer",
        "featcache",
        "timm",
        "open_clip",
    }
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _files("pipelines"), ids=lambda p: p.name)
def test_pipelines_never_imports_trainer(path: Path) -> None:
    bad = {m for m, _ in _imports(path)} & {"trainer", "featcache"}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _files("trainer"), ids=lambda p: p.name)
def test_trainer_reaches_pipelines_only_lazily_for_online_mode(path: Path) -> None:
    rel = path.relative_to(REPO).as_posix()
    found = [(m, top) for m, top in _imports(path) if m in {"pipelines", "featcache"}]
    if rel in ONLINE_MODULES:
        assert all(m == "pipelines" and not top for m, top in found), (rel, found)
    else:
        assert not found, f"{rel} imports {found}"


def _functions(package: str) -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for path in _files(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                out.append((f"{path.relative_to(REPO)}:{node.name}", node))
    return out


def test_featviews_functions_are_small() -> None:
    """The views-and-targets package keeps every function within 60 lines and 8 parameters."""
    for where, fn in _functions("featviews"):
        a = fn.args
        params = [
            p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")
        ]
        assert fn.end_lineno - fn.lineno + 1 <= 60, where
        assert len(params) <= 8, (where, params)
