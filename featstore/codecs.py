"""Feature codecs: how float32 teacher tokens are stored, with a documented tolerance each.

Every codec maps float32 ``[..., g, g, C]`` to ``(data, aux)`` and back. ``decode`` uses plain
array arithmetic only, so it also runs lazily on dask arrays (the xarray view relies on this).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from featstore.errors import CodecError

FP16_MAX = float(np.finfo(np.float16).max)
# Names (inside the teacher's group) of a PCA codec's fitted arrays; layout.pca_paths uses them.
PCA_MEAN, PCA_BASIS = "pca_mean", "pca_basis"


class FeatureCodec:
    """Base class: subclasses set ``name``, ``stored_dtype`` and implement encode/decode."""

    name: ClassVar[str] = ""
    stored_dtype: ClassVar[str] = "float16"
    tolerance: ClassVar[str] = ""
    # The decode recipe written into the store's attrs (``decode_attrs``).
    formula: ClassVar[str] = ""
    numpy_expr: ClassVar[str] = ""
    # The one integer parameter the option form ``NAME:N`` sets (``pca:64`` -> k=64); None when
    # the codec is named bare. The CLI reads it from here, so new codecs need no CLI change.
    cli_param: ClassVar[str | None] = None

    def stored_channels(self, channels: int) -> int:
        """Channels of the stored array for a teacher with ``channels`` output channels."""
        return channels

    def aux_shape(self, channels: int) -> tuple[int, ...] | None:
        """Per-tile side-data shape (without the tile axis), or None when there is none."""
        return None

    @property
    def needs_fit(self) -> bool:
        """Whether the codec needs dataset statistics (``fit``) before it can encode."""
        return False

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode float32 ``[..., g, g, C]`` features into stored data and aux arrays."""
        raise NotImplementedError

    def decode(self, data: Any, aux: Any = None) -> Any:
        """Decode stored data (numpy or dask) back to float32 ``[..., g, g, C]``."""
        raise NotImplementedError

    def decode_half(self, data: Any, aux: Any = None) -> Any:
        """Decode to float16 (what the trainer keeps in host memory)."""
        return self.decode(data, aux).astype(np.float16)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters (no fitted data) that ``get_codec`` accepts."""
        return {"name": self.name}

    def decode_attrs(self, data: str, aux: str | None = None) -> dict[str, Any]:
        """Store attrs that let a reader without featstore decode array ``data``.

        ``arrays`` maps each name of ``formula``/``numpy`` to an array of the same zarr group;
        ``numpy`` is that formula as a numpy expression over those arrays with the tile axis
        first (what a store published without our code is read with).
        """
        arrays = {"data": data}
        if aux is not None:
            arrays["aux"] = aux
        return {
            "codec": self.to_dict(),
            "stored_dtype": self.stored_dtype,
            "formula": self.formula,
            "numpy": self.numpy_expr,
            "arrays": arrays,
            "tolerance": self.tolerance,
        }


# Human and numpy forms of the int8 affine map; aux is [tile, (scale, offset), channel].
_INT8_FORMULA = (
    "data * scale + offset (data: the int8 q as stored), with scale = aux[tile, 0, c] and "
    "offset = aux[tile, 1, c] for each channel c, the same for every token (y, x) of the tile"
)
_INT8_NUMPY = "(data.astype('float32') * aux[..., 0, None, None, :] + aux[..., 1, None, None, :])"


def _check_input(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 3:
        raise CodecError(f"codec input must be [..., g, g, C], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise CodecError("features contain NaN or inf; fix the teacher output before storing it")
    return x


def _to_fp16(x: np.ndarray, what: str) -> np.ndarray:
    if x.size and float(np.abs(x).max()) > FP16_MAX:
        raise CodecError(
            f"{what} exceed the float16 range (|x| > {FP16_MAX:g}); use codec 'int8' or rescale"
        )
    return x.astype(np.float16)


def _quantise_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per tile (axes -3, -2), per channel affine int8 of finite float32 ``x``; (q, aux)."""
    lo = x.min(axis=(-3, -2))
    hi = x.max(axis=(-3, -2))
    scale = ((hi.astype(np.float64) - lo) / 255.0).astype(np.float32)
    # float64 steps: 1/scale overflows float32 for subnormal scales. A constant channel has
    # scale 0: every q is -128 and the offset alone restores it.
    s64 = scale.astype(np.float64)
    inv = np.divide(1.0, s64, out=np.zeros_like(s64), where=s64 > 0)
    steps = np.rint((x - lo[..., None, None, :].astype(np.float64)) * inv[..., None, None, :])
    q = (np.clip(steps, 0, 255) - 128).astype(np.int8)
    offset = (lo + 128.0 * scale).astype(np.float32)
    return q, np.stack([scale, offset], axis=-2)


