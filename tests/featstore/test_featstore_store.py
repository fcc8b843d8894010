"""Store round trips over a local path and memory:// (one suite, parametrized by store_url)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import random_shard, tiny_schema, tiny_tiles

import featstore.layout
from featstore import (
    FingerprintMismatchError,
    IncompleteStoreError,
    PCACodec,
    ShardDataError,
    ShardDoneError,
    StoreWriteError,
    TileNotDoneError,
    create_store,
    open_store,
    verify_store,
)

CODECS = {"f": {"name": "fp16"}, "q": {"name": "int8"}, "p": {"name": "pca", "k": 3}}
N, TPS = 20, 8  # three shards, the last one partial


def _fill(url: str, shards: list[int] | None = None) -> tuple[Any, dict[int, dict[str, Any]]]:
    """Create the 3-codec store and write ``shards`` (default all); returns writer and inputs."""
    schema = tiny_schema(CODECS, tps=TPS)
    writer = create_store(url, schema, tiny_tiles(N))
    if writer.done().sum() == 0 and not np.isfinite(writer._group["teachers/p/pca_mean"][:]).all():
        rng = np.random.default_rng(123)
        writer.set_pca("p", *PCACodec(3).fit(rng.normal(size=(200, 8))))
    written = {}
    for k in range(writer.n_shards) if shards is None else shards:
        written[k] = random_shard(schema, len(writer.shard_tiles(k)), seed=k)
        writer.write_shard(k, **written[k])
    return writer, written


def _expected(store: Any, teacher: str, x: np.ndarray) -> np.ndarray:
    """Independent decode(encode(x)) for the fp16 and PCA teachers."""
    if teacher == "f":
        return x.astype(np.float16).astype(np.float32)
    mean = np.asarray(store._group["teachers/p/pca_mean"][:], np.float64)
    basis = np.asarray(store._group["teachers/p/pca_basis"][:], np.float64)
    coeff = ((x - mean) @ basis).astype(np.float16).astype(np.float64)
    return coeff @ basis.T + mean


def test_round_trip(store_url: str) -> None:
    writer, written = _fill(store_url)
    writer.finalize()
    store = open_store(store_url, require_complete=True)
    assert store.done().all() and store.fingerprint == writer.fingerprint
    assert store.tiles == tiny_tiles(N)
    assert [lv.key for lv in store.levels("q")] == ["s1.00", "s0.50f"]
    for k, data in written.items():
        for j, i in enumerate(range(k * TPS, min((k + 1) * TPS, N))):
            np.testing.assert_array_equal(store.read_image(i), data["images"][j])
            np.testing.assert_array_equal(store.read_mask(i), data["masks"][j])
            for key in ("s1.00", "s0.50f"):
                x = {t: data["features"][t][key][j] for t in CODECS}
                np.testing.assert_array_equal(
                    store.read("f", i, key), _expected(store, "f", x["f"])
                )
                np.testing.assert_allclose(
                    store.read("p", i, key), _expected(store, "p", x["p"]), rtol=1e-5, atol=1e-5
                )
                step = (x["q"].max(axis=(0, 1)) - x["q"].min(axis=(0, 1))) / 255
                assert (np.abs(store.read("q", i, key) - x["q"]) <= step / 2 + 1e-5).all()
    for t in CODECS:  # read_half: the float16 the trainer keeps, no float32 round trip
        half = store.read_half(t, 5, "s0.50f")
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half, store.read(t, 5, "s0.50f").astype(np.float16))
    x5 = written[0]["features"]["f"]["s0.50f"][5]
    np.testing.assert_array_equal(store.read_half("f", 5, "s0.50f"), x5.astype(np.float16))
    many = store.read_many("q", [3, 17, 9], "s0.50f")
    np.testing.assert_array_equal(many[1], store.read("q", 17, "s0.50f"))
    assert verify_store(store_url) == []


def test_done_only_after_write_and_pending(store_url: str) -> None:
    writer, _ = _fill(store_url, shards=[1])
    done = writer.done()
    assert done[8:16].all() and not done[:8].any() and not done[16:].any()
    assert writer.pending_shards() == [0, 2]
    store = open_store(store_url)
    store.read("f", 8)
    with pytest.raises(TileNotDoneError, match="tile 0 .* not done"):
        store.read("f", 0)
    with pytest.raises(IncompleteStoreError, match="not complete"):
        open_store(store_url, require_complete=True)
    with pytest.raises(IncompleteStoreError, match=r"2 shard\(s\) pending"):
        writer.finalize()
    with pytest.raises(IncompleteStoreError, match="not finalized"):
        store.stats("f")


def test_crash_mid_shard_leaves_it_pending(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, _ = _fill(store_url, shards=[])

    def boom(data: np.ndarray) -> np.ndarray:
        raise RuntimeError("simulated crash after the arrays were written")

    monkeypatch.setattr(featstore.layout, "tile_crcs", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        writer.write_shard(0, **random_shard(writer.schema, TPS, seed=0))
    monkeypatch.undo()
    assert writer.pending_shards() == [0, 1, 2]
    writer.write_shard(0, **random_shard(writer.schema, TPS, seed=0))  # the retry succeeds
    assert writer.pending_shards() == [1, 2]


def test_resume_with_same_fingerprint(store_url: str) -> None:
    _fill(store_url, shards=[0])
    writer, _ = _fill(store_url, shards=[])  # reopens: same schema and tiles
    assert writer.pending_shards() == [1, 2]
    with pytest.raises(ShardDoneError, match="shard 0 .* already done"):
        writer.write_shard(0, **random_shard(writer.schema, TPS, seed=0))
    for k in writer.pending_shards():
        writer.write_shard(k, **random_shard(writer.schema, len(writer.shard_tiles(k)), seed=k))
    writer.finalize()
    assert verify_store(store_url) == []


def test_mismatch_raises_unless_overwrite(store_url: str) -> None:
    _fill(store_url, shards=[0])
    with pytest.raises(FingerprintMismatchError, match=r"teachers\[1\]\.codec\.name"):
        create_store(
            store_url, tiny_schema({**CODECS, "q": {"name": "fp16"}}, tps=TPS), tiny_tiles(N)
        )
    with pytest.raises(FingerprintMismatchError, match=r"tiles\[0\]"):
        create_store(store_url, tiny_schema(CODECS, tps=TPS), tiny_tiles(N, salt="new"))
    with pytest.raises(FingerprintMismatchError, match="stored 20 tiles != requested 5"):
        create_store(store_url, tiny_schema(CODECS, tps=TPS), tiny_tiles(5))
    fresh = create_store(store_url, tiny_schema(tps=4), tiny_tiles(6), overwrite=True)
    assert fresh.pending_shards() == [0, 1] and open_store(store_url).teacher_names == ("tiny",)


def test_stats_match_numpy(store_url: str) -> None:
    writer, written = _fill(store_url)
    writer.finalize()
    store = open_store(store_url)
    for teacher in ("f", "p"):
        for key in ("s1.00", "s0.50f"):
            x = np.concatenate([written[k]["features"][teacher][key] for k in sorted(written)])
            dec = _expected(store, teacher, x.astype(np.float64)).reshape(-1, 8)
            mean, std = store.stats(teacher, key)
            np.testing.assert_allclose(mean, dec.mean(axis=0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(std, dec.std(axis=0), rtol=1e-5, atol=1e-6)


def test_xarray_views(store_url: str) -> None:
    writer, _ = _fill(store_url, shards=[0, 2])
    store = open_store(store_url)
    tree = store.to_datatree()
    ds = tree["teachers/q"].to_dataset()
    assert ds["s0.50f"].dims == ("tile", "y_s0.50f", "x_s0.50f", "channel")
    assert list(ds["tile"].values[:2]) == ["t000", "t001"]
    assert ds["done"].values.tolist() == store.done().tolist()
    np.testing.assert_allclose(
        ds["s0.50f"].sel(tile="t017").values, store.read("q", 17, "s0.50f"), rtol=1e-6, atol=1e-6
    )
    p = store.to_dataset("p")["s1.00"].isel(tile=3).values
    np.testing.assert_allclose(p, store.read("p", 3), rtol=1e-6, atol=1e-6)
    assert tree["tiles"]["window"].sel(tile="t005").values.tolist() == [32, 32, 32, 32]
    assert tree["pixels"]["image"].dims == ("tile", "py", "px", "rgb")


def test_write_shard_rejects_bad_input(store_url: str) -> None:
    writer, _ = _fill(store_url, shards=[])
    good = random_shard(writer.schema, TPS, seed=0)
    bad = {t: dict(levels) for t, levels in good["features"].items()}
    bad["f"]["s1.00"] = bad["f"]["s1.00"][:, :3]
    with pytest.raises(ShardDataError, match=r"f/s1.00: expected features of shape \(8, 4, 4, 8\)"):
        writer.write_shard(0, bad, good["images"], good["masks"])
    with pytest.raises(ShardDataError, match="exactly the teachers"):
        writer.write_shard(0, {"f": good["features"]["f"]}, good["images"])
    with pytest.raises(ShardDataError, match="needs images"):
        writer.write_shard(0, good["features"])
    assert writer.pending_shards() == [0, 1, 2]


def test_unwritable_local_path(tmp_path: Any) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(StoreWriteError, match="file.txt"):
        create_store(str(blocker / "store.zarr"), tiny_schema(), tiny_tiles(2))


def test_masks_default_to_ignore_and_no_pixels_store(store_url: str) -> None:
    schema = tiny_schema(tps=4)
    writer = create_store(store_url, schema, tiny_tiles(4))
    data = random_shard(schema, 4, seed=1)
    writer.write_shard(0, data["features"], data["images"])
    assert (open_store(store_url).read_mask(2) == 255).all()
    nopix = tiny_schema(tps=4, store_pixels=False)
    writer = create_store(store_url, nopix, tiny_tiles(4), overwrite=True)
    writer.write_shard(0, data["features"])
    writer.finalize()
    assert verify_store(store_url) == []
