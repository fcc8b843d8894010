"""Adding a teacher or levels to a finished store in place (issue 16, "Incremental stores").

The store of every test is the reliability suite's tiny one (bench/corruption.py: 8 tiles of
64 px, 3 shards, int8, scales 1 and 0.5 with flips, tiny DINOv2-B). What an addition writes is
checked against independent runs: the existing files by their sha256 before and after, the new
teacher's arrays against a fresh extraction of that teacher alone, the union's fingerprint
against a fresh extraction of both teachers, a killed addition against an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from featstore import layout as L
from featstore import lock, open_store, verify_store
from featstore.errors import FingerprintMismatchError, IncompleteStoreError, StoreLockedError
from featstore.faults import FAULT_ENV
from featstore.parts import AdditionError
from featstore.schema import StoreSchema
from featstore.verify import damaged_shards
from pipelines.config import ExtractConfigError
from pipelines.incremental import run_addition
from pipelines.shards import ExtractionError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import corruption as C  # noqa: E402

DINO, CLIP = "dinov2_vitb14", "clip_vitl14"
HEADER = "zarr.json"  # the root metadata: the header is the one file an addition rewrites


def _add(source: Path, store: Path, **changes: object) -> Path:
    cfg = C.extract_config(source, store, add=True, **{"teachers": (CLIP,), **changes})
    run_addition(cfg, progress=False)
    return store


def _sha256s(store: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in C.tree(store).items()}


def _copy(store: Path, to: Path) -> Path:
    shutil.copytree(store, to)
    return to


def _raw(store: Path, path: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r", use_consolidated=False)[path][:])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return C.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return C.extract(dataset, tmp_path_factory.mktemp("base") / "dino.zarr")


@pytest.fixture(scope="module")
def clip_alone(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return C.extract(dataset, tmp_path_factory.mktemp("clip") / "clip.zarr", teachers=(CLIP,))


@pytest.fixture(scope="module")
def added(dataset: Path, base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DINOv2 store with CLIP-L added, uninterrupted."""
    return _add(dataset, _copy(base, tmp_path_factory.mktemp("added") / "s.zarr"))


def test_adding_a_teacher_leaves_every_existing_file_byte_identical(
    base: Path, added: Path
) -> None:
    before, after = _sha256s(base), _sha256s(added)
    changed = sorted(p for p in before if before[p] != after.get(p))
    assert changed == [HEADER]
    new = {p for p in after if p not in before}
    assert new and all(p.startswith((f"teachers/{CLIP}/", "parts/")) for p in new)


def test_the_added_teacher_equals_a_fresh_extraction_of_it_alone(
    added: Path, clip_alone: Path
) -> None:
    fresh, grown = open_store(str(clip_alone)), open_store(str(added))
    names = [n for n in os.listdir(clip_alone / "teachers" / CLIP) if n != HEADER]
    assert len(names) == 12  # 4 levels x (features, aux, stats)
    for name in names:
        path = f"teachers/{CLIP}/{name}"
        np.testing.assert_array_equal(_raw(added, path), _raw(clip_alone, path), err_msg=path)
    for lv in fresh.levels(CLIP):
        for i in range(len(fresh)):
            np.testing.assert_array_equal(grown.read(CLIP, i, lv), fresh.read(CLIP, i, lv))
        for got, want in zip(grown.stats(CLIP, lv), fresh.stats(CLIP, lv), strict=True):
            np.testing.assert_array_equal(got, want)  # stats merged over the union


def test_the_grown_store_verifies_and_describes_the_union(
    dataset: Path, base: Path, added: Path, tmp_path: Path
) -> None:
    assert verify_store(str(added)) == []
    grown, old = open_store(str(added)), open_store(str(base))
    assert grown.teacher_names == (DINO, CLIP) and grown.complete and grown.done().all()
    for lv in old.levels(DINO):  # the stored teacher's stats are as they were
        for got, want in zip(grown.stats(DINO, lv), old.stats(DINO, lv), strict=True):
            np.testing.assert_array_equal(got, want)
    both = C.extract(dataset, tmp_path / "both.zarr", teachers=(DINO, CLIP))
    assert grown.fingerprint == open_store(str(both)).fingerprint
    assert grown.fingerprint != old.fingerprint