def _dequantise_int8(data: Any, aux: Any, codec: str) -> Any:
    """``q * scale + offset`` with (scale, offset) from ``aux [..., 2, C]`` (numpy or dask)."""
    if aux is None:
        raise CodecError(f"{codec} decode needs the aux (scale, offset) array of the same tiles")
    scale = aux[..., 0, :][..., None, None, :]
    offset = aux[..., 1, :][..., None, None, :]
    return data.astype(np.float32) * scale + offset


class Float16Codec(FeatureCodec):
    """IEEE half precision; decode(encode(x)) == x.astype(float16).astype(float32) exactly."""

    name = "fp16"
    tolerance = "round-to-nearest float16: |err| <= 2**-11 * |x| for normal values"
    formula = "value = data (IEEE float16 as stored; cast to float32 if wanted)"
    numpy_expr = "data.astype('float32')"

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Cast to float16 (raises CodecError on overflow)."""
        return _to_fp16(_check_input(x), "features"), None

    def decode(self, data: Any, aux: Any = None) -> Any:
        """Cast back to float32."""
        return data.astype(np.float32)

    def decode_half(self, data: Any, aux: Any = None) -> Any:
        """The stored array itself: no float32 round trip (the same values, exactly)."""
        return data.astype(np.float16, copy=False)


class Int8Codec(FeatureCodec):
    """Per-tile, per-channel affine int8: ``x ~= q * scale + offset``, q in [-128, 127].

    aux is float32 ``[..., 2, C]`` holding (scale, offset) of each channel of the tile, where
    ``scale = (max - min) / 255`` over the tile's ``g x g`` tokens.
    """

    name = "int8"
    stored_dtype = "int8"
    tolerance = "|err| <= scale / 2 per channel (plus float32 rounding), scale = range / 255"
    formula = "value = " + _INT8_FORMULA
    numpy_expr = _INT8_NUMPY

    def aux_shape(self, channels: int) -> tuple[int, ...] | None:
        """(scale, offset) per channel."""
        return (2, channels)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Quantise each tile's channels onto 256 levels between their min and max."""
        return _quantise_int8(_check_input(x))

    def decode(self, data: Any, aux: Any = None) -> Any:
        """Apply the stored affine map."""
        return _dequantise_int8(data, aux, self.name)


