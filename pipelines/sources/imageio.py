"""Reading scene headers and pixel windows from PNG/JPEG (Pillow) and GeoTIFF (rasterio).

Readers return only the part of a window that lies inside the scene; padding is the caller's job
(it differs for images and masks). Pillow scenes are decoded whole and kept in a small LRU cache,
because the tiles of one scene are read one after the other; GeoTIFFs are read window by window.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
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
        nodata: The nodata value a GeoTIFF declares per band (None where none), or None.
    """

    path: Path
    height: int
    width: int
    count: int
    transform: tuple[float, ...] | None = None
    crs: str | None = None
    expand_palette: bool = False
    nodata: tuple[float | None, ...] | None = None

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
        declared = tuple(ds.nodatavals)
        nodata = declared if any(v is not None for v in declared) else None
        return SceneInfo(path, ds.height, ds.width, ds.count, transform, crs, nodata=nodata)


def _corrupt(path: Path, why: object) -> ImageReadError:
    return ImageReadError(
        f"cannot decode image {path}: {why}; the file is truncated or corrupt, "
        "re-download or remove it"
    )


def _check_jpeg_scan(path: Path, data: bytes) -> None:
    """Refuse JPEG data that breaks the format's byte rules.

    Pillow decodes garbled scan data without a word (libjpeg's "corrupt data" warnings are
    dropped). Decoder-independent part of the check: segments follow each other up to the
    end-of-image marker; inside a scan, 0xFF may only be followed by a 0x00 stuffing byte or a
    restart marker RST0-7 (in sequence); a scan ends at a valid marker. Damage that keeps
    this syntax is left to libjpeg (`_check_jpeg_libjpeg`); JPEG has no checksum, so damage
    that leaves the scan's length exactly right stays undetectable.
    """
    buf = np.frombuffer(data, np.uint8)
    pos, after_scan = 2, False  # after SOI
    while pos + 1 < len(buf):
        if buf[pos] != 0xFF:
            raise _corrupt(path, f"JPEG marker expected at byte {pos} (damaged data)")
        marker = int(buf[pos + 1])
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return
        if not _valid_marker(marker, after_scan):
            where = "ending the scan data" if after_scan else "between segments"
            raise _corrupt(
                path,
                f"invalid marker 0xFF 0x{marker:02X} {where} at byte {pos} (damaged "
                "entropy-coded data)",
            )
        end = pos + 2 + (int(buf[pos + 2]) << 8 | int(buf[pos + 3])) if pos + 3 < len(buf) else 0
        if end > len(buf) or end == 0:
            break
        pos, after_scan = end, False
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            pos, after_scan = _scan_end(path, buf, pos), True
    raise _corrupt(path, "JPEG data ends before its end-of-image marker")


def _valid_marker(marker: int, after_scan: bool) -> bool:
    """Whether a marker with a length field may stand here (0x01/RSTn/SOI/EOI excluded)."""
    if marker < 0xC0 or 0xD0 <= marker <= 0xD8:
        return False
    if not after_scan:
        return True
    # After scan data: tables, restart interval, comments, app data, DNL or the next scan.
    return marker in (0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE) or 0xE0 <= marker <= 0xEF


def _scan_end(path: Path, buf: np.ndarray, start: int) -> int:
    """Position of the marker that ends the scan data starting at `start`."""
    ff = np.flatnonzero(buf[start:-1] == 0xFF) + start
    nxt = buf[ff + 1].astype(int)
    inside = (nxt == 0x00) | ((nxt >= 0xD0) & (nxt <= 0xD7))
    stop = int(np.argmin(inside)) if not inside.all() else len(ff)
    rst = nxt[:stop]
    rst = rst[rst != 0x00] - 0xD0
    if not np.array_equal(rst, np.arange(len(rst)) % 8):
        raise _corrupt(path, "JPEG restart markers out of sequence (damaged scan data)")
    return int(ff[stop]) if stop < len(ff) else len(buf)


