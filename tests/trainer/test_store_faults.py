"""`featcache train` does not trust the store: each corruption stops the run with the tile named.

A tiny store (6 tiles, 2 per shard: tiles 0-1 labeled, 2-3 unlabeled, 4-5 val) is extracted
once; every test damages a copy of it on disk the way a disk or an operator might, then runs the
real CLI. Without ``--skip-bad-tiles`` the run must stop (exit 1, no traceback) naming the tile,
its shard file and the fix; with it, the bad tile is logged and left out.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from featcache.cli import main
from featstore import open_store
from featstore.errors import TileDataError
from tests.helpers import DINO, build_store, tiny_run_args, write_ids

LEVEL = f"teachers/{DINO}/s1.00"
# tiles_per_shard 2: tile 2 (the first unlabeled tile) is inner chunk 0 of shard file 1
SHARD1 = f"{LEVEL}/c/1/0/0/0"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    assert ids == [f"images/{i:03d}" for i in range(6)]
    return Path(url)


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny store, with its split files."""
    url = tmp_path / "store.zarr"
    shutil.copytree(pristine, url)
    ids = [f"images/{i:03d}" for i in range(6)]
    write_ids(tmp_path / "l.txt", ids[:2])
    write_ids(tmp_path / "u.txt", ids[2:4])
    write_ids(tmp_path / "v.txt", ids[4:])
    return url


def _train(store: Path, *extra: str) -> Result:
    root = store.parent
    args = [
        "train",
        "--store",
        str(store),
        "--teacher",
        DINO,
        *tiny_run_args(root),
        "--iters",
        "2",
        "--eval-interval",
        "100",
        "--out",
        str(root / "run"),
        *extra,
    ]
    res = CliRunner().invoke(main, args)
    print(res.output)  # shown by pytest -s: the messages the RELIABILITY catalogue quotes
    assert "Traceback" not in res.output
    return res


