"""Codec round trips (Hypothesis) against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from featstore import CodecError, Float16Codec, Int8Codec, PCACodec, get_codec

FINITE = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
TILES = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=5), elements=FINITE
)


@settings(max_examples=60, deadline=None)
@given(TILES)
def test_fp16_is_exact_half_precision(x: np.ndarray) -> None:
    codec = Float16Codec()
    data, aux = codec.encode(x)
    assert aux is None and data.dtype == np.float16
    np.testing.assert_array_equal(codec.decode(data, aux), x.astype(np.float16).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(TILES)
def test_int8_error_within_half_step_per_channel(x: np.ndarray) -> None:
    codec = Int8Codec()
    data, aux = codec.encode(x)
    assert data.dtype == np.int8 and aux.shape == (x.shape[0], 2, x.shape[-1])
    out = codec.decode(data, aux)
    # Independent step size: per tile, per channel range / 255.
    x64 = x.astype(np.float64)
    step = (x64.max(axis=(1, 2)) - x64.min(axis=(1, 2))) / 255.0
    bound = step[:, None, None, :] / 2 + 1e-6 * (np.abs(x64).max() + 1)
    assert (np.abs(out - x64) <= bound).all()


def test_int8_decodes_single_tile_and_constant_channels() -> None:
    x = np.zeros((1, 3, 3, 2), np.float32)
    x[..., 1] = np.arange(9, dtype=np.float32).reshape(3, 3)
    x[..., 0] = 7.25  # constant channel: exact
    codec = Int8Codec()
    data, aux = codec.encode(x)
    out = codec.decode(data[0], aux[0])
    assert out.shape == (3, 3, 2)
    np.testing.assert_array_equal(out[..., 0], 7.25)
    np.testing.assert_allclose(out[..., 1], x[0, ..., 1], atol=8 / 255 / 2 + 1e-6)


@st.composite
def low_rank(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    m, c = draw(st.integers(8, 40)), draw(st.integers(2, 12))
    k = draw(st.integers(1, c))
    r = draw(st.integers(0, k))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, r)) @ rng.normal(size=(r, c)) + rng.normal(size=c) * 3
    return x.astype(np.float32), k


@settings(max_examples=50, deadline=None)
@given(low_rank())
def test_pca_exact_when_rank_at_most_k(case: tuple[np.ndarray, int]) -> None:
    x, k = case
    codec = PCACodec(k)
    codec.fit(x)
    tiles = x.reshape(1, 1, -1, x.shape[1])
    data, aux = codec.encode(tiles)
    assert data.shape[-1] == k and data.dtype == np.float16 and aux is None
    out = codec.decode(data, aux).reshape(x.shape)
    centred = np.linalg.norm(x - x.mean(axis=0), axis=1)
    # float16 coefficients: relative error 2**-11 of the centred norm, plus float32 slack.
    bound = 2.0**-11 * centred * 1.5 + 1e-4 * (1 + np.abs(x).max())
    assert (np.linalg.norm(out - x, axis=1) <= bound).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_pca_error_matches_independent_svd(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(64, 10)) * np.linspace(3, 0.1, 10)).astype(np.float32)
    codec = PCACodec(k)
    mean, basis = codec.fit(x)
    out = codec.decode(*codec.encode(x[None, None]))[0, 0]
    # Independent: rank-k truncated SVD of the centred data.
    xc = x.astype(np.float64) - x.mean(axis=0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vt[:k] + x.mean(axis=0)
    err, best_err = np.linalg.norm(out - x), np.linalg.norm(best - x)
    assert err <= best_err * 1.01 + 2.0**-11 * np.linalg.norm(xc) * 1.5 + 1e-4
    np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-5)


def test_pca_sign_is_deterministic_and_largest_entry_positive() -> None:
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    _, b1 = PCACodec(3).fit(x)
    _, b2 = PCACodec(3).fit(x[::-1].copy())
    np.testing.assert_allclose(b1, b2, atol=1e-5)
    idx = np.abs(b1).argmax(axis=0)
    assert (b1[idx, np.arange(3)] > 0).all()


def test_registry_and_errors() -> None:
    assert get_codec({"name": "pca", "k": 4}).to_dict() == {"name": "pca", "k": 4}
    assert get_codec("int8").to_dict() == {"name": "int8"}
    with pytest.raises(CodecError, match="unknown codec 'zip'"):
        get_codec({"name": "zip"})
    with pytest.raises(CodecError, match="bad parameters"):
        get_codec({"name": "fp16", "k": 3})
    with pytest.raises(CodecError, match="not fitted"):
        PCACodec(2).encode(np.zeros((1, 2, 2, 4), np.float32))
    with pytest.raises(CodecError, match="float16 range"):
        Float16Codec().encode(np.full((1, 1, 1, 1), 1e6, np.float32))
    with pytest.raises(CodecError, match="NaN"):
        Int8Codec().encode(np.full((1, 1, 1, 1), np.nan, np.float32))
