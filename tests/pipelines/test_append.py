"""Appending new tiles (a new scene) to a finished store (issue 16, "Incremental stores").

The store of every test is the reliability suite's tiny one (bench/corruption.py: 8 tiles of
64 px, 3 tiles per shard, int8, scales 1 and 0.5 with flips, tiny DINOv2-B), extracted from the
first 4 tiles (``--limit 4``: shard 0 full, shard 1 partial) and then given all 8. The reference
is independent of the append code: a fresh, uninterrupted extraction of the 8 tiles, compared
file by file (every chunk, every ``zarr.json``; the lock file aside). Nothing may differ: the
shard grid does not move, the partial shard is recomputed whole with the same tiles a fresh
extraction batches together, and the header records the same package version (same install).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from featstore import lock, open_store, verify_store
from featstore.errors import FingerprintMismatchError, IncompleteStoreError
from featstore.faults import FAULT_ENV
from featstore.parts import AdditionError
from pipelines.incremental import run_addition
from pipelines.shards import ExtractionError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import corruption as C  # noqa: E402

STORED = 4  # tiles of the store before the append: not a multiple of tiles_per_shard (3)
META = "zarr.json"


def _append(source: Path, store: Path, **changes: object) -> Path:
    run_addition(C.extract_config(source, store, add=True, **changes), progress=False)
    return store


def _copy(store: Path, to: Path) -> Path:
    shutil.copytree(store, to)
    return to


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return C.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def fresh(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 8 tiles, extracted in one uninterrupted run: the reference."""
    return C.extract(dataset, tmp_path_factory.mktemp("fresh") / "all.zarr")