def _decode_strict(path: Path) -> Image.Image:
    """Open and fully decode `path`, turning every decoder complaint into an error.

    Truncated data raises (LOAD_TRUNCATED_IMAGES must stay off), decoder warnings become
    errors, PNG chunk CRCs are checked by verify(), JPEG data by `_check_jpeg_scan` and
    `_check_jpeg_libjpeg`.
    """
    from PIL import ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageReadError(
            f"cannot decode {path} strictly: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this "
            "process, which accepts truncated images; unset it"
        )
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Large scenes are data, not damage (beyond 2x the limit PIL still raises its error).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as probe_img:
            probe_img.verify()  # PNG: chunk CRCs; must be a separate open (verify() ends it)
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            _check_jpeg_scan(path, data)
            _check_jpeg_libjpeg(path, data)
        img.load()
    return img


def _check_jpeg_libjpeg(path: Path, data: bytes) -> None:
    """Decode once more with libjpeg-turbo (torchvision's decoder), its warnings as errors.

    libjpeg notices damage that keeps the byte syntax valid: scan data that ends before the
    image does ("premature end of data segment") or runs past it ("N extraneous bytes before
    marker"). Pillow's decoder drops these warnings; torchvision's prints them to the C-level
    stderr, which is captured here. A few ms per megapixel.
    """
    decode = _decode_jpeg_tv()
    if decode is None:  # decoder gone from a future torchvision: the syntax check still runs
        return
    import torch

    failure = None
    with _STDERR_LOCK, _stderr_captured() as captured:
        try:
            decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError as exc:
            failure = str(exc).strip().rsplit(", ", 1)[-1]
    notes = [line for line in captured[0].splitlines() if "JPEG" in line]
    others = [line for line in captured[0].splitlines() if "JPEG" not in line]
    if others:  # another thread's output caught in the window: pass it on
        sys.stderr.write("\n".join(others) + "\n")
    if failure or notes:
        raise _corrupt(path, f"libjpeg: {failure or notes[0]}")


@functools.cache
def _decode_jpeg_tv() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in torchvision 0.29, still shipped
            from torchvision.io import decode_jpeg
    except ImportError:
        return None

    def decode(data: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode_jpeg(data)

    return decode


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (C-level stderr) to a temporary file; yield [its text]."""
    sys.stderr.flush()
    saved = os.dup(2)
    box: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode("utf-8", "replace"))


@functools.lru_cache(maxsize=4)
def _decode_pil(path_str: str, mtime_ns: int, size: int, expand_palette: bool) -> np.ndarray:
    """Whole decoded image as [H, W, C] uint8 (read-only; cached by path, mtime and size)."""
    path = Path(path_str)
    try:
        with _decode_strict(path) as img:
            _check_pil_mode(path, img.mode)
            if expand_palette:
                arr = np.asarray(img.convert("RGB"))
            elif img.mode == "1":
                one = img.convert("L")  # 1-bit masks: keep 0/1 values, not 0/255
                arr = np.asarray(one) // 255
            else:
                arr = np.asarray(img)
    except FileNotFoundError:
        raise _missing(path) from None
    except (OSError, SyntaxError, ValueError, Warning, Image.DecompressionBombError) as exc:
        if isinstance(exc, ImageReadError):
            raise
        raise _corrupt(path, exc) from exc
    arr = arr[..., None] if arr.ndim == 2 else arr
    arr.flags.writeable = False  # shared through the cache
    return arr


def _missing(path: Path) -> ImageReadError:
    return ImageReadError(
        f"{path} is gone: it was deleted or moved after the source was opened; restore it and "
        "re-run the same command to resume (or remove it from the dataset and extract into a "
        "new STORE)"
    )


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
    try:
        stat = os.stat(info.path)
    except FileNotFoundError:
        raise _missing(info.path) from None
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


def _band_hint(count: int) -> str:
    """How to map `count` bands to RGB (only selections valid for that many bands)."""
    if count < 3:
        # One real band: replicating it is the only RGB these files give.
        return "pass --bands 1,1,1 (bands=(1,1,1)) to replicate the gray band as RGB"
    return (
        f"pass three of the bands 1..{count} as RGB, e.g. --bands 1,2,3 (bands=(1,2,3)), "
        "in the order red, green, blue"
    )


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
        raise BandError(f"{info.path} is {kind} but RGB is required: {_band_hint(info.count)}")
    bands = tuple(int(b) for b in bands)
    if len(bands) != 3 or not all(1 <= b <= info.count for b in bands):
        raise BandError(
            f"bands={bands} is invalid for {info.path} ({info.count} bands): give three 1-based "
            f"band indices in 1..{info.count}, e.g. bands=(1,2,3) (CLI --bands 1,2,3)"
        )
    return bands
