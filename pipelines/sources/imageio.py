"""Reading scene headers and pixel windows from PNG/JPEG (Pillow) and GeoTIFF (rasterio).

Readers return only the part of a window that lies inside the scene; padding is the caller's job
(it differs for images and masks). Pillow scenes are decoded whole and kept in a small LRU cache,
because the tiles of one scene are read one after the other; GeoTIFFs are read window by window.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import BandError, ImageReadError
from .tiling import Window

__all__ = ["SceneInfo", "is_geotiff", "probe", "read_window", "select_bands"]

GEOTIFF_SUFFIXES = (".tif", ".tiff")
# Pillow modes and their channel counts; anything else (16-bit, float) is refused.
_PIL_CHANNELS = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}


@dataclass(frozen=True)
class SceneInfo:
    """Header facts about one raster file.

    Attributes:
        path: The file.
        height: Rows in pixels.
        width: Columns in pixels.
        count: Number of bands (channels).
        transform: Scene affine ``(a, b, c, d, e, f)`` as rasterio's ``Affine`` orders it, or None.
        crs: CRS string (e.g. ``"EPSG:32631"``) or None.
        expand_palette: Decode a palette ("P") image to RGB (images) instead of indices (masks).
    """

    path: Path
    height: int
    width: int
    count: int
    transform: tuple[float, ...] | None = None
    crs: str | None = None
    expand_palette: bool = False

    def window_transform(self, window: Window) -> tuple[float, ...] | None:
        """Affine of a window: the scene affine shifted to the window's top-left pixel."""
        if self.transform is None:
            return None
        a, b, c, d, e, f = self.transform
        row, col = window[0], window[1]
        return (a, b, a * col + b * row + c, d, e, d * col + e * row + f)


def is_geotiff(path: Path) -> bool:
    """Whether ``path`` is read through rasterio (``.tif`` / ``.tiff``)."""
    return path.suffix.lower() in GEOTIFF_SUFFIXES


def _rasterio() -> Any:
    """Import rasterio lazily; it is an optional dependency."""
    try:
        import rasterio
    except ImportError as exc:
        raise ImportError(
            "reading GeoTIFF (.tif) scenes needs rasterio: pip install featcache[geo]"
        ) from exc
    return rasterio


def _open_rasterio(path: Path) -> Any:
    rasterio = _rasterio()
    try:
        with warnings.catch_warnings():
            # Plain (non-georeferenced) TIFFs are fine: they just get transform=None.
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise ImageReadError(
            f"cannot open raster {path}: {exc}; check the file exists and is a valid GeoTIFF"
        ) from exc


def _check_pil_mode(path: Path, mode: str) -> int:
    if mode not in _PIL_CHANNELS:
        raise BandError(
            f"{path}: pixel mode {mode!r} is not 8-bit; convert the file to 8-bit RGB "
            "(or single-channel 8-bit for masks)"
        )
    return _PIL_CHANNELS[mode]


def probe(path: Path, mask: bool = False) -> SceneInfo:
    """Read a raster's header (size, bands, georeference) without decoding pixels.

    Args:
        path: The raster file.
        mask: Whether it is a label mask: palette ("P") PNGs then give their indices, whereas
            palette images are expanded to RGB.

    Raises:
        ImageReadError: Missing or undecodable file.
        BandError: A non 8-bit pixel type.
    """
    if not path.is_file():
        raise ImageReadError(f"file not found: {path}; check the path or re-download the data")
    if is_geotiff(path):
        return _probe_geotiff(path)
    try:
        with Image.open(path) as img:
            count = _check_pil_mode(path, img.mode)
            expand = img.mode == "P" and not mask
            width, height = img.size
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(
            f"cannot read image {path}: {exc}; the file is corrupt or not an image, "
            "re-download or remove it"
        ) from exc
    return SceneInfo(path, height, width, 3 if expand else count, expand_palette=expand)


def _probe_geotiff(path: Path) -> SceneInfo:
    with _open_rasterio(path) as ds:
        if any(dt != "uint8" for dt in ds.dtypes):
            raise BandError(
                f"{path}: bands are {sorted(set(ds.dtypes))}, not uint8; rescale the raster "
                "to 8-bit (e.g. gdal_translate -ot Byte -scale) before caching"
            )
        georef = ds.crs is not None or not ds.transform.is_identity
        transform = tuple(float(v) for v in tuple(ds.transform)[:6]) if georef else None
        crs = ds.crs.to_string() if ds.crs is not None else None
        return SceneInfo(path, ds.height, ds.width, ds.count, transform, crs)