@pytest.fixture(scope="module")
def first(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 4 tiles (copy it before appending)."""
    return C.extract(dataset, tmp_path_factory.mktemp("first") / "first.zarr", limit=STORED)


@pytest.fixture(scope="module")
def appended(dataset: Path, first: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _append(dataset, _copy(first, tmp_path_factory.mktemp("appended") / "s.zarr"))


def _first_chunk_files(store: Path) -> list[Path]:
    """Chunk files of chunk 0 along the first axis of every array indexed by tile or shard (the
    tile index aside: one chunk over all tiles), found from the arrays' own metadata."""
    out = []
    for meta in store.rglob(META):
        doc = json.loads(meta.read_text())
        names = doc.get("dimension_names") or []
        array = meta.parent
        if doc.get("node_type") != "array" or not names or names[0] not in ("tile", "shard"):
            continue
        if array.relative_to(store).parts[0] == "tiles":
            continue
        out += [f for f in (array / "c" / "0").rglob("*") if f.is_file()]
        if (array / "c" / "0").is_file():
            out.append(array / "c" / "0")
    return sorted(out)


# --- the strong test ---------------------------------------------------------------------------


def test_an_append_equals_a_fresh_extraction_file_for_file(appended: Path, fresh: Path) -> None:
    got, want = C.tree(appended), C.tree(fresh)
    assert sorted(got) == sorted(want)
    assert [p for p in want if got[p] != want[p]] == []
    assert verify_store(str(appended)) == []
    store = open_store(str(appended))
    assert store.fingerprint == open_store(str(fresh)).fingerprint
    assert len(store.tiles) == 8 and store.done().all()


def test_full_stored_shards_are_never_rewritten(
    dataset: Path, first: Path, fresh: Path, tmp_path: Path
) -> None:
    store = _copy(first, tmp_path / "s.zarr")
    kept = _first_chunk_files(store)
    assert any("pixels/image" in str(f) for f in kept) and len(kept) > 10
    before = {f: (_sha256(f), f.stat().st_mtime_ns) for f in kept}
    partial = store / "pixels" / "image" / "c" / "1" / "0" / "0" / "0"
    partial_before = _sha256(partial)
    _append(dataset, store)
    provenance = store / "shard_fingerprint" / "c" / "0"
    for f, (sha, mtime) in before.items():
        if f == provenance:
            continue  # the kept shard's provenance: now the union's fingerprint (below)
        assert (_sha256(f), f.stat().st_mtime_ns) == (sha, mtime), f.relative_to(store)
    assert provenance.read_bytes() == (fresh / "shard_fingerprint" / "c" / "0").read_bytes()
    assert _sha256(partial) != partial_before  # the partial shard was recomputed whole


def test_an_append_on_the_shard_grid_writes_only_new_shards(
    dataset: Path, fresh: Path, tmp_path: Path
) -> None:
    store = C.extract(dataset, tmp_path / "s.zarr", limit=6)  # two full shards
    before = {f: _sha256(f) for f in _first_chunk_files(store)}
    _append(dataset, store)
    changed = [f for f, sha in before.items() if _sha256(f) != sha]
    assert [f.relative_to(store).as_posix() for f in changed] == ["shard_fingerprint/c/0"]
    got, want = C.tree(store), C.tree(fresh)
    assert sorted(got) == sorted(want) and [p for p in want if got[p] != want[p]] == []


def test_a_second_run_of_the_same_append_changes_nothing(appended: Path, dataset: Path) -> None:
    before = C.tree(appended)
    _append(dataset, appended)
    assert C.tree(appended) == before


# --- refusals ----------------------------------------------------------------------------------


def test_a_source_whose_first_tiles_differ_is_refused(
    dataset: Path, first: Path, tmp_path: Path
) -> None:
    from pipelines.synthetic import generate_synthetic

    other = tmp_path / "other"
    generate_synthetic(str(other), n_images=2, size=128, seed=99)
    store = _copy(first, tmp_path / "s.zarr")
    before = C.tree(store)
    with pytest.raises(ExtractionError, match="does not match the store's tile records"):
        _append(other, store)
    assert C.tree(store) == before


def test_new_tiles_and_a_new_teacher_at_once_are_refused(
    dataset: Path, first: Path, tmp_path: Path
) -> None:
    store = _copy(first, tmp_path / "s.zarr")
    before = C.tree(store)
    with pytest.raises(AdditionError, match="append the tiles first"):
        _append(dataset, store, teachers=("dinov2_vitb14", "clip_vitl14"))
    with pytest.raises(AdditionError, match="append the tiles first"):
        _append(dataset, store, scales=(1.0,))  # fewer levels than stored
    with pytest.raises(AdditionError, match="codec.name: stored 'int8' != requested 'fp16'"):
        _append(dataset, store, codec={"name": "fp16"})
    assert C.tree(store) == before


def test_an_unfinished_store_must_be_finished_first(dataset: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    _killed("write.before_done:2", C.extract, dataset, store, STORED)
    with pytest.raises(IncompleteStoreError, match="finish it first"):
        _append(dataset, store)


def test_a_pca_store_of_fewer_tiles_than_the_pca_sample_is_refused(
    dataset: Path, tmp_path: Path
) -> None:
    codec = {"name": "pca", "k": 8}
    store = C.extract(dataset, tmp_path / "s.zarr", limit=STORED, codec=codec)
    with pytest.raises(AdditionError, match="PCA basis fitted on its 4 tiles"):
        _append(dataset, store, codec=codec)


def test_a_plain_extract_of_more_tiles_names_add(dataset: Path, first: Path) -> None:
    with pytest.raises(FingerprintMismatchError, match="run the same command with --add"):
        C.extract(dataset, first)


# --- kills -------------------------------------------------------------------------------------


def _killed(fault: str, target: object, source: Path, store: Path, limit: int | None) -> None:
    child = multiprocessing.get_context("fork").Process(
        target=_with_fault, args=(fault, target, source, store, limit)
    )
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, f"not killed at {fault} ({child.exitcode})"


def _with_fault(fault: str, target: object, source: Path, store: Path, limit: int | None) -> None:
    os.environ[FAULT_ENV] = fault
    if limit is None:
        target(source, store)  # type: ignore[operator]
    else:
        target(source, store, limit=limit)  # type: ignore[operator]


@pytest.mark.parametrize(
    "fault",
    [
        "append.after_header:1",
        "append.after_resize:1",
        "write.before_done:1",
        "write.before_done:2",
        "finalize.merge:3",
    ],
    ids=["after-header", "arrays-grown", "partial-shard", "new-shard", "stats-merge"],
)
def test_a_killed_append_resumes_to_the_same_bytes(
    fault: str, dataset: Path, first: Path, fresh: Path, tmp_path: Path
) -> None:
    store = _copy(first, tmp_path / "s.zarr")
    _killed(fault, _append, dataset, store, None)
    assert C.tree(store) != C.tree(fresh)
    assert lock.read_lock(str(store)) is not None  # the killed run held the writer lock
    assert not open_store(str(store)).complete  # readers see an unfinished store
    _append(dataset, store)  # the same command again
    assert verify_store(str(store)) == []
    got, want = C.tree(store), C.tree(fresh)
    assert sorted(got) == sorted(want) and [p for p in want if got[p] != want[p]] == []


def test_a_killed_append_is_not_finished_by_a_plain_extract(
    dataset: Path, first: Path, fresh: Path, tmp_path: Path
) -> None:
    store = _copy(first, tmp_path / "s.zarr")
    _killed("append.after_header:1", _append, dataset, store, None)
    with pytest.raises(ExtractionError, match="unfinished append of tiles.*--add"):
        C.extract(dataset, store)
    _append(dataset, store)
    assert C.tree(store) == C.tree(fresh)


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_extract_add_appends_a_new_scene(
    dataset: Path, first: Path, fresh: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from featcache.cli import main

    store = _copy(first, tmp_path / "s.zarr")
    args = ["extract", str(dataset), str(store), "--teacher", "dinov2_vitb14", "--tiny", "--add"]
    args += ["--tile-size", "64", "--base-size", "70", "--tiles-per-shard", "3", "-q"]
    args += ["--batch-size", "3", "--scales", "1,0.5", "--flip", "--codec", "int8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert C.tree(store) == C.tree(fresh)


# --- a store that grew by `extract --add` (parts) ----------------------------------------------

CLIP = "clip_vitl14"


@pytest.fixture(scope="module")
def grown_fresh(dataset: Path, fresh: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 8 tiles of DINOv2, then CLIP-L added (`extract --add`): the reference."""
    store = _copy(fresh, tmp_path_factory.mktemp("grown") / "all.zarr")
    return _append(dataset, store, teachers=(CLIP,))


@pytest.fixture(scope="module")
def grown_first(dataset: Path, first: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 4 tiles of DINOv2, then CLIP-L added to them (copy it before appending)."""
    store = _copy(first, tmp_path_factory.mktemp("grown_first") / "first.zarr")
    return _append(dataset, store, teachers=(CLIP,), limit=STORED)


@pytest.mark.parametrize("fault", [None, "append.before_part_done:1", "write.before_done:2"])
def test_an_append_to_a_grown_store_equals_growing_a_fresh_one(
    fault: str | None, dataset: Path, grown_first: Path, grown_fresh: Path, tmp_path: Path
) -> None:
    store = _copy(grown_first, tmp_path / "s.zarr")
    teachers = ("dinov2_vitb14", CLIP)
    if fault is not None:
        _killed(fault, _append_both, dataset, store, None)
        assert not open_store(str(store)).complete
    _append(dataset, store, teachers=teachers)
    assert verify_store(str(store)) == []
    got, want = C.tree(store), C.tree(grown_fresh)
    assert sorted(got) == sorted(want) and [p for p in want if got[p] != want[p]] == []


def _append_both(source: Path, store: Path) -> None:
    _append(source, store, teachers=("dinov2_vitb14", CLIP))


def test_a_store_with_partitions_is_refused(dataset: Path, first: Path, tmp_path: Path) -> None:
    import zarr

    store = _copy(first, tmp_path / "s.zarr")
    zarr.open_group(str(store), mode="r+", use_consolidated=False).create_group("partitions")
    with pytest.raises(AdditionError, match="partitions/ .*covers the stored tiles only"):
        _append(dataset, store)


def test_a_damaged_appended_shard_is_repaired(
    dataset: Path, appended: Path, fresh: Path, tmp_path: Path
) -> None:
    from pipelines.repair import repair_store

    store = _copy(appended, tmp_path / "s.zarr")
    chunk = store / "teachers" / "dinov2_vitb14" / "s1.00" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10  # a bit flip in the new shard's features
    chunk.write_bytes(bytes(data))
    assert verify_store(str(store)) != []
    report = repair_store(C.extract_config(dataset, store))
    assert sorted(report.shards) == [2]
    assert C.tree(store) == C.tree(fresh)
