"""`featcache repair` and stale stores (issue 15).

Every repaired store is compared file by file with an extraction that was never damaged (the
independent reference), and every fault is one injected by hand or by the seeded corruption
suite (bench/corruption.py, which runs >= 50 cases; here a 14-case subset).
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from featcache.cli import main
from featstore import verify_store
from featstore.verify import damaged_shards
from pipelines.repair import RepairError, repair_store

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import corruption as C  # noqa: E402
import kill_extract as K  # noqa: E402

TEACHER = "dinov2_vitb14"
LEVEL = Path("teachers") / TEACHER / "s1.00"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return C.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted extraction (3 shards: tiles 0..2, 3..5, 6..7)."""
    store = C.extract(dataset, tmp_path_factory.mktemp("ref") / "ref.zarr")
    assert verify_store(str(store)) == []
    return store


@pytest.fixture
def damaged(reference: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store.zarr"
    shutil.copytree(reference, store)
    return store


def _cli(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _extract_args(source: Path, store: Path) -> list[str]:
    """The suite's `featcache extract` options (what `repair` must be given too)."""
    return K.cli_args(source, store)[4:]  # SOURCE STORE options, without "python -m ... extract"


def _flip_byte(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


# 2 seeded cases of each of the 7 fault kinds; the script runs >= 50.
SUBSET = [(kind, seed) for seed in (11, 12) for kind in C.FAULTS]


@pytest.mark.parametrize(("kind", "seed"), SUBSET, ids=[f"{k}-{s}" for k, s in SUBSET])
def test_corruption_is_caught_and_repaired_to_the_same_bytes(
    kind: str, seed: int, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    result = C.run_case(kind, seed, dataset, reference, tmp_path)
    assert result.caught, f"verify missed {result.fault}"
    assert result.repaired, f"{result.fault}: {result.detail}"


def test_damaged_shards_names_exactly_the_damaged_shard(damaged: Path) -> None:
    _flip_byte(damaged / LEVEL / "c" / "1" / "0" / "0" / "0", 100)  # shard 1 = tiles 3..5
    assert list(damaged_shards(str(damaged))) == [1]
    assert verify_store(str(damaged))  # the string API still reports it


def test_repair_cli_rewrites_only_the_damaged_shard(
    damaged: Path, dataset: Path, reference: Path
) -> None:
    (damaged / LEVEL / "c" / "2" / "0" / "0" / "0").unlink()  # shard 2 = tiles 6..7
    untouched = (damaged / LEVEL / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns
    res = _cli("repair", *_extract_args(dataset, damaged))
    assert res.exit_code == 0, res.output
    assert "re-extracted shard 2" in res.output and "shard 0" not in res.output
    assert f"OK: {damaged} repaired and verified" in res.output
    assert (damaged / LEVEL / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns == untouched
    assert C.tree(damaged) == C.tree(reference)
    assert _cli("verify", damaged).exit_code == 0


def test_repair_of_a_sound_store_changes_nothing(damaged: Path, dataset: Path) -> None:
    before = C.tree(damaged)
    report = repair_store(C.extract_config(dataset, damaged))
    assert report.metadata == [] and report.shards == {}
    assert C.tree(damaged) == before


def test_rerun_extract_on_a_damaged_complete_store_names_repair(
    damaged: Path, dataset: Path
) -> None:
    _flip_byte(damaged / "pixels" / "image" / "c" / "0" / "0" / "0" / "0", 50)
    res = _cli("extract", *_extract_args(dataset, damaged))
    assert res.exit_code == 1, res.output
    assert "complete but damaged" in res.output and "featcache repair" in res.output
    assert "wrote" not in res.output and "Traceback" not in res.output


def test_a_killed_repair_is_finished_by_extract_or_repair(
    damaged: Path, dataset: Path, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # repair dies after un-committing the shard: the header says incomplete, so a re-run
    # resumes (here: extract) and the store ends as the reference
    import pipelines.repair as R

    (damaged / LEVEL / "c" / "0" / "0" / "0" / "0").unlink()

    def die(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "process_shard", die)
    with pytest.raises(KeyboardInterrupt):
        repair_store(C.extract_config(dataset, damaged))
    assert verify_store(str(damaged))  # left incomplete, and says so
    monkeypatch.undo()
    C.extract(dataset, damaged)
    assert C.tree(damaged) == C.tree(reference)


@pytest.mark.parametrize("field", ["fingerprint", "schema"])
def test_repair_restores_an_edited_header(
    field: str, damaged: Path, dataset: Path, reference: Path
) -> None:
    import json

    meta = json.loads((damaged / "zarr.json").read_text())
    header = meta["attributes"]["featstore"]
    if field == "fingerprint":
        header["fingerprint"] = "0" * 64
    else:
        header["schema"]["tiles_per_shard"] = 4
    (damaged / "zarr.json").write_text(json.dumps(meta))
    assert verify_store(str(damaged))
    report = repair_store(C.extract_config(dataset, damaged))
    assert report.metadata == ["the header (zarr.json attributes)"]
    assert C.tree(damaged) == C.tree(reference)


def test_repair_refuses_other_options_and_names_them(damaged: Path, dataset: Path) -> None:
    before = C.tree(damaged)
    with pytest.raises(RepairError, match=r"schema\.teachers\[0\]\.codec\.name"):
        repair_store(C.extract_config(dataset, damaged, codec={"name": "fp16"}))
    assert C.tree(damaged) == before


def test_repair_refuses_an_unreachable_source(damaged: Path, tmp_path: Path) -> None:
    before = C.tree(damaged)
    res = _cli("repair", *_extract_args(tmp_path / "gone", damaged))
    assert res.exit_code == 1 and "gone" in res.output and "Traceback" not in res.output
    assert C.tree(damaged) == before


# Stale stores: a re-run of extract on an existing store with a changed input is refused,
# naming what differs, and leaves the store as it was.


def _refused(source: Path, store: Path, *extra: str, names: tuple[str, ...]) -> None:
    before = C.tree(store)
    res = _cli("extract", *_extract_args(source, store), *extra)
    assert res.exit_code == 1, res.output
    assert "different fingerprint" in res.output and "Traceback" not in res.output
    for name in names:
        assert name in res.output, res.output
    assert "--overwrite" in res.output
    assert C.tree(store) == before


def _tiny_weights(path: Path, shift: float) -> Path:
    from pipelines.teachers import create_teacher

    state = create_teacher(TEACHER, tiny=True).model.state_dict()
    torch.save({k: v + shift if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


def test_stale_store_changed_weights_file(dataset: Path, tmp_path: Path) -> None:
    weights = _tiny_weights(tmp_path / "w.pth", 0.0)
    store = tmp_path / "w.zarr"
    args = [*_extract_args(dataset, store), "--weights", f"{TEACHER}={weights}"]
    assert _cli("extract", *args).exit_code == 0
    _tiny_weights(weights, 0.01)  # same path, other tensors
    _refused(dataset, store, "--weights", f"{TEACHER}={weights}", names=("weights_sha256",))


def test_stale_store_changed_preprocessing(dataset: Path, reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    # the canvas every tile is rendered to before the teacher (base size 70 -> 84)
    _refused(dataset, store, "--base-size", "84", names=("schema.base_size", "70", "84"))


def test_stale_store_changed_codec(dataset: Path, reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    _refused(dataset, store, "--codec", "fp16", names=("codec.name", "'int8'", "'fp16'"))


@pytest.mark.parametrize("change", ["added", "removed"])
def test_stale_store_changed_tile_list(
    change: str, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    shutil.copytree(dataset, source)
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    images = sorted((source / "images").iterdir())
    masks = sorted((source / "masks").iterdir())
    if change == "added":
        shutil.copy(images[0], images[0].with_name("zz_new" + images[0].suffix))
        shutil.copy(masks[0], masks[0].with_name("zz_new" + masks[0].suffix))
        _refused(source, store, names=("tiles: stored 8 tiles != requested 12",))
    else:
        images[-1].unlink()
        masks[-1].unlink()
        _refused(source, store, names=("tiles: stored 8 tiles != requested 4",))


def test_corruption_table_counts_what_it_ran() -> None:
    rows = [
        C.CaseResult("bit flip", "f", True, True),
        C.CaseResult("bit flip", "g", True, False),
        C.CaseResult("deleted shard", "h", False, True),
    ]
    text = C.table(rows)
    assert "| bit flip | 2 | 2 | 1 |" in text and "| deleted shard | 1 | 0 | 1 |" in text
    assert "| **all** | 3 | 2 | 2 |" in text


def test_faults_are_seeded(reference: Path, tmp_path: Path) -> None:
    # the table is reproducible: one seed damages two copies identically, and damages them
    trees = []
    for name in ("a", "b"):
        store = tmp_path / name
        shutil.copytree(reference, store)
        C.swap(store, random.Random(5))
        trees.append(C.tree(store))
    assert trees[0] == trees[1] != C.tree(reference)


def test_damaged_pca_basis_is_refitted_and_every_shard_rewritten(
    dataset: Path, tmp_path: Path
) -> None:
    pca = {"codec": {"name": "pca", "k": 4}}
    reference = C.extract(dataset, tmp_path / "ref.zarr", **pca)
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    chunk = next(
        p
        for p in (store / "teachers" / TEACHER / "pca_basis").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    _flip_byte(chunk, chunk.stat().st_size // 2)
    assert verify_store(str(store))  # every shard's statistics disagree with its features
    report = repair_store(C.extract_config(dataset, store, **pca))
    assert sorted(report.shards) == [0, 1, 2]
    assert C.tree(store) == C.tree(reference)


def test_repair_keeps_the_recorded_package_version(
    damaged: Path, dataset: Path, reference: Path
) -> None:
    # the header says which release wrote the store; a repair by another release keeps it
    import json

    meta = json.loads((damaged / "zarr.json").read_text())
    meta["attributes"]["featstore"]["package_version"] = "0.0.1"
    (damaged / "zarr.json").write_text(json.dumps(meta, indent=2))
    (damaged / LEVEL / "c" / "1" / "0" / "0" / "0").unlink()
    repair_store(C.extract_config(dataset, damaged))
    header = json.loads((damaged / "zarr.json").read_text())["attributes"]["featstore"]
    assert header["package_version"] == "0.0.1"
    got, want = C.tree(damaged), C.tree(reference)
    assert [k for k in want if got.get(k) != want[k]] == ["zarr.json"]