class PCACodec(FeatureCodec):
    """Projection onto the top-``k`` principal directions; coefficients stored as float16.

    ``decode = coeff @ basis.T + mean``. Exact (to float16 coefficient precision,
    ``||err|| <= 2**-11 * ||x - mean||``) when the data span at most ``k`` directions; otherwise
    the error is the rank-k PCA truncation error plus that rounding.
    """

    name = "pca"
    tolerance = "rank-k truncation error + 2**-11 * ||x - mean|| (float16 coefficients)"
    cli_param = "k"
    formula = (
        "value = data @ basis.T + mean: data holds float16 coefficients [tile, y, x, component], "
        "basis is [channel, component] (orthonormal columns), mean is [channel]"
    )
    numpy_expr = "data.astype('float32') @ basis.T + mean"

    def __init__(
        self, k: int = 64, mean: np.ndarray | None = None, basis: np.ndarray | None = None
    ) -> None:
        if int(k) != k or k < 1:
            raise CodecError(f"pca codec needs an integer k >= 1, got k={k!r}")
        self.k = int(k)
        self.mean: np.ndarray | None = None
        self.basis: np.ndarray | None = None
        if mean is not None or basis is not None:
            if mean is None or basis is None:
                raise CodecError("pca codec needs both mean and basis, or neither")
            self.set_basis(mean, basis)

    @property
    def needs_fit(self) -> bool:
        """Always True: the basis comes from data."""
        return True

    def stored_channels(self, channels: int) -> int:
        """k coefficients per token."""
        if self.k > channels:
            raise CodecError(f"pca k={self.k} exceeds the teacher's {channels} channels; lower k")
        return self.k

    def set_basis(self, mean: np.ndarray, basis: np.ndarray) -> None:
        """Install a fitted ``mean [C]`` and orthonormal ``basis [C, k]``."""
        mean = np.asarray(mean, dtype=np.float32)
        basis = np.asarray(basis, dtype=np.float32)
        if mean.ndim != 1 or basis.shape != (mean.shape[0], self.k):
            raise CodecError(
                f"pca expects mean [C] and basis [C, {self.k}], got {mean.shape} and {basis.shape}"
            )
        if not (np.isfinite(mean).all() and np.isfinite(basis).all()):
            raise CodecError("pca mean/basis contain NaN: the basis was never fitted (set_pca)")
        self.mean, self.basis = mean, basis

    def fit(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fit mean and basis on ``samples [m, C]`` (k <= C); returns and installs them.

        Uses an eigendecomposition of the float64 covariance (cheap for m >> C). Each basis
        vector's sign is fixed so that its largest-magnitude entry is positive (deterministic).
        """
        x = np.asarray(samples, dtype=np.float64).reshape(-1, np.shape(samples)[-1])
        m, c = x.shape
        if m < 1 or c < self.k:
            raise CodecError(
                f"pca fit needs >= 1 sample and >= k={self.k} channels, got [{m}, {c}]"
            )
        mean = x.mean(axis=0)
        centred = x - mean
        _, vecs = np.linalg.eigh(centred.T @ centred)
        basis = vecs[:, ::-1][:, : self.k]  # eigh sorts ascending
        idx = np.abs(basis).argmax(axis=0)
        basis = basis * np.sign(basis[idx, np.arange(self.k)])
        self.set_basis(mean, basis)
        return self._fitted()

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.basis is None:
            raise CodecError("pca codec is not fitted: call fit(samples) or set_basis(mean, basis)")
        return self.mean, self.basis

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Project centred features on the basis; float16 coefficients."""
        mean, basis = self._fitted()
        x = _check_input(x)
        if x.shape[-1] != mean.shape[0]:
            raise CodecError(f"pca basis has {mean.shape[0]} channels, features {x.shape[-1]}")
        return _to_fp16((x - mean) @ basis, "pca coefficients"), None

    def decode(self, data: Any, aux: Any = None) -> Any:
        """Back-project the coefficients."""
        mean, basis = self._fitted()
        return data.astype(np.float32) @ basis.T + mean

    def to_dict(self) -> dict[str, Any]:
        """Name and k (the fitted basis lives in the store arrays, not here)."""
        return {"name": self.name, "k": self.k}

    def decode_attrs(self, data: str, aux: str | None = None) -> dict[str, Any]:
        """As for every codec, plus the arrays holding the fitted mean and basis."""
        out = super().decode_attrs(data, aux)
        out["arrays"].update(mean=PCA_MEAN, basis=PCA_BASIS)
        return out


class PCAInt8Codec(PCACodec):
    """PCA-k coefficients quantised per tile and per coefficient to affine int8.

    ``coeff = (x - mean) @ basis`` as for ``pca`` (same fitted mean/basis, stored in the same
    arrays), then ``coeff ~= q * scale + offset`` as ``int8`` does per channel: aux is float32
    ``[..., 2, k]`` with ``scale = (max - min) / 255`` of each coefficient over the tile's tokens.
    ``decode = (q * scale + offset) @ basis.T + mean``.

    Tolerance: each coefficient is off by at most ``scale_j / 2``; the basis is orthonormal, so
    per token ``||err|| <= ||scale||_2 / 2`` on top of the rank-k truncation error (zero when
    the data span at most ``k`` directions around the mean), plus float32 rounding. Per channel
    c, ``|err_c| <= sum_j |basis[c, j]| * scale_j / 2`` (+ truncation). Bytes: k per token plus
    8k per tile, against 2C per token for fp16.
    """

    name = "pca-int8"
    stored_dtype = "int8"
    tolerance = (
        "rank-k truncation error + ||scale||_2 / 2 per token (int8 step per coefficient, "
        "scale = per-tile coefficient range / 255) + float32 rounding"
    )

    formula = (
        "value = coeff @ basis.T + mean, with coeff = "
        + _INT8_FORMULA.replace("channel c", "component c")
        + "; basis is [channel, component], mean is [channel]"
    )
    numpy_expr = _INT8_NUMPY + " @ basis.T + mean"

    def aux_shape(self, channels: int) -> tuple[int, ...] | None:
        """(scale, offset) per coefficient."""
        return (2, self.stored_channels(channels))

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Project on the basis, then quantise each tile's coefficients to int8."""
        mean, basis = self._fitted()
        x = _check_input(x)
        if x.shape[-1] != mean.shape[0]:
            raise CodecError(f"pca basis has {mean.shape[0]} channels, features {x.shape[-1]}")
        coeff = (x - mean) @ basis
        if not np.isfinite(coeff).all():
            raise CodecError("pca-int8 coefficients overflow float32; rescale the features")
        return _quantise_int8(coeff)

    def decode(self, data: Any, aux: Any = None) -> Any:
        """Dequantise the coefficients, then back-project them."""
        mean, basis = self._fitted()
        return _dequantise_int8(data, aux, self.name) @ basis.T + mean


CODECS: dict[str, Callable[..., FeatureCodec]] = {}


def register_codec(name: str, factory: Callable[..., FeatureCodec]) -> None:
    """Register a codec factory under ``name`` (called with the dict's other keys)."""
    CODECS[name] = factory


def get_codec(spec: dict[str, Any] | str | FeatureCodec) -> FeatureCodec:
    """Build a codec from ``{"name": ..., **params}`` (or a bare name)."""
    if isinstance(spec, FeatureCodec):
        return spec
    params = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = params.pop("name", None)
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    try:
        return CODECS[name](**params)
    except TypeError as err:
        raise CodecError(f"bad parameters {params} for codec {name!r}: {err}") from err


register_codec("fp16", Float16Codec)
register_codec("int8", Int8Codec)
register_codec("pca", PCACodec)
register_codec("pca-int8", PCAInt8Codec)

__all__ = [
    "CODECS",
    "FeatureCodec",
    "Float16Codec",
    "Int8Codec",
    "PCACodec",
    "PCAInt8Codec",
    "get_codec",
    "register_codec",
]
