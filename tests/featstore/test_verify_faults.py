"""`featcache verify` catches every edit a reader relies on, names it, and never crashes.

Each test damages a sound store the way an operator (or a disk) might, by editing its files
directly, then runs the real CLI: exit 1, a PROBLEM line naming the field or file, no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import random_shard, tiny_schema, tiny_tiles

from featcache.cli import main
from featstore import create_store

N, TPS = 8, 4
LEVEL = "teachers/f/s1.00"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A finalized local store: fp16 teacher ``f`` and int8 teacher ``q``, two shards."""
    url = tmp_path / "store.zarr"
    schema = tiny_schema({"f": {"name": "fp16"}, "q": {"name": "int8"}}, tps=TPS)
    writer = create_store(str(url), schema, tiny_tiles(N))
    for k in writer.pending_shards():
        writer.write_shard(k, **random_shard(schema, TPS, seed=k))
    writer.finalize()
    assert _verify(url) == (0, [])
    return url


def _verify(url: Path) -> tuple[int, list[str]]:
    res = CliRunner().invoke(main, ["verify", str(url)])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output
    problems = [
        ln[len("PROBLEM: ") :] for ln in res.output.splitlines() if ln.startswith("PROBLEM")
    ]
    print(res.output)  # shown by pytest -s: the messages the RELIABILITY catalogue quotes
    return res.exit_code, problems


def _edit_json(path: Path, edit: Any) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _header(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["attributes"]["featstore"]


def test_edited_header_stats(store: Path) -> None:
    def edit(meta: dict[str, Any]) -> None:
        _header(meta)["stats"]["f"]["s1.00"]["mean"][0] += 0.5

    _edit_json(store / "zarr.json", edit)
    code, problems = _verify(store)
    assert code == 1
    assert problems == [
        "header stats of f/s1.00 differ from the merged per-shard statistics "
        "(teachers/f/s1.00_stats): the header was edited; repair it (`featcache repair SOURCE "
        "STORE` with the options it was extracted with), or re-extract the store "
        "(`featcache extract` into a new store, or with --overwrite)"
    ]


def test_data_type_changed_to_int16(store: Path) -> None:
    # float16 bytes read as int16 keep their crc32: only the metadata check can see this
    _edit_json(store / LEVEL / "zarr.json", lambda m: m.update(data_type="int16"))
    raw = zarr.open_array(str(store / LEVEL), mode="r")[:]
    assert np.abs(raw).max() > 1000  # what a reader would get: values of order 3e4
    code, problems = _verify(store)
    assert code == 1
    assert any(
        p.startswith(f"array {LEVEL}: data_type is int16, the store's codec writes float16")
        for p in problems
    )


def test_edited_fill_value(store: Path) -> None:
    _edit_json(store / LEVEL / "zarr.json", lambda m: m.update(fill_value=1.0))
    code, problems = _verify(store)
    assert code == 1
    assert any(
        p.startswith(f"array {LEVEL}: fill_value is 1.0, the store writes 0") for p in problems
    )


def test_edited_teacher_group_attrs(store: Path) -> None:
    def edit(meta: dict[str, Any]) -> None:
        meta["attributes"]["teacher"]["spec"]["stride"] = 14

    _edit_json(store / "teachers/f/zarr.json", edit)
    code, problems = _verify(store)
    assert code == 1
    assert any(
        p.startswith("attrs of teachers/f: spec.stride is 14 there but 7 in the header schema")
        for p in problems
    )


def test_edited_level_attrs(store: Path) -> None:
    def edit(meta: dict[str, Any]) -> None:
        meta["attributes"]["level"]["scale"] = 2.0

    _edit_json(store / LEVEL / "zarr.json", edit)
    code, problems = _verify(store)
    assert code == 1
    assert any(p.startswith(f"attrs of {LEVEL}: scale is 2.0 there but 1.0") for p in problems)


def test_per_shard_stats_values_changed(store: Path) -> None:
    arr = zarr.open_array(str(store / f"{LEVEL}_stats"), mode="r+")
    row = arr[1]
    row[1, 0] += 3.0  # the sum of channel 0 over shard 1
    arr[1] = row
    code, problems = _verify(store)
    assert code == 1
    assert problems[0].startswith(
        f"per-shard statistics {LEVEL}_stats[1] do not match the features of f/s1.00 tiles 4..7"
    )


def test_per_shard_stats_chunk_garbled(store: Path) -> None:
    chunk = store / f"{LEVEL}_stats" / "c" / "1" / "0" / "0"
    chunk.write_bytes(b"\x00garbage" * 8)
    code, problems = _verify(store)
    assert code == 1
    assert any(p.startswith(f"cannot read {LEVEL}_stats: ") for p in problems)


def test_deleted_level_directory(store: Path) -> None:
    shutil.rmtree(store / LEVEL)
    code, problems = _verify(store)
    assert code == 1
    assert any(
        p.startswith(f"array {LEVEL} is missing (its directory was deleted)") for p in problems
    )


def test_corrupted_tile_id_chunk(store: Path) -> None:
    chunk = store / "tiles" / "tile_id" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7] + b"\xff" * 9)
    code, problems = _verify(store)
    assert code == 1
    assert any(p.startswith("tile index array tiles/tile_id is unreadable") for p in problems)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s["class_names"].__setitem__(0, "water"), "schema.class_names"),
        (
            lambda s: s["teachers"][1]["spec"].update(weights="other.pth"),
            "schema.teachers[1].spec.weights",
        ),
    ],
    ids=["class_names", "weights"],
)
def test_fingerprint_mismatch_names_the_field(store: Path, edit: Any, field: str) -> None:
    _edit_json(store / "zarr.json", lambda m: edit(_header(m)["schema"]))
    code, problems = _verify(store)
    assert code == 1
    # exactly that field is named (the fingerprint hashes every field of the header schema)
    assert any(p.startswith(f"fingerprint mismatch: {field} differ(s) from") for p in problems)


