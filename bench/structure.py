"""Structure figures of a checkout: the package import graph, mode-string comparisons, sizes.

Read from the source with ``ast`` (nothing is imported or run), so it measures any checkout:

    python bench/structure.py [ROOT]           # default: this repository

Prints, as markdown:

* the package graph: for each project package, the project packages it imports (``lazy``: only
  inside functions);
* every place where a run mode or target mode is compared with a string literal
  (``mode == "cached"``, ``target_mode != "view_bank"``, ``mode in ("warp", ...)``);
* the longest function and the most parameters in each package.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("featstore", "featviews", "pipelines", "trainer", "featcache")
MODE_WORDS = {"cached", "online", "warp", "grid_aligned", "view_bank"}
MODE_ATTRS = {"mode", "target_mode"}


def _files(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []


def package_graph(root: Path) -> dict[str, dict[str, bool]]:
    """``{package: {imported package: imported at module level somewhere}}``."""
    graph: dict[str, dict[str, bool]] = {}
    for pkg in PACKAGES:
        edges: dict[str, bool] = {}
        for path in _files(root, pkg):
            tree = ast.parse(path.read_text())
            top = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    other = name.split(".")[0]
                    if other in PACKAGES and other != pkg:
                        edges[other] = edges.get(other, False) or id(node) in top
        if _files(root, pkg):
            graph[pkg] = edges
    return graph


def _is_mode_string(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and node.value in MODE_WORDS:
        return True
    return isinstance(node, ast.Tuple | ast.List | ast.Set) and any(
        isinstance(e, ast.Constant) and e.value in MODE_WORDS for e in node.elts
    )


def _is_mode_name(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    return name in MODE_ATTRS or name == "run"


def mode_comparisons(root: Path) -> list[str]:
    """``file:line`` of every comparison of a mode with a mode string literal."""
    found = []
    for pkg in PACKAGES:
        for path in _files(root, pkg):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Compare):
                    continue
                sides = [node.left, *node.comparators]
                if any(_is_mode_string(s) for s in sides) and any(_is_mode_name(s) for s in sides):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def function_sizes(root: Path, package: str) -> tuple[tuple[int, str], tuple[int, str]]:
    """(most lines, where) and (most parameters, where) over the package's functions."""
    lines, params = (0, ""), (0, "")
    for path in _files(root, package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(root)}:{node.name}"
                n_lines = node.end_lineno - node.lineno + 1
                a = node.args
                n_params = len(a.posonlyargs + a.args + a.kwonlyargs) - (
                    1 if a.args and a.args[0].arg in ("self", "cls") else 0
                )
                lines = max(lines, (n_lines, where))
                params = max(params, (n_params, where))
    return lines, params


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    print(f"## {root}\n\n| package | imports |\n|---|---|")
    for pkg, edges in package_graph(root).items():
        shown = ", ".join(f"{o}{'' if top else ' (lazy)'}" for o, top in sorted(edges.items()))
        print(f"| {pkg} | {shown or '-'} |")
    comps = mode_comparisons(root)
    print(f"\nmode strings compared: {len(comps)}")
    for where in comps:
        print(f"- {where}")
    print("\n| package | longest function (lines) | most parameters |\n|---|---|---|")
    for pkg in PACKAGES:
        if _files(root, pkg):
            (nl, wl), (np_, wp) = function_sizes(root, pkg)
            print(f"| {pkg} | {nl} ({wl}) | {np_} ({wp}) |")


if __name__ == "__main__":
    main()
