"""Every error class of the project derives from one torch-free base, `FeatcacheError`.

The CLI catches that base in one place (featcache/cli.py), so an error class outside it would
end a command in a traceback. The classes are found twice, independently: by importing every
module and walking its members, and by reading every source file's class statements with `ast`
(so a module the import walk missed, or a class it could not see, fails the test).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from featstore.errors import FeatcacheError, StoreError

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("featstore", "featviews", "pipelines", "trainer", "featcache")


def _walked_exception_classes() -> dict[str, type[BaseException]]:
    """``module.Class`` -> class, for every exception class defined in the project's modules."""
    found: dict[str, type[BaseException]] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
        for name in names:
            module = importlib.import_module(name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == name:
                    found[f"{name}.{obj.__qualname__}"] = obj
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _source_exception_classes() -> set[str]:
    """``module.Class`` for every module-level class whose base is named *Error / *Exception."""
    found = set()
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in tree.body:
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = [
                    b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
                ]
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    found.add(f"{_module_name(path)}.{node.name}")
    return found


@pytest.fixture(scope="module")
def walked() -> dict[str, type[BaseException]]:
    return _walked_exception_classes()


def test_the_walk_sees_every_error_class_in_the_source(walked: dict) -> None:
    in_source = _source_exception_classes()
    assert len(in_source) >= 40  # 43 when the base was introduced (issue 13)
    missed = sorted(in_source - set(walked))
    assert not missed, f"error classes the import walk did not see: {missed}"


def test_every_project_error_derives_from_featcache_error(walked: dict) -> None:
    # Warnings are issued with warnings.warn, never raised to the CLI.
    errors = {k: c for k, c in walked.items() if not issubclass(c, Warning)}
    outside = sorted(k for k, c in errors.items() if not issubclass(c, FeatcacheError))
    assert not outside, (
        f"{outside} do not derive from featstore.errors.FeatcacheError: the CLI would end in a "
        "traceback on them; add FeatcacheError to their bases"
    )


def test_warnings_are_the_only_exceptions_left_out(walked: dict) -> None:
    left_out = {k for k, c in walked.items() if not issubclass(c, FeatcacheError)}
    assert left_out == {"pipelines.sources.errors.LabelConventionWarning"}


# The builtin bases the classes had before FeatcacheError (callers catch them, e.g.
# `except ValueError`); written out by hand from the code before issue 13. By class name, so
# that moving a class to another module keeps the check.
KEPT_BASES = {
    "ExtractConfigError": ValueError,
    "SourceError": ValueError,
    "TeacherInputError": ValueError,
    "UnknownTeacherError": ValueError,
    "WeightsError": ValueError,
    "TrainConfigError": ValueError,
    "CheckpointError": ValueError,
    "PredictError": ValueError,
    "NonFiniteLossError": FloatingPointError,
    "DataCheckError": ValueError,
    "StudentConfigError": ValueError,
    "BackboneWeightsError": RuntimeError,
    "DemoError": RuntimeError,
    "AuditError": ValueError,
    "MissingTeacherError": KeyError,
    "CodecError": ValueError,
    "ShardDataError": ValueError,
    "PartitionError": ValueError,
}


@pytest.mark.parametrize("name", sorted(KEPT_BASES))
def test_each_error_keeps_its_builtin_base(name: str, walked: dict) -> None:
    (cls,) = [c for c in walked.values() if c.__name__ == name]  # exactly one definition
    assert issubclass(cls, KEPT_BASES[name])
    assert issubclass(cls, FeatcacheError)


def test_store_errors_sit_under_the_base() -> None:
    assert issubclass(StoreError, FeatcacheError) and FeatcacheError.__bases__ == (Exception,)


def test_the_base_imports_without_torch() -> None:
    probe = "import sys, featstore.errors; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.stdout.strip() == "False"