@functools.lru_cache(maxsize=4)
def _decode_pil(path_str: str, mtime_ns: int, size: int, expand_palette: bool) -> np.ndarray:
    """Whole decoded image as [H, W, C] uint8 (read-only; cached by path, mtime and size)."""
    path = Path(path_str)
    try:
        with Image.open(path) as img:
            _check_pil_mode(path, img.mode)
            if expand_palette:
                arr = np.asarray(img.convert("RGB"))
            elif img.mode == "1":
                img = img.convert("L")  # 1-bit masks: keep 0/1 values, not 0/255
                arr = np.asarray(img) // 255
            else:
                arr = np.asarray(img)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(
            f"cannot decode image {path}: {exc}; the file is truncated or corrupt, "
            "re-download or remove it"
        ) from exc
    arr = arr[..., None] if arr.ndim == 2 else arr
    arr.flags.writeable = False  # shared through the cache
    return arr


def _clip(window: Window, height: int, width: int) -> tuple[int, int, int, int]:
    row, col, h, w = window
    return row, col, min(h, height - row), min(w, width - col)


def read_window(info: SceneInfo, window: Window, bands: Sequence[int] | None = None) -> np.ndarray:
    """Pixels of ``window`` that lie inside the scene, as [h', w', C] uint8.

    Args:
        info: Header of the scene (from ``probe``).
        window: ``(row, col, h, w)``; it may run past the right/bottom edge.
        bands: 1-based band indices to read (rasterio convention), or None for all bands.
    """
    row, col, h, w = _clip(window, info.height, info.width)
    if is_geotiff(info.path):
        return _read_geotiff(info, row, col, h, w, bands)
    stat = os.stat(info.path)
    arr = _decode_pil(str(info.path), stat.st_mtime_ns, stat.st_size, info.expand_palette)
    if arr.shape[:2] != (info.height, info.width):
        raise ImageReadError(
            f"{info.path} changed while the source was open "
            f"({info.height}x{info.width} -> {arr.shape[0]}x{arr.shape[1]}); reopen the source"
        )
    out = arr[row : row + h, col : col + w]
    if bands is not None:
        out = out[..., [b - 1 for b in bands]]  # fancy indexing copies
    return np.ascontiguousarray(out) if bands is not None else out.copy()


def _read_geotiff(
    info: SceneInfo, row: int, col: int, h: int, w: int, bands: Sequence[int] | None
) -> np.ndarray:
    rasterio = _rasterio()
    window = rasterio.windows.Window(col, row, w, h)
    indexes = list(bands) if bands is not None else list(range(1, info.count + 1))
    with _open_rasterio(info.path) as ds:
        try:
            data = ds.read(indexes, window=window)
        except rasterio.errors.RasterioIOError as exc:
            raise ImageReadError(
                f"cannot read window {window} of {info.path}: {exc}; the file is truncated "
                "or corrupt, re-download or remove it"
            ) from exc
    return np.ascontiguousarray(np.moveaxis(data, 0, -1))


def select_bands(info: SceneInfo, bands: Sequence[int] | None) -> tuple[int, ...] | None:
    """Check that ``info`` gives RGB with ``bands`` and return the band tuple to read.

    Raises:
        BandError: Not three bands and no valid selection given.
    """
    if bands is None:
        if info.count == 3:
            return None
        kind = {1: "grayscale", 2: "grayscale+alpha", 4: "4-band (e.g. RGBA or RGB+NIR)"}.get(
            info.count, f"{info.count}-band"
        )
        raise BandError(
            f"{info.path} is {kind} but RGB is required: pass bands=(1,2,3) (CLI --bands 1,2,3) "
            "to select three bands"
            + (", or bands=(1,1,1) to replicate gray" if info.count < 3 else "")
        )
    bands = tuple(int(b) for b in bands)
    if len(bands) != 3 or not all(1 <= b <= info.count for b in bands):
        raise BandError(
            f"bands={bands} is invalid for {info.path} ({info.count} bands): give three 1-based "
            f"band indices in 1..{info.count}, e.g. bands=(1,2,3) (CLI --bands 1,2,3)"
        )
    return bands