def test_old_store_without_field_hashes_still_reports_the_mismatch(store: Path) -> None:
    def edit(meta: dict[str, Any]) -> None:
        del _header(meta)["fingerprint_parts"]  # as written before the per-field hashes
        _header(meta)["schema"]["class_names"][0] = "water"

    _edit_json(store / "zarr.json", edit)
    code, problems = _verify(store)
    assert code == 1
    assert problems == [
        "fingerprint mismatch: the recorded fingerprint does not match the schema and tile "
        "index stored in the store (edited or corrupted header/index)"
    ]


def test_edited_checksum_columns(store: Path) -> None:
    def edit(meta: dict[str, Any]) -> None:
        cols = meta["attributes"]["arrays"]
        cols[0], cols[1] = cols[1], cols[0]

    _edit_json(store / "checksum" / "zarr.json", edit)
    code, problems = _verify(store)
    assert code == 1
    assert problems[0].startswith("attrs of checksum: the columns are ['teachers/f/s0.50f',")


def test_edited_label_counts(tmp_path: Path) -> None:
    """label_stats (shown by `info`) are checked against a hand count of the stored masks."""
    url = tmp_path / "store.zarr"
    masks = np.full((TPS, 32, 32), 255, np.uint8)
    masks[0, :2, :3] = 1  # 6 pixels of class 1 in tile 0; the other tiles unlabeled
    stats = {
        "class_pixels": [0, 6],
        "ignore_pixels": 1018,
        "labeled_tiles": 1,
        "unlabeled_tiles": TPS - 1,
    }
    schema = dataclasses.replace(tiny_schema(tps=TPS), label_stats=stats)
    writer = create_store(str(url), schema, tiny_tiles(TPS))
    writer.write_shard(0, **{**random_shard(schema, TPS, seed=0), "masks": masks})
    writer.finalize()
    assert _verify(url) == (0, [])

    def edit(meta: dict[str, Any]) -> None:
        _header(meta)["schema"]["label_stats"]["class_pixels"] = [6, 0]

    _edit_json(url / "zarr.json", edit)
    code, problems = _verify(url)
    assert code == 1
    assert problems[0].startswith(
        "header schema.label_stats.class_pixels [6, 0] differ from the stored masks' counts [0, 6]"
    )
