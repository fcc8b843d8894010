"""pca-int8: PCA-k coefficients as per-tile, per-coefficient affine int8.

Every bound is checked against float64 numpy written out here (projection, per-tile coefficient
range / 255, rank-k SVD), never against the codec's own output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import tiny_schema, tiny_tiles
from hypothesis import given, settings
from hypothesis import strategies as st

from featcache.cli import main
from featstore import create_store, get_codec, open_store, verify_store
from featstore.codecs import PCAInt8Codec
from pipelines.config import ExtractConfig, ExtractConfigError, parse_codec
from pipelines.synthetic import generate_synthetic


@st.composite
def near_low_rank(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """Tiles ``[n, g, g, C]`` of rank <= k around a mean, plus (maybe) small noise; and k."""
    n, g, c = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 10))
    k = draw(st.integers(1, c))
    r = draw(st.integers(0, k))
    noise = draw(st.sampled_from([0.0, 1e-3, 1e-2]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    m = n * g * g
    x = rng.normal(size=(m, r)) @ rng.normal(size=(r, c)) * 4 + rng.normal(size=c) * 3
    x = x + noise * rng.normal(size=(m, c))
    return x.reshape(n, g, g, c).astype(np.float32), k


def _coefficients(x: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Exact float64 projection of ``x`` on the basis."""
    return (x.astype(np.float64) - mean.astype(np.float64)) @ basis.astype(np.float64)


def _steps(coeff: np.ndarray) -> np.ndarray:
    """Per tile, per coefficient int8 step: ``(max - min) / 255`` over the tile's tokens."""
    return (coeff.max(axis=(1, 2)) - coeff.min(axis=(1, 2))) / 255.0


@settings(max_examples=40, deadline=None)
@given(near_low_rank())
def test_each_coefficient_within_half_an_int8_step(case: tuple[np.ndarray, int]) -> None:
    x, k = case
    codec = PCAInt8Codec(k)
    mean, basis = codec.fit(x.reshape(-1, x.shape[-1]))
    q, aux = codec.encode(x)
    assert q.dtype == np.int8 and q.shape == (*x.shape[:-1], k)
    assert aux.dtype == np.float32 and aux.shape == (x.shape[0], 2, k)
    coeff = _coefficients(x, mean, basis)
    step = _steps(coeff)
    slack = 1e-5 * (1 + np.abs(coeff).max())  # the codec projects in float32
    np.testing.assert_allclose(aux[:, 0], step, rtol=1e-4, atol=slack / 255)
    dequant = q.astype(np.float64) * aux[:, None, None, 0] + aux[:, None, None, 1]
    assert (np.abs(dequant - coeff) <= step[:, None, None, :] / 2 + slack).all()


@settings(max_examples=40, deadline=None)
@given(near_low_rank())
def test_decode_within_documented_bound(case: tuple[np.ndarray, int]) -> None:
    x, k = case
    codec = PCAInt8Codec(k)
    mean, basis = codec.fit(x.reshape(-1, x.shape[-1]))
    out = codec.decode(*codec.encode(x))
    assert out.dtype == np.float32 and out.shape == x.shape
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=1e-5)  # the bound needs it
    coeff = _coefficients(x, mean, basis)
    truncation = np.linalg.norm(x64 - mean - coeff @ basis.T.astype(np.float64), axis=-1)
    quant = np.linalg.norm(_steps(coeff), axis=-1)[:, None, None] / 2
    slack = 1e-5 * (1 + np.abs(x64).max())
    err = np.linalg.norm(out - x64, axis=-1)
    assert (err <= truncation + quant + slack).all()
    # The fitted subspace is the optimal one: overall truncation equals a rank-k SVD's.
    flat = x64.reshape(-1, x.shape[-1])
    centred = flat - flat.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    best = float(np.sqrt(np.square(s[k:]).sum()))
    assert np.linalg.norm(truncation) <= best * 1.01 + slack


def test_hand_built_tile_quantises_as_written() -> None:
    mean = np.array([1.0, 2.0, 3.0], np.float32)
    basis = np.eye(3, 2, dtype=np.float32)  # keeps channels 0 and 1; channel 2 is truncated
    codec = PCAInt8Codec(2, mean, basis)
    x = np.zeros((1, 1, 3, 3), np.float32)
    x[0, 0, :, 0] = 1.0 + np.array([0.0, 51.0, 255.0])  # coefficient 0: 0, 51, 255 -> scale 1
    x[0, 0, :, 1] = 2.0 + 5.0  # coefficient 1 constant 5: scale 0, offset 5
    x[0, 0, :, 2] = 3.5  # off the basis: decodes to the mean, 3
    q, aux = codec.encode(x)
    np.testing.assert_array_equal(q[0, 0, :, 0], [-128, -77, 127])
    np.testing.assert_array_equal(q[0, 0, :, 1], [-128, -128, -128])
    np.testing.assert_array_equal(aux[0], [[1.0, 0.0], [128.0, 5.0]])
    out = codec.decode(q, aux)
    np.testing.assert_array_equal(out[0, 0, :, :2], x[0, 0, :, :2])
    np.testing.assert_array_equal(out[0, 0, :, 2], 3.0)
    assert codec.to_dict() == {"name": "pca-int8", "k": 2}
    assert get_codec({"name": "pca-int8", "k": 2}).aux_shape(3) == (2, 2)


