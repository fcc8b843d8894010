"""crc32c inside every shard's inner codec chain (issue 16): plain zarr detects a corrupt chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from featstore import layout as L
from featstore import open_store, verify_store
from tests.helpers import DINO, build_store

SHARDED = (f"teachers/{DINO}/s1.00", "pixels/image", "pixels/mask")


def _inner_codecs(group: zarr.Group, path: str) -> list[str]:
    (shard,) = group[path].metadata.to_dict()["codecs"]
    return [c["name"] for c in shard["configuration"]["codecs"]]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(a store as written now, the same extraction written without the chunks' crc32c)."""
    new = build_store(tmp_path_factory.mktemp("new"))
    with pytest.MonkeyPatch.context() as mp:  # the codecs of stores written before issue 16
        mp.setattr(L, "CHUNK_CHECKSUM", ())
        mp.setattr(L, "PIXEL_COMPRESSORS", (ZstdCodec(level=0, checksum=False),))
        old = build_store(tmp_path_factory.mktemp("old"))
    return new, old


def test_every_sharded_array_ends_with_crc32c(stores: tuple[str, str]) -> None:
    new, old = stores
    for path in SHARDED:
        assert _inner_codecs(zarr.open_group(new, mode="r"), path)[-1] == "crc32c", path
        assert "crc32c" not in _inner_codecs(zarr.open_group(old, mode="r"), path), path


def test_values_equal_a_store_without_it_and_old_stores_verify(stores: tuple[str, str]) -> None:
    new, old = open_store(stores[0]), open_store(stores[1])
    for i in range(len(new)):
        np.testing.assert_array_equal(new.read_encoded(DINO, i)[0], old.read_encoded(DINO, i)[0])
        np.testing.assert_array_equal(new.read_image(i), old.read_image(i))
        np.testing.assert_array_equal(new.read_mask(i), old.read_mask(i))
    for pipeline in ("zarr", "zarrs"):  # the batched read pipelines decode the crc32c chain
        if pipeline == "zarrs":
            pytest.importorskip("zarrs")
        got = new.read_batch_encoded(DINO, range(len(new)), pipeline=pipeline)[0]
        want = old.read_batch_encoded(DINO, range(len(old)), pipeline=pipeline)[0]
        np.testing.assert_array_equal(got, want)
    assert verify_store(stores[0]) == [] and verify_store(stores[1]) == []


def test_a_corrupt_chunk_is_caught_by_plain_zarr_and_by_verify(
    stores: tuple[str, str], tmp_path: Path
) -> None:
    import shutil

    store = tmp_path / "store.zarr"
    shutil.copytree(stores[0], store)
    path = f"teachers/{DINO}/s1.00"
    shard = store / path / "c" / "0" / "0" / "0" / "0"  # tiles 0 and 1; chunk 0 first, index last
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01  # one bit of tile 0's tokens
    shard.write_bytes(bytes(data))
    arr = zarr.open_array(store / path, mode="r")
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        arr[0]
    np.testing.assert_array_equal(arr[1], open_store(stores[0]).read_encoded(DINO, 1)[0])
    named = [p for p in verify_store(str(store)) if path in p]
    assert len(named) == 1, named  # tile 0 only: tile 1 of the same shard still reads
    assert named == [f"checksum mismatch in {path} tile 0 (corrupted or lost chunk)"]
