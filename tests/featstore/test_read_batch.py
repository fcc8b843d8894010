"""Batched reads (``FeatureStore.read_batch_half``) against the per-tile ``read_half``.

A tiny 3-codec store of 3 shards (the last one partial) read in random order with duplicates,
through every available pipeline; corrupted tiles must raise the per-tile path's error.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import random_shard, tiny_schema, tiny_tiles

from featstore import PCACodec, TileNotDoneError, create_store, open_store, reader
from featstore.errors import TileDataError

CODECS = {"f": {"name": "fp16"}, "q": {"name": "int8"}, "p": {"name": "pca", "k": 3}}
N, TPS = 11, 4  # shards of 4, 4, 3 tiles
PIPELINES = [
    "zarr",
    pytest.param(
        "zarrs",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("zarrs") is None,
            reason="zarrs not installed (pip install 'featcache[fast]')",
        ),
    ),
]
F_PATH = "teachers/f/s1.00"


def _fill(url: str, n_shards: int | None = None) -> dict[int, dict[str, Any]]:
    """Write the first ``n_shards`` shards (default all); returns what each shard was given."""
    schema = tiny_schema(CODECS, tps=TPS)
    writer = create_store(url, schema, tiny_tiles(N))
    writer.set_pca("p", *PCACodec(3).fit(np.random.default_rng(5).normal(size=(200, 8))))
    written = {}
    for k in range(writer.n_shards if n_shards is None else n_shards):
        written[k] = random_shard(schema, len(writer.shard_tiles(k)), seed=k)
        writer.write_shard(k, **written[k])
    return written


def _indices(seed: int = 0) -> list[int]:
    """Every tile in random order, plus duplicates (one repeated right after itself)."""
    rng = np.random.default_rng(seed)
    idx = [int(i) for i in rng.permutation(N)]
    return idx + [idx[3], idx[3], 0, -1]


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint16)  # bitwise: NaN-safe, -0.0 != 0.0


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_batch_equals_per_tile_reads(store_url: str, pipeline: str) -> None:
    written = _fill(store_url)
    store = open_store(store_url)
    idx = _indices()
    for teacher in CODECS:
        for level in store.levels(teacher):
            got = store.read_batch_half(teacher, idx, level, pipeline=pipeline)
            want = np.stack([store.read_half(teacher, i, level) for i in idx])
            assert got.dtype == np.float16 and got.shape == (len(idx), 4, 4, 8)
            np.testing.assert_array_equal(_bits(got), _bits(want))
    # fp16 rows are the written features rounded to float16 (independent of the reader)
    feats = np.concatenate([written[k]["features"]["f"]["s1.00"] for k in sorted(written)])
    got = store.read_batch_half("f", idx, "s1.00", pipeline=pipeline)
    np.testing.assert_array_equal(_bits(got), _bits(feats[idx].astype(np.float16)))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_per_tile_fallback_equals_per_tile_reads(
    tmp_path: Path, pipeline: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the one-selection read fails, every tile is read on its own (and still checked)."""

    async def fail(*_: Any) -> None:
        raise RuntimeError("batched selection unavailable")

    monkeypatch.setattr(reader, "_read_tiles_at_once", fail)
    url = str(tmp_path / "s.zarr")
    _fill(url)
    store = open_store(url)
    idx = _indices(3)
    for teacher in CODECS:
        got = store.read_batch_half(teacher, idx, "s0.50f", pipeline=pipeline)
        want = np.stack([store.read_half(teacher, i, "s0.50f") for i in idx])
        np.testing.assert_array_equal(_bits(got), _bits(want))
    _flip_chunk_byte(url, 2)
    with pytest.raises(TileDataError, match="tile 't002'.*does not match the checksum"):
        open_store(url).read_batch_half("f", [1, 2, 3], pipeline=pipeline)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_batch_encoded_equals_read_encoded(tmp_path: Path, pipeline: str) -> None:
    _fill(str(tmp_path / "s.zarr"))
    store = open_store(str(tmp_path / "s.zarr"))
    idx = _indices(1)
    data, aux = store.read_batch_encoded("q", idx, "s0.50f", pipeline=pipeline)
    assert data.dtype == np.int8 and aux is not None and aux.shape == (len(idx), 2, 8)
    for k, i in enumerate(idx):
        d, a = store.read_encoded("q", i, "s0.50f")
        np.testing.assert_array_equal(data[k], d)
        np.testing.assert_array_equal(aux[k], a)
    assert store.read_batch_encoded("p", idx, pipeline=pipeline)[1] is None