def test_errors_name_the_fix() -> None:
    with pytest.raises(Exception, match="not fitted"):
        PCAInt8Codec(2).encode(np.zeros((1, 2, 2, 4), np.float32))
    codec = PCAInt8Codec(2, np.zeros(3), np.eye(3, 2))
    with pytest.raises(Exception, match="aux"):
        codec.decode(np.zeros((1, 1, 1, 2), np.int8), None)
    with pytest.raises(Exception, match="lower k"):
        PCAInt8Codec(5).aux_shape(3)


def test_store_round_trip_through_writer_and_reader(tmp_path: Path) -> None:
    codecs = {"p": {"name": "pca-int8", "k": 3}}
    schema = tiny_schema(codecs, tps=4)
    url = str(tmp_path / "s.zarr")
    writer = create_store(url, schema, tiny_tiles(6))
    rng = np.random.default_rng(5)
    # Features of rank 3 around a mean: only the int8 step is lost.
    low = rng.normal(size=(6, 2, 4, 4, 3)) @ rng.normal(size=(3, 8)) + rng.normal(size=8)
    low = low.astype(np.float32)
    mean, basis = PCAInt8Codec(3).fit(low.reshape(-1, 8))
    writer.set_pca("p", mean, basis)
    for k in range(writer.n_shards):
        r = writer.shard_tiles(k)
        feats = {"p": {"s1.00": low[r, 0], "s0.50f": low[r, 1]}}
        images = rng.integers(0, 256, size=(len(r), 32, 32, 3), dtype=np.uint8)
        masks = rng.integers(0, 2, size=(len(r), 32, 32), dtype=np.uint8)
        writer.write_shard(k, feats, images=images, masks=masks)
    writer.finalize()
    assert verify_store(url) == []
    store = open_store(url, require_complete=True)
    group = zarr.open_group(url, mode="r")
    assert group["teachers/p/s1.00"].dtype == np.int8
    assert group["teachers/p/s1.00_aux"].shape == (6, 2, 3)
    np.testing.assert_array_equal(group["teachers/p/pca_basis"][:], basis)
    for i in range(6):
        for j, key in enumerate(("s1.00", "s0.50f")):
            x = low[i, j]
            coeff = _coefficients(x[None], mean, basis)
            bound = np.linalg.norm(_steps(coeff)) / 2 + 1e-4 * (1 + np.abs(x).max())
            err = np.linalg.norm(store.read("p", i, key) - x, axis=-1)
            assert (err <= bound).all()
            assert err.max() > 0  # it is lossy: the bound is not vacuous
    lazy = store.to_dataset("p")["s0.50f"]  # the dask path decodes with the same arithmetic
    np.testing.assert_allclose(lazy[4].values, store.read("p", 4, "s0.50f"), atol=1e-5)


def test_codec_option_and_config() -> None:
    assert parse_codec("pca-int8:64") == {"name": "pca-int8", "k": 64}
    assert parse_codec("pca-int8:k=64") == {"name": "pca-int8", "k": 64}
    assert parse_codec("pca:k=8") == {"name": "pca", "k": 8}
    cfg = ExtractConfig(source="s", out="o", codec=parse_codec("pca-int8:16")).validate()
    assert cfg.codec == {"name": "pca-int8", "k": 16}
    for bad in ("pca-int8", "pca-int8:0", "pca-int8:k=x", "pca-int8:j=4"):
        with pytest.raises(ExtractConfigError, match=r"--codec .*pca-int8:K.*e\.g\. pca-int8:64"):
            parse_codec(bad)
    with pytest.raises(ExtractConfigError, match="pca-int8 needs a positive k"):
        ExtractConfig(source="s", out="o", codec={"name": "pca-int8"}).validate()


def test_extract_cli_fits_and_stores_pca_int8(tmp_path: Path) -> None:
    source = generate_synthetic(tmp_path / "synth", n_images=1, size=128, seed=3)
    out = tmp_path / "p.zarr"
    args = ["extract", str(source), str(out), "--teacher", "dinov2_vitb14", "--tiny"]
    args += ["--tile-size", "64", "--base-size", "70", "--scales", "1", "--no-flip"]
    args += ["--tiles-per-shard", "2", "--limit", "2", "--codec", "pca-int8:k=4", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert verify_store(out) == []
    group = zarr.open_group(out, mode="r")
    t = "teachers/dinov2_vitb14"
    mean, basis = group[f"{t}/pca_mean"][:], group[f"{t}/pca_basis"][:]
    np.testing.assert_allclose(basis.T @ basis, np.eye(4), atol=1e-5)  # fitted, not NaN
    q, aux = group[f"{t}/s1.00"][:], group[f"{t}/s1.00_aux"][:]
    assert q.dtype == np.int8 and q.shape[-1] == 4 and aux.shape == (2, 2, 4)
    # Independent decode of the raw arrays, written out.
    coeff = q.astype(np.float64) * aux[:, None, None, 0] + aux[:, None, None, 1]
    want = coeff @ basis.T.astype(np.float64) + mean
    np.testing.assert_allclose(open_store(out).read("dinov2_vitb14", 1), want[1], atol=1e-4)
