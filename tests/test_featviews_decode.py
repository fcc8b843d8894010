"""Device decode (featviews.decode) equals the CPU codecs' decode, for every registered codec."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from featstore.codecs import CODECS, FeatureCodec, Float16Codec, PCACodec, get_codec
from featstore.errors import CodecError
from featviews.decode import decode_on_device

C = 12
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Built-in codecs with their parameters; a codec registered without an entry here fails below.
PARAMS: dict[str, dict[str, Any]] = {
    "fp16": {},
    "int8": {},
    "pca": {"k": 5},
    "pca-int8": {"k": 5},
}
BUILTIN = sorted(PARAMS)


def _features(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(*shape, C)) * np.linspace(4, 0.1, C) + 2).astype(np.float32)


def _codec(name: str) -> FeatureCodec:
    codec = get_codec({"name": name, **PARAMS[name]})
    if codec.needs_fit:
        assert isinstance(codec, PCACodec)
        codec.fit(_features(99, (64,)))
    return codec


def test_every_registered_codec_is_tested_here() -> None:
    # A codec added to featstore's registry needs a device decoder and a PARAMS entry here.
    assert set(CODECS) == set(PARAMS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("shape", [(3, 4, 4), (2, 3, 2, 5, 5)], ids=["tiles", "batch-of-tiles"])
def test_device_decode_equals_cpu_decode(name: str, device: str, shape: tuple[int, ...]) -> None:
    codec = _codec(name)
    x = _features(len(shape), shape)
    data, aux = codec.encode(x)
    want = np.asarray(codec.decode(data, aux), np.float32)
    aux_t = None if aux is None else torch.from_numpy(aux).to(device)
    got = decode_on_device(codec, torch.from_numpy(data).to(device), aux_t)
    assert got.dtype == torch.float32 and got.device.type == device
    assert tuple(got.shape) == want.shape
    span = float(want.max() - want.min())
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=1e-5 * span)
    if isinstance(codec, Float16Codec):  # a cast: exact
        np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_basis_is_cached_per_device_and_refreshed_when_replaced(device: str) -> None:
    codec = _codec("pca-int8")
    x = _features(7, (2, 3, 3))
    data, aux = codec.encode(x)
    data_t, aux_t = torch.from_numpy(data).to(device), torch.from_numpy(aux).to(device)
    first = decode_on_device(codec, data_t, aux_t)
    assert torch.equal(decode_on_device(codec, data_t, aux_t), first)
    # A new basis (a sign flip of every direction) must be used, not the cached tensors.
    assert codec.mean is not None and codec.basis is not None
    codec.set_basis(codec.mean, -codec.basis)
    want = np.asarray(codec.decode(data, aux), np.float32)
    got = decode_on_device(codec, data_t, aux_t).cpu().numpy()
    span = float(want.max() - want.min())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * span)
    assert np.abs(got - first.cpu().numpy()).max() > 0.1 * span


def test_errors_say_what_to_do() -> None:
    class Custom(Float16Codec):
        name = "custom"

    with pytest.raises(CodecError, match="'custom'.*register_device_decoder"):
        decode_on_device(Custom(), torch.zeros(1, 1, 1, 2, dtype=torch.float16))
    with pytest.raises(CodecError, match="int8 decode needs the aux"):
        decode_on_device(get_codec("int8"), torch.zeros(1, 1, 1, 2, dtype=torch.int8), None)
    with pytest.raises(CodecError, match="no basis.*FeatureStore.codec"):
        decode_on_device(get_codec({"name": "pca", "k": 2}), torch.zeros(1, 1, 1, 2))
