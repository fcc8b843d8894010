"""verify_store finds damaged, missing, unfinished and tampered stores (local and memory://)."""

from __future__ import annotations

import fsspec
import numpy as np
import zarr
from conftest import random_shard, tiny_schema, tiny_tiles

from featstore import create_store, verify_store
from featstore.layout import store_fs

N, TPS = 12, 4


def _complete_store(url: str) -> None:
    schema = tiny_schema({"f": {"name": "fp16"}, "q": {"name": "int8"}}, tps=TPS)
    writer = create_store(url, schema, tiny_tiles(N))
    for k in writer.pending_shards():
        writer.write_shard(k, **random_shard(schema, TPS, seed=k))
    writer.finalize()
    assert verify_store(url) == []


def _shard_file(
    url: str, array: str, k: int, ndim: int = 4
) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = store_fs(url)
    return fs, f"{root.rstrip('/')}/{array}/c/{k}" + "/0" * (ndim - 1)


def test_flipped_bytes_in_a_shard_are_reported(store_url: str) -> None:
    _complete_store(store_url)
    fs, path = _shard_file(store_url, "teachers/f/s1.00", 1)
    raw = bytearray(fs.cat_file(path))
    raw[10:14] = bytes(b ^ 0xFF for b in raw[10:14])  # inside the first inner chunk (tile 4)
    fs.pipe_file(path, bytes(raw))
    problems = verify_store(store_url)
    assert problems[0] == "checksum mismatch in teachers/f/s1.00 tile 4 (corrupted or lost chunk)"
    # Only that tile's crc breaks; a decode check may add a note about the same shard.
    assert all("tile 4" in p or "tiles 4..7" in p for p in problems)


def test_deleted_shard_file_is_reported(store_url: str) -> None:
    _complete_store(store_url)
    fs, path = _shard_file(store_url, "teachers/q/s0.50f_aux", 2, ndim=3)
    fs.rm(path)
    problems = verify_store(store_url)
    assert any(
        p.startswith("missing shard file teachers/q/s0.50f_aux/c/2/0/0 (tiles 8..11)")
        for p in problems
    )
    assert any("checksum mismatch in teachers/q/s0.50f_aux tile 8" in p for p in problems)


def test_unfinished_store_lists_undone_tiles(store_url: str) -> None:
    schema = tiny_schema(tps=TPS)
    writer = create_store(store_url, schema, tiny_tiles(N))
    writer.write_shard(1, **random_shard(schema, TPS, seed=1))
    problems = verify_store(store_url)
    assert "store is not complete: finalize() was never called" in problems
    assert (
        "8 tile(s) not done, e.g. ['t000', 't001', 't002', 't003', 't008', 't009', "
        "'t010', 't011']" in problems
    )


def test_tampered_tile_index_breaks_the_fingerprint(store_url: str) -> None:
    _complete_store(store_url)
    group = zarr.open_group(store_url if "://" in store_url else store_url, mode="r+")
    hashes = group["tiles/pixel_hash"]
    hashes[3] = "forged"
    problems = verify_store(store_url)
    assert len(problems) == 1 and problems[0].startswith("fingerprint mismatch")


def test_not_a_store() -> None:
    url = f"memory://featstore-empty-{np.random.default_rng().integers(1 << 30)}"
    assert verify_store(url)[0].startswith(f"cannot open {url!r} as a feature store")


def test_unlabeled_shards_whose_masks_are_all_ignore_verify_clean(store_url: str) -> None:
    # Zarr drops shards that hold only the fill value; verify must not call that a loss, but a
    # deleted shard of real data must still be reported.
    schema = tiny_schema(tps=TPS)
    writer = create_store(store_url, schema, tiny_tiles(N))
    for k in writer.pending_shards():
        shard = random_shard(schema, TPS, seed=k)
        if k == 0:
            shard["masks"] = None  # unlabeled: stored as ignore_index everywhere
        writer.write_shard(k, **shard)
    writer.finalize()
    assert verify_store(store_url) == []
    fs, path = _shard_file(store_url, "pixels/mask", 1, ndim=3)
    fs.rm(path)
    problems = verify_store(store_url)
    assert any(p.startswith("missing shard file pixels/mask/c/1/0/0") for p in problems)
