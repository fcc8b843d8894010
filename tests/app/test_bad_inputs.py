"""Every case of the bad-input catalogue (`bad_inputs.CASES`), through the real CLI in-process.

Each case must end in a message, not a traceback (exit code != 0 for an error), name the file or
option at fault, say a fix, and leave the folder tree as it was, save the declared output
(`bad_inputs.judge`). Cases that still fail are strict xfails: fixing one turns it into a failure
that asks for the mark to be removed. The table of RELIABILITY.md comes from the same cases
(`bench/reliability.py`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.bad_inputs import (
    CASES,
    KNOWN_FAILURES,
    Case,
    Setup,
    Shared,
    build_shared,
    run_case,
)


def _param(case: Case) -> object:
    marks = []
    if case.kind in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[case.kind]))
    return pytest.param(case, id=case.kind, marks=marks)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    return build_shared(tmp_path_factory.mktemp("shared"))


def test_catalogue_is_large_and_kinds_are_unique() -> None:
    kinds = [c.kind for c in CASES]
    assert len(kinds) >= 60 and len(set(kinds)) == len(kinds)
    assert set(KNOWN_FAILURES) <= set(kinds)  # no stale entry
    commands = {c.command for c in CASES}
    assert commands >= {
        "synth",
        "extract",
        "info",
        "verify",
        "splits",
        "bank",
        "audit",
        "train",
        "evaluate",
        "predict",
        "export",
        "demo",
    }


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, shared: Shared, tmp_path: Path) -> None:
    if case.skip and (reason := case.skip()):
        pytest.skip(reason)
    verdict = run_case(case, tmp_path / "case", shared)
    assert verdict.clear, (
        f"{case.kind}: {'; '.join(verdict.problems)}\n--- output ---\n{verdict.output[-3000:]}"
    )


def test_judge_flags_a_success_that_leaves_files(shared: Shared, tmp_path: Path) -> None:
    """A valid `synth` posing as an error case: wrong exit, option not named, files left."""
    case = Case("probe", "synth", lambda env: Setup(["synth", "made"], ("--n-images",)), ("x",))
    verdict = run_case(case, tmp_path, shared)
    assert verdict.exit_code == 0 and verdict.crashed and not verdict.names
    assert not verdict.clean and (tmp_path / "made" / "images").is_dir()
    assert any("left behind" in p and "made" in p for p in verdict.problems)
    assert not verdict.clear


def test_judge_ignores_fix_words_inside_paths(shared: Shared, tmp_path: Path) -> None:
    """`info` on a missing store whose path holds the fix keyword: no fix is credited."""
    missing = tmp_path / "zebra" / "none.zarr"
    case = Case(
        "probe", "info", lambda env: Setup(["info", str(missing)], (str(missing),)), ("zebra",)
    )
    verdict = run_case(case, tmp_path / "case", shared)
    assert verdict.exit_code == 1 and verdict.names and verdict.clean
    assert verdict.fix is False and not verdict.clear


def test_reliability_rewrites_only_the_catalogue(tmp_path: Path) -> None:
    """bench/reliability.py keeps the marker line and the sections after it (other scripts')."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "reliability.py"
    spec = importlib.util.spec_from_file_location("reliability_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = tmp_path / "RELIABILITY.md"
    assert bench.kept_sections(doc) == f"\n{bench.MARKER}\n"  # no file yet: the marker alone
    others = f"{bench.MARKER}\n## SIGKILL of extraction\n\n| a | b |\n"
    doc.write_text("# old catalogue\n\nold rows\n" + others)
    assert bench.kept_sections(doc) == "\n" + others