def test_the_grown_store_opens_consolidated_and_with_xarray(added: Path) -> None:
    import xarray as xr

    group = zarr.open_group(str(added), mode="r", use_consolidated=True)
    assert L.consolidated_problem(group) is None  # refreshed for the union
    nodes = group.metadata.consolidated_metadata.flattened_metadata
    assert f"teachers/{CLIP}/s1.00" in nodes and "parts/1/done" in nodes
    tree = xr.open_datatree(str(added), engine="zarr")
    assert {DINO, CLIP} <= set(tree["teachers"].children)


def test_build_store_of_the_grown_schema_gives_the_grown_layout(
    added: Path, tmp_path: Path
) -> None:
    """A skeleton of the header's schema (what repair compares metadata with) has the grown
    store's metadata, file by file: the layout follows from the schema alone."""
    group = L.open_root(str(added))
    meta = L.read_header(group, str(added))
    skeleton = tmp_path / "k.zarr"
    L.build_store(
        zarr.open_group(str(skeleton), mode="w"),
        StoreSchema.from_dict(meta["schema"]),
        L.read_tiles(group),
        meta["fingerprint"],
    )

    def metadata(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob(HEADER)}

    got, want = metadata(skeleton), metadata(added)
    del got[HEADER], want[HEADER]  # the root: header state and consolidated copy
    assert got == want


def test_a_corrupted_chunk_of_the_added_teacher_is_detected(added: Path, tmp_path: Path) -> None:
    from featstore.errors import TileDataError

    store = _copy(added, tmp_path / "s.zarr")
    chunk = store / "teachers" / CLIP / "s1.00_aux" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify_store(str(store))
    named = [p for p in problems if f"teachers/{CLIP}/s1.00_aux tile" in p]
    assert named, problems
    tile = int(named[0].split(" tile ")[1].split()[0])
    assert tile in (3, 4, 5)  # shard 1
    with pytest.raises(TileDataError, match=f"teachers/{CLIP}/s1.00_aux"):
        open_store(str(store)).read(CLIP, tile)
    # what repair rewrites: that shard only (the original shards' provenance is not flagged)
    damaged = damaged_shards(str(store))
    assert list(damaged) == [1] and len(damaged[1]) == 1  # the chunk's own crc32c fails it
    assert damaged[1][0].startswith(f"teachers/{CLIP}/s1.00_aux: ")
    assert damaged_shards(str(added)) == {}


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_repair_of_a_grown_store_rewrites_only_the_damaged_shard(
    dataset: Path, added: Path, tmp_path: Path, damage: str
) -> None:
    """`featcache repair` with the grown store's options (both teachers) re-extracts the one
    damaged shard of the added teacher; the store then equals the uninterrupted addition."""
    from pipelines.repair import repair_store

    store = _copy(added, tmp_path / "s.zarr")
    chunk = store / "teachers" / CLIP / "s1.00_aux" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    if damage == "truncated":
        del data[-7:]
    else:
        data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = repair_store(C.extract_config(dataset, store, teachers=(DINO, CLIP)))
    assert sorted(report.shards) == [1]
    assert C.tree(store) == C.tree(added)
    assert verify_store(str(store)) == []


def test_extract_with_both_teachers_on_the_grown_store_is_a_no_op(
    dataset: Path, added: Path, tmp_path: Path
) -> None:
    store = _copy(added, tmp_path / "s.zarr")
    C.extract(dataset, store, teachers=(DINO, CLIP))
    assert C.tree(store) == C.tree(added)


def test_extract_with_one_of_the_teachers_is_refused_and_names_add(
    dataset: Path, added: Path
) -> None:
    with pytest.raises(FingerprintMismatchError, match="--add") as err:
        C.extract(dataset, added, teachers=(DINO,))
    assert "schema.parts" not in str(err.value)