def test_out_buffer_is_filled_and_checked(tmp_path: Path) -> None:
    _fill(str(tmp_path / "s.zarr"))
    store = open_store(str(tmp_path / "s.zarr"))
    idx = _indices(2)
    buf = np.full((len(idx), 4, 4, 8), np.nan, np.float16)
    for teacher in ("f", "q"):  # read straight into out (fp16), decoded into out (int8)
        got = store.read_batch_half(teacher, idx, out=buf, pipeline="zarr")
        assert got is buf
        want = np.stack([store.read_half(teacher, i) for i in idx])
        np.testing.assert_array_equal(_bits(buf), _bits(want))
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float16 array of shape"):
        store.read_batch_half("f", idx, out=np.empty((len(idx), 4, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"shape \(15, 4, 4, 8\)"):
        store.read_batch_half("f", idx, out=buf[:, ::-1][:-1])


def test_empty_bad_pipeline_and_bad_indices(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    _fill(url, n_shards=2)  # tiles 8..10 are not done
    store = open_store(url)
    assert store.read_batch_half("p", [], pipeline="zarr").shape == (0, 4, 4, 8)
    with pytest.raises(ValueError, match="unknown read pipeline 'rust'; choose one of"):
        store.read_batch_half("f", [0], pipeline="rust")
    with pytest.raises(TileNotDoneError, match="tile 9 .* is not done"):
        store.read_batch_half("f", [0, 9], pipeline="zarr")
    with pytest.raises(IndexError, match="tile 11 out of range"):
        store.read_batch_half("f", [11], pipeline="zarr")


def _flip_chunk_byte(url: str, tile: int) -> None:
    """Flip one byte inside ``tile``'s chunk of the fp16 level, located from the shard index.

    Sharding index (zarr v3 spec): at the end of the shard file, one ``(offset, nbytes)``
    little-endian uint64 pair per inner chunk in C order, then a 4-byte crc32c of the index.
    """
    shard = Path(url) / F_PATH / "c" / str(tile // TPS) / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-(TPS * 16 + 4) : -4]), "<u8").reshape(TPS, 2)
    offset, nbytes = (int(v) for v in index[tile % TPS])
    raw[offset + nbytes // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("crc", ["default", "zlib"])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_corrupted_tile_raises_the_per_tile_error(
    tmp_path: Path, pipeline: str, crc: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if crc == "zlib":  # the fallback without ISA-L: zlib's crc32 on a thread pool
        monkeypatch.setattr(reader, "_crc32", zlib.crc32)
    url = str(tmp_path / "s.zarr")
    _fill(url)
    _flip_chunk_byte(url, 6)
    _flip_chunk_byte(url, 9)
    store = open_store(url)
    for idx, bad in (([1, 9, 2, 6], 9), ([6, 0, 9], 6), ([0, 5, 6, 6], 6)):
        with pytest.raises(TileDataError) as per_tile:
            [store.read_half("f", i) for i in idx]
        with pytest.raises(TileDataError) as batch:
            store.read_batch_half("f", idx, pipeline=pipeline)
        assert batch.value.tile_id == f"t{bad:03d}" and batch.value.path == F_PATH
        assert str(batch.value) == str(per_tile.value)
        assert "does not match the checksum recorded" in str(batch.value)
    good = [0, 1, 2, 3, 4, 5, 7, 8, 10]  # the other tiles still read
    np.testing.assert_array_equal(
        _bits(store.read_batch_half("f", good, pipeline=pipeline)),
        _bits(np.stack([store.read_half("f", i) for i in good])),
    )
    # verification off: zarr-python still checks the chunk's own crc32c (issue 16); zarrs 0.2.3
    # does not (featstore's crc32 table does, when verify_reads is on)
    raw = open_store(url, verify_reads=False)
    with pytest.raises(TileDataError, match="does not match the checksum recorded"):
        raw.read_half("f", 6)
    if pipeline == "zarr":
        with pytest.raises(TileDataError, match="does not match the checksum recorded"):
            raw.read_batch_half("f", [6, 9], pipeline=pipeline)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_truncated_shard_names_a_tile_of_it(tmp_path: Path, pipeline: str) -> None:
    url = str(tmp_path / "s.zarr")
    _fill(url)
    shard = Path(url) / F_PATH / "c" / "1" / "0" / "0" / "0"  # tiles 4..7
    shard.write_bytes(shard.read_bytes()[:100])
    store = open_store(url)
    with pytest.raises(TileDataError) as err:
        store.read_batch_half("f", [0, 5, 4], pipeline=pipeline)
    assert err.value.tile_id == "t005" and err.value.path == F_PATH
    assert str(shard) in str(err.value) and "featcache verify" in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("isal") is None, reason="isal not installed")
def test_fast_crc32_is_zlibs_crc32() -> None:
    """The checksums were recorded with zlib.crc32; ISA-L's must give the same numbers."""
    from isal.isal_zlib import crc32

    assert reader._crc32 is crc32
    rng = np.random.default_rng(7)
    for n in (0, 1, 15, 4096, 2_102_784):
        buf = rng.integers(0, 256, n, dtype=np.uint8)
        assert crc32(buf) == zlib.crc32(buf)
    half = rng.normal(size=(37, 37, 768)).astype(np.float16)  # a tile, as the reader checks it
    assert crc32(half) == zlib.crc32(half)


def _child_read(url: str, pipeline: str | None, queue: Any) -> None:
    try:
        queue.put(open_store(url).read_batch_half("f", [5, 1, 5], pipeline=pipeline))
    except ValueError as err:
        queue.put(str(err))


@pytest.mark.skipif(importlib.util.find_spec("zarrs") is None, reason="zarrs not installed")
def test_forked_child_of_a_zarrs_reader_does_not_hang(tmp_path: Path) -> None:
    """zarrs' thread pool dies with fork(): a child of a zarrs reader reads through zarr."""
    import multiprocessing as mp

    url = str(tmp_path / "s.zarr")
    _fill(url)
    want = np.stack([open_store(url).read_half("f", i) for i in (5, 1, 5)])
    open_store(url).read_batch_half("f", [0], pipeline="zarrs")  # the parent uses zarrs
    ctx = mp.get_context("fork")
    for pipeline in (None, "zarrs"):
        queue = ctx.Queue()
        child = ctx.Process(target=_child_read, args=(url, pipeline, queue))
        child.start()
        child.join(60)
        hung = child.is_alive()
        child.kill()
        assert not hung, f"forked child reading with pipeline={pipeline!r} hung"
        got = queue.get(timeout=5)
        if pipeline is None:
            np.testing.assert_array_equal(_bits(got), _bits(want))
        else:
            assert "start workers with 'spawn' or 'forkserver'" in got
