"""View bank format: schema/fingerprint, write/read round trips, resume, verify, storage size."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BASE, C, T, random_shard, tiny_schema, tiny_tiles

from featstore import (
    BankSpec,
    FingerprintMismatchError,
    ShardDataError,
    ShardDoneError,
    StoreFormatError,
    StoreSchema,
    TileNotDoneError,
    add_bank,
    create_store,
    fingerprint,
    open_store,
    verify_store,
)
from featstore.bank import BankWriter, bank_path

K, G = 3, 4  # crop = BASE = 28 px, stride 7 -> 4x4 teacher tokens per view


def bank_schema(codec: str = "fp16", k: int = K, seed: int = 0, tps: int = 4) -> StoreSchema:
    spec = BankSpec(k=k, seed=seed, crop=BASE)
    return dataclasses.replace(tiny_schema({"tiny": {"name": codec}}, tps=tps), bank=spec)


def valid_params(n: int, k: int, seed: int) -> np.ndarray:
    """Hand-drawn params inside the rule: S in [16, 64], offsets in [0, max(S, 28) - 28]."""
    rng = np.random.default_rng(seed)
    size = rng.integers(T // 2, 2 * T + 1, size=(n, k))
    span = np.maximum(size, BASE) - BASE
    oy = (rng.random((n, k)) * (span + 1)).astype(int)
    ox = span - oy
    flip = rng.integers(0, 2, size=(n, k))
    return np.stack([size, oy, ox, flip], -1).astype(np.int32)


def bank_data(n: int, k: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed + 100)
    feats = rng.normal(size=(n, k, G, G, C)).astype(np.float32) * 2 - 1
    return valid_params(n, k, seed), {"tiny": feats}


def write_levels(url: str, schema: StoreSchema, n: int) -> None:
    writer = create_store(url, schema, tiny_tiles(n))
    for s in writer.pending_shards():
        writer.write_shard(s, **random_shard(schema, len(writer.shard_tiles(s)), s))
    writer.finalize()


def write_bank(url: str, n: int, shards: list[int] | None = None, finalize: bool = True) -> dict:
    writer = BankWriter.open(url)
    written: dict[int, Any] = {}
    for s in writer.pending_shards() if shards is None else shards:
        r = writer.shard_tiles(s)
        params, feats = bank_data(len(r), writer.k, s)
        writer.write_bank_shard(s, params, feats)
        written[s] = (r, params, feats)
    if finalize:
        writer.finalize()
    return written


def test_bank_schema_round_trip_and_fingerprint() -> None:
    tiles = tiny_tiles(6)
    plain = tiny_schema()
    assert "bank" not in plain.to_dict()  # bank-less fingerprints are unchanged by the feature
    schema = bank_schema()
    assert StoreSchema.from_dict(schema.to_dict()) == schema
    fps = {fingerprint(s, tiles) for s in (plain, schema, bank_schema(k=4), bank_schema(seed=1))}
    assert len(fps) == 4
    with pytest.raises(ValueError, match="not teachers"):
        dataclasses.replace(plain, bank=BankSpec(k=2, teachers=("nope",)))
    with pytest.raises(ValueError, match="scale_range"):
        BankSpec(k=2, scale_range=(2.0, 1.0))


def test_bank_round_trip_and_verify(store_url: str) -> None:
    schema = bank_schema()
    write_levels(store_url, schema, 6)
    written = write_bank(store_url, 6)
    store = open_store(store_url)
    assert store.has_bank and store.bank.complete and store.bank.done().all()
    assert store.bank.grid("tiny") == G
    for r, params, feats in written.values():
        for row, i in enumerate(r):
            np.testing.assert_array_equal(store.bank.params(i), params[row])
            want = feats["tiny"][row].astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(store.bank.read_views("tiny", i), want)
            np.testing.assert_array_equal(store.bank.read("tiny", i, 2), want[2])
    assert verify_store(store_url) == []


def test_int8_bank_has_per_view_aux(tmp_path: Any) -> None:
    url = str(tmp_path / "s.zarr")
    write_levels(url, bank_schema("int8"), 5)
    written = write_bank(url, 5)
    store = open_store(url)
    r, _, feats = written[1]
    x = feats["tiny"][0]
    got = store.bank.read_views("tiny", r.start)
    scale = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))) / 255  # per view and channel
    assert (np.abs(got - x) <= scale[:, None, None, :] / 2 + 1e-5).all()
    assert verify_store(url) == []


def test_resume_and_incomplete_bank(tmp_path: Any) -> None:
    url = str(tmp_path / "s.zarr")
    write_levels(url, bank_schema(), 10)  # shards of 4, 4, 2
    write_bank(url, 10, shards=[1], finalize=False)
    store = open_store(url)
    assert store.bank.done().tolist() == [False] * 4 + [True] * 4 + [False] * 2
    with pytest.raises(TileNotDoneError, match="resume"):
        store.bank.read("tiny", 0, 0)
    problems = " ".join(verify_store(url))
    assert "not complete" in problems and "6 tile(s) have no view bank" in problems
    writer = BankWriter.open(url)
    assert writer.pending_shards() == [0, 2]
    with pytest.raises(ShardDoneError):
        writer.write_bank_shard(1, *bank_data(4, K, 1))
    write_bank(url, 10)
    assert verify_store(url) == []


def test_verify_catches_corrupted_bank(tmp_path: Any) -> None:
    url = str(tmp_path / "s.zarr")
    write_levels(url, bank_schema(), 4)
    write_bank(url, 4)
    path = Path(url, "teachers", "tiny", "bank", "c", "0", "0", "0", "0", "0")
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_store(url)
    assert any("checksum mismatch in teachers/tiny/bank tile" in p for p in problems), problems
    os.remove(path)
    assert any("missing shard file teachers/tiny/bank" in p for p in verify_store(url))


def test_write_rejects_bad_params_and_shapes(tmp_path: Any) -> None:
    url = str(tmp_path / "s.zarr")
    write_levels(url, bank_schema(), 4)
    writer = BankWriter.open(url)
    params, feats = bank_data(4, K, 0)
    bad = params.copy()
    bad[0, 0, 0] = 2 * T + 1  # S above int(2.0 * T)
    with pytest.raises(ShardDataError, match="view sizes outside"):
        writer.write_bank_shard(0, bad, feats)
    bad = params.copy()
    bad[0, 0, 1] = max(int(bad[0, 0, 0]), BASE) - BASE + 1
    with pytest.raises(ShardDataError, match="offsets"):
        writer.write_bank_shard(0, bad, feats)
    with pytest.raises(ShardDataError, match="expected features"):
        writer.write_bank_shard(0, params, {"tiny": feats["tiny"][:, :, :3]})
    assert not writer.done().any()


def test_add_bank_to_finished_store(tmp_path: Any) -> None:
    url = str(tmp_path / "s.zarr")
    plain = tiny_schema(tps=4)
    write_levels(url, plain, 6)
    before = open_store(url)
    level = before.read("tiny", 3)
    with pytest.raises(StoreFormatError, match="no view bank"):
        _ = before.bank
    spec = BankSpec(k=K, crop=BASE)
    add_bank(url, spec)
    write_bank(url, 6)
    store = open_store(url)
    assert store.schema.bank == spec
    assert store.fingerprint == fingerprint(dataclasses.replace(plain, bank=spec), tiny_tiles(6))
    assert store.fingerprint != before.fingerprint
    np.testing.assert_array_equal(store.read("tiny", 3), level)
    assert verify_store(url) == []
    # re-running the bank-less extraction reopens the store instead of refusing it
    assert create_store(url, plain, tiny_tiles(6)).pending_shards() == []
    with pytest.raises(FingerprintMismatchError, match="schema.bank.k"):
        add_bank(url, BankSpec(k=K + 1, crop=BASE))
    add_bank(url, BankSpec(k=K + 1, crop=BASE), overwrite=True)
    assert open_store(url).bank.k == K + 1 and not open_store(url).bank.done().any()


def test_storage_per_tile_is_k_grids(tmp_path: Any) -> None:
    url = str(tmp_path / "s.zarr")
    n, tps = 8, 4
    write_levels(url, bank_schema(tps=tps), n)
    write_bank(url, n)
    store = open_store(url)
    grid_bytes = G * G * C * 2 + 4  # float16, then the chunk's crc32c (issue 16)
    assert store.bank.nbytes_per_tile("tiny") == K * grid_bytes
    root = os.path.join(url, bank_path("tiny"), "c")
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    index = (n // tps) * (tps * K * 16 + 4)  # sharding index: 16 bytes per inner chunk + crc32c
    assert disk == n * store.bank.nbytes_per_tile("tiny") + index