def test_adding_what_the_store_holds_changes_nothing(
    dataset: Path, added: Path, tmp_path: Path
) -> None:
    store = _copy(added, tmp_path / "s.zarr")
    _add(dataset, store, teachers=(DINO, CLIP))
    assert C.tree(store) == C.tree(added)


def test_adding_levels_to_a_stored_teacher(dataset: Path, base: Path, tmp_path: Path) -> None:
    store = _copy(base, tmp_path / "s.zarr")
    _add(dataset, store, teachers=(DINO,), scales=(1.0, 0.5, 2.0))
    before, after = _sha256s(base), _sha256s(store)
    assert sorted(p for p in before if before[p] != after.get(p)) == [
        f"teachers/{DINO}/{HEADER}",  # the teacher entry now lists the added levels
        HEADER,
    ]
    assert verify_store(str(store)) == []
    fresh = C.extract(dataset, tmp_path / "s2.zarr", scales=(2.0,))
    grown = open_store(str(store))
    assert [lv.key for lv in grown.levels(DINO)] == ["s1.00", "s1.00f", "s0.50", "s0.50f"] + [
        "s2.00",
        "s2.00f",
    ]
    for key in ("s2.00", "s2.00f", "s2.00_aux", "s2.00f_aux"):
        path = f"teachers/{DINO}/{key}"
        np.testing.assert_array_equal(_raw(store, path), _raw(fresh, path), err_msg=path)


def test_adding_a_pca_teacher_fits_its_own_basis(dataset: Path, tmp_path: Path) -> None:
    pca = {"name": "pca", "k": 8}
    store = C.extract(dataset, tmp_path / "s.zarr", codec=pca, scales=(1.0,), flip=False)
    before = _sha256s(store)
    _add(dataset, store, codec=pca, scales=(1.0,), flip=False)
    fresh = C.extract(
        dataset, tmp_path / "c.zarr", teachers=(CLIP,), codec=pca, scales=(1.0,), flip=False
    )
    after = _sha256s(store)
    assert sorted(p for p in before if before[p] != after.get(p)) == [HEADER]
    for key in ("pca_mean", "pca_basis", "s1.00"):
        path = f"teachers/{CLIP}/{key}"
        np.testing.assert_array_equal(_raw(store, path), _raw(fresh, path), err_msg=path)
    assert verify_store(str(store)) == []


# --- refusals --------------------------------------------------------------------------------


def test_a_stored_teacher_with_other_settings_is_refused(dataset: Path, base: Path) -> None:
    before = C.tree(base)
    with pytest.raises(
        AdditionError, match=r"(?s)codec\.name: stored 'int8' != requested 'fp16'.*--overwrite"
    ):
        _add(dataset, base, teachers=(DINO,), codec={"name": "fp16"})
    assert C.tree(base) == before


def test_other_dataset_settings_are_refused_by_field(dataset: Path, base: Path) -> None:
    with pytest.raises(AdditionError, match="tiles_per_shard: stored 3 != requested 4"):
        _add(dataset, base, tiles_per_shard=4)


def test_a_source_with_other_tiles_is_refused(base: Path, tmp_path: Path) -> None:
    from pipelines.synthetic import generate_synthetic

    other = tmp_path / "other"
    generate_synthetic(str(other), n_images=2, size=128, seed=99)
    with pytest.raises(ExtractionError, match="does not match the store's tile records"):
        _add(other, base)


def test_a_source_with_more_tiles_names_limit(dataset: Path, tmp_path: Path) -> None:
    # more tiles are appended (tests/pipelines/test_append.py), but not with a new teacher
    store = C.extract(dataset, tmp_path / "s.zarr", limit=5)
    with pytest.raises(AdditionError, match="append the tiles first .* pass --limit 5"):
        _add(dataset, store)


def test_add_and_overwrite_exclude_each_other(dataset: Path, base: Path) -> None:
    with pytest.raises(ExtractConfigError, match="--add .* --overwrite"):
        _add(dataset, base, overwrite=True)


