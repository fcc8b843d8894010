"""Decode encoded teacher grids on the training device, equal to the CPU codecs' ``decode``.

The loader ships the stored bytes (float16, int8 + scales, PCA coefficients); after the batch
is moved, ``decode_on_device`` widens them to float32 there, so the CPU never does. One decoder
per codec class (exact type: a subclass may encode differently, so it must register its own).

Precision: the same float32 operations as the numpy ``decode``, so the results agree to float32
rounding. The PCA back-projection is a float32 matmul and follows torch's global matmul
precision: under ``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA) it is only
~1e-3 relative; the default ("highest") keeps float32.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch

from featstore.codecs import (
    FeatureCodec,
    Float16Codec,
    Int8Codec,
    PCACodec,
    PCAInt8Codec,
)
from featstore.errors import CodecError

DeviceDecoder = Callable[[FeatureCodec, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_DECODERS: dict[type[FeatureCodec], DeviceDecoder] = {}
# codec -> {device: (mean array, basis array, mean tensor, basis.T tensor)}; the arrays are kept
# to notice a codec whose basis was replaced (set_basis) after it was cached.
_BASIS_CACHE: weakref.WeakKeyDictionary[FeatureCodec, dict[torch.device, tuple]] = (
    weakref.WeakKeyDictionary()
)


def register_device_decoder(codec_type: type[FeatureCodec], decoder: DeviceDecoder) -> None:
    """Register the torch decoder of ``codec_type`` (called as ``decoder(codec, data, aux)``)."""
    _DECODERS[codec_type] = decoder


def decode_on_device(
    codec: FeatureCodec, data: torch.Tensor, aux: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode stored ``data [..., g, g, stored]`` (and ``aux``) to float32 on ``data.device``.

    ``data`` and ``aux`` are the tensors of the same tiles as read from the store (any leading
    batch axes), already on the training device.
    """
    decoder = _DECODERS.get(type(codec))
    if decoder is None:
        raise CodecError(
            f"codec {codec.name!r} ({type(codec).__name__}) has no device decoder; register one "
            "with featviews.decode.register_device_decoder"
        )
    if aux is not None and aux.device != data.device:
        raise CodecError(
            f"{codec.name} aux is on {aux.device} but data on {data.device}; move both to the "
            "training device before decoding"
        )
    return decoder(codec, data, aux)


def _fp16(codec: FeatureCodec, data: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    return data.to(torch.float32)


def _dequantise(codec: FeatureCodec, data: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """``q * scale + offset`` per tile and channel, as ``featstore.codecs._dequantise_int8``."""
    if aux is None:
        raise CodecError(f"{codec.name} decode needs the aux (scale, offset) tensor of the tiles")
    aux = aux.to(torch.float32)
    scale = aux[..., 0, :][..., None, None, :]
    offset = aux[..., 1, :][..., None, None, :]
    return data.to(torch.float32) * scale + offset


def _basis(codec: PCACodec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fitted (mean, basis.T) as float32 tensors on ``device``, copied once per device."""
    mean, basis = codec.mean, codec.basis
    if mean is None or basis is None:
        raise CodecError(
            f"{codec.name} codec has no basis: load it from the store (FeatureStore.codec) first"
        )
    per_device = _BASIS_CACHE.setdefault(codec, {})
    hit = per_device.get(device)
    if hit is None or hit[0] is not mean or hit[1] is not basis:
        mean_t = torch.from_numpy(np.ascontiguousarray(mean, np.float32)).to(device)
        basis_t = torch.from_numpy(np.ascontiguousarray(basis.T, np.float32)).to(device)
        hit = per_device[device] = (mean, basis, mean_t, basis_t)
    return hit[2], hit[3]


def _project(codec: PCACodec, coeff: torch.Tensor) -> torch.Tensor:
    mean_t, basis_t = _basis(codec, coeff.device)
    return torch.matmul(coeff, basis_t) + mean_t


def _pca(codec: FeatureCodec, data: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    assert isinstance(codec, PCACodec)  # registered for PCACodec only
    return _project(codec, data.to(torch.float32))


def _pca_int8(codec: FeatureCodec, data: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    assert isinstance(codec, PCAInt8Codec)  # registered for PCAInt8Codec only
    return _project(codec, _dequantise(codec, data, aux))


register_device_decoder(Float16Codec, _fp16)
register_device_decoder(Int8Codec, _dequantise)
register_device_decoder(PCACodec, _pca)
register_device_decoder(PCAInt8Codec, _pca_int8)

__all__ = ["DeviceDecoder", "decode_on_device", "register_device_decoder"]
