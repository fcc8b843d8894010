"""SIGKILL of an extraction at named points, then the same extraction again (issue 15).

A subset of bench/kill_extract.py (which runs `featcache extract` in fresh subprocesses at 25
points). Here the killed run is a forked child of the test process (no second torch import),
killed by ``featstore.faults`` at the n-th time it reaches a point; the resumed store must pass
verify and equal, file by file, an extraction that was never interrupted.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest

from featstore import verify_store
from featstore.faults import FAULT_ENV, FaultSpecError, fault_point, parse_fault_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import corruption as C  # noqa: E402
import kill_extract as K  # noqa: E402

SUBSET = [
    ("shard.forward", 6),  # during a teacher forward of the second shard
    ("write.array", 6),  # during a shard write
    ("write.before_done", 2),  # between data and done marker
    ("finalize.merge", 1),  # during the stats merge
    ("create.before_rename", 1),  # during the store's creation
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return C.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return C.extract(dataset, tmp_path_factory.mktemp("ref") / "ref.zarr")


def _killed_child(fault: str, source: Path, store: Path) -> None:
    os.environ[FAULT_ENV] = fault
    C.extract(source, store)


def test_points_of_the_subset_are_in_the_bench_list() -> None:
    assert set(SUBSET) <= set(K.KILL_POINTS) and len(K.KILL_POINTS) >= 20


@pytest.mark.parametrize(("point", "n"), SUBSET, ids=[f"{p}:{n}" for p, n in SUBSET])
def test_killed_extraction_resumes_to_the_same_bytes(
    point: str, n: int, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    store = tmp_path / "s.zarr"
    child = multiprocessing.get_context("fork").Process(
        target=_killed_child, args=(f"{point}:{n}", dataset, store)
    )
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, f"not killed at {point}:{n} ({child.exitcode})"
    assert C.tree(store) != C.tree(reference)  # the kill left work undone
    C.extract(dataset, store)  # the same extraction again
    assert verify_store(str(store)) == []
    assert C.tree(store) == C.tree(reference)
    assert not list(tmp_path.glob("s.zarr.tmp-*"))


def test_fault_point_kills_at_the_nth_hit_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from featstore import faults

    killed: list[int] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setenv(FAULT_ENV, "p:3,q:1")
    faults.reset_fault_counts()
    for _ in range(5):
        fault_point("p")
    assert killed == [signal.SIGKILL]
    faults.reset_fault_counts()


def test_fault_point_is_a_no_op_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from featstore import faults

    monkeypatch.delenv(FAULT_ENV, raising=False)
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: pytest.fail("killed"))
    fault_point("write.before_done")
    assert "write.before_done" not in faults._hits


@pytest.mark.parametrize("bad", ["p", "p:0", ":2", "p:x"])
def test_malformed_fault_spec_names_the_variable(bad: str) -> None:
    with pytest.raises(FaultSpecError, match=FAULT_ENV):
        parse_fault_spec(bad)