def test_a_locked_store_is_refused(dataset: Path, base: Path, tmp_path: Path) -> None:
    store = _copy(base, tmp_path / "s.zarr")
    lock.write_lock(str(store), lock.current("another-run"))  # this (live) process holds it
    with pytest.raises(StoreLockedError, match="locked by another writer"):
        _add(dataset, store)
    assert lock.read_lock(str(store)).run_id == "another-run"


# --- kills -----------------------------------------------------------------------------------


def _killed(fault: str, target: object, *args: object) -> None:
    child = multiprocessing.get_context("fork").Process(
        target=_with_fault, args=(fault, target, *args)
    )
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, f"not killed at {fault} ({child.exitcode})"


def _with_fault(fault: str, target: object, *args: object) -> None:
    os.environ[FAULT_ENV] = fault
    target(*args)  # type: ignore[operator]


def test_an_unfinished_store_must_be_finished_first(dataset: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    _killed("write.before_done:2", C.extract, dataset, store)
    with pytest.raises(IncompleteStoreError, match="finish it first"):
        _add(dataset, store)


@pytest.mark.parametrize(
    "fault",
    ["write.before_done:2", "add.before_header:1", "finalize.merge:2"],
    ids=["between-data-and-done", "before-the-header", "during-the-stats-merge"],
)
def test_a_killed_addition_resumes_to_the_same_bytes(
    fault: str, dataset: Path, base: Path, added: Path, tmp_path: Path
) -> None:
    store = _copy(base, tmp_path / "s.zarr")
    _killed(fault, _add, dataset, store)
    assert C.tree(store) != C.tree(added)
    assert lock.read_lock(str(store)) is not None  # the killed run held the writer lock
    if fault.startswith("write."):  # the header is the union's, the new levels not all done
        assert not open_store(str(store)).done().all()
        with pytest.raises(AdditionError, match="unfinished addition"):
            _add(dataset, store, teachers=(DINO,), scales=(2.0,))
    _add(dataset, store)  # the same command again
    assert verify_store(str(store)) == []
    assert C.tree(store) == C.tree(added)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_extract_add(dataset: Path, base: Path, clip_alone: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from featcache.cli import main

    store = _copy(base, tmp_path / "s.zarr")
    args = ["extract", str(dataset), str(store), "--teacher", CLIP, "--tiny", "--add", "-q"]
    args += ["--tile-size", "64", "--base-size", "70", "--tiles-per-shard", "3"]
    args += ["--batch-size", "3", "--scales", "1,0.5", "--codec", "int8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert CLIP in result.output and DINO in result.output
    path = f"teachers/{CLIP}/s0.50f"
    np.testing.assert_array_equal(_raw(store, path), _raw(clip_alone, path))
    info = CliRunner().invoke(main, ["info", str(store)])
    levels = [line for line in info.output.splitlines() if line.startswith("  level ")]
    added = [line for line in levels if "added later (extract --add, part 1)" in line]
    assert len(levels) == 8 and len(added) == 4  # CLIP's 4 levels come after DINOv2's 4
    assert levels[4:] == added


# --- schema ----------------------------------------------------------------------------------


def test_parts_round_trip_and_must_name_levels_of_the_schema(added: Path) -> None:
    from featstore.schema import StorePart

    schema = StoreSchema.from_dict(L.read_header(L.open_root(str(added)), str(added))["schema"])
    assert schema.parts == (
        StorePart("1", tuple((CLIP, k) for k in ("s1.00", "s1.00f", "s0.50", "s0.50f"))),
    )
    assert StoreSchema.from_dict(schema.to_dict()) == schema
    assert schema.up_to_part(0).teacher_names == (DINO,)
    with pytest.raises(ValueError, match="parts name levels the schema lacks"):
        dataclasses.replace(schema, parts=(StorePart("1", ((CLIP, "s3.00"),)),))
    with pytest.raises(ValueError, match="or a level twice"):
        dataclasses.replace(schema, parts=(*schema.parts, StorePart("2", ((CLIP, "s1.00"),))))