def _stopped(res: Result, tile: str, file: str, store: Path) -> None:
    """Exit 1 through a message (not an exception) naming the tile, its file and the fix."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert re.search(rf"tile '{tile}' \(#\d\) of store '{re.escape(str(store))}'", res.output)
    assert f"shard file {store}/{file}" in res.output
    assert f"featcache verify {store}" in res.output


def _flip(path: Path, offset: int, n: int = 16) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + n] = bytes(b ^ 0xFF for b in raw[offset : offset + n])
    path.write_bytes(bytes(raw))


def _edit_json(path: Path, edit: Any) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_deleted_shard_is_refused_before_training(store: Path) -> None:
    (store / SHARD1).unlink()  # a reader would get the fill value: zeros
    res = _train(store)
    assert res.exit_code == 1, res.output
    assert f"store {store} cannot be trained from:" in res.output
    assert (
        f"shard file {store}/{SHARD1} is missing (tiles ['images/002', 'images/003'])" in res.output
    )
    assert f"featcache verify {store}" in res.output
    assert "--skip-bad-tiles" in res.output


def test_deleted_shard_read_fails_its_checksum(pristine: Path, tmp_path: Path) -> None:
    """Past the open check (e.g. lost mid-run), the read itself refuses the fill value."""
    url = tmp_path / "store.zarr"
    shutil.copytree(pristine, url)
    store = open_store(str(url))
    (url / SHARD1).unlink()
    with pytest.raises(TileDataError) as err:
        store.read_half(DINO, 3)
    assert (err.value.tile_id, err.value.index, err.value.path) == ("images/003", 3, LEVEL)
    assert err.value.file == f"{url}/{SHARD1}"
    assert "does not match the checksum recorded when it was written" in str(err.value)
    # the opt-out reads what zarr returns for a lost shard: the fill value
    assert not open_store(str(url), verify_reads=False).read_half(DINO, 3).any()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_flipped_feature_bytes_stop_the_run(store: Path, workers: str) -> None:
    _flip(store / SHARD1, 64)  # inside inner chunk 0: tile 2
    # workers 2: the error crosses the DataLoader's process boundary; still no traceback
    res = _train(store, "--workers", workers)
    _stopped(res, "images/002", SHARD1, store)


def test_truncated_shard_stops_the_run(store: Path) -> None:
    path = store / SHARD1
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _stopped(_train(store), "images/00[23]", SHARD1, store)


def test_corrupt_mask_stops_the_run(store: Path) -> None:
    # the labeled tiles' masks (shard 0): read by the class check before the first step
    _flip(store / "pixels/mask/c/0/0/0", 0, 64)
    _stopped(_train(store), "images/00[01]", "pixels/mask/c/0/0/0", store)


def test_changed_dtype_is_refused_before_training(store: Path) -> None:
    # float16 bytes read as int16 have the same crc32: the metadata check must see it
    _edit_json(store / LEVEL / "zarr.json", lambda m: m.update(data_type="int16"))
    res = _train(store)
    assert res.exit_code == 1, res.output
    assert f"store {store} cannot be trained from:" in res.output
    assert f"array {LEVEL}: data_type is int16, the store's codec writes float16" in res.output
    assert f"featcache verify {store}" in res.output


def test_zero_std_is_refused_under_standardize(store: Path) -> None:
    def zero_std(meta: dict[str, Any]) -> None:
        entry = meta["attributes"]["featstore"]["stats"][DINO]["s1.00"]
        entry["std"] = [0.0] * len(entry["std"])

    _edit_json(store / "zarr.json", zero_std)
    res = _train(store, "--standardize")
    assert res.exit_code == 1, res.output
    n = len(open_store(str(store)).stats(DINO)[1])
    assert (
        f"store {store}: the statistics of teacher '{DINO}' level s1.00 have 0 non-finite "
        f"mean(s) and {n} std(s) that are 0 or non-finite" in res.output
    )
    assert "or train with --no-standardize" in res.output


def test_skip_bad_tiles_leaves_the_tile_out_and_logs_it(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _flip(store / SHARD1, 64)  # tile 2 only
    with caplog.at_level(logging.WARNING, logger="featcache.train"):
        res = _train(store, "--skip-bad-tiles")
    assert res.exit_code == 0, res.output
    skipped = [r.getMessage() for r in caplog.records if "--skip-bad-tiles" in r.getMessage()]
    assert skipped and all(
        m.startswith("--skip-bad-tiles: leaving out tile 'images/002'") for m in skipped
    )
    assert f"shard file {store}/{SHARD1}" in skipped[0]


def test_skip_bad_tiles_drops_a_val_tile_with_a_corrupt_mask(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _flip(store / "pixels/mask/c/2/0/0", 0, 64)  # tiles 4-5: the val set
    with caplog.at_level(logging.WARNING, logger="featcache.train"):
        res = _train(store, "--skip-bad-tiles")
    assert res.exit_code == 0, res.output
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "leaving out tile 'images/004'" in logged


def test_labeled_split_without_masks_is_refused(tmp_path: Path) -> None:
    from pipelines.synthetic import generate_synthetic

    source = generate_synthetic(tmp_path / "syn", n_images=6, size=64, seed=0)
    shutil.rmtree(Path(source) / "masks")  # images without masks: every tile unlabeled
    url = Path(build_store(tmp_path, source=Path(source)))
    ids = [f"images/{i:03d}" for i in range(6)]
    write_ids(tmp_path / "l.txt", ids[:2])
    write_ids(tmp_path / "u.txt", ids[2:4])
    write_ids(tmp_path / "v.txt", ids[4:])
    res = _train(url)
    assert res.exit_code == 1, res.output
    assert f"labeled={str(tmp_path / 'l.txt')!r}" in res.output
    assert "has 2 tile(s) but none has a mask" in res.output
    assert f"`featcache info {url}` shows" in res.output
