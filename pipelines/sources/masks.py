"""Decoding raw mask pixels into stored class ids under a ``Convention``.

Three-channel masks are colour-coded when the convention has a palette. Without one, a mask whose
three channels are equal is a grey index mask saved as RGB (DWL writes LoveDA tiles that way) and
one channel is read; a mask whose channels differ is a colour label map, which cannot be read
without a palette: that is an error naming ``--palette``, never a guess.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .conventions import IGNORE_INDEX, Convention, describe_colour
from .errors import MaskValueError

__all__ = ["decode_mask", "index_plane"]

_UNMAPPED = 254  # internal LUT marker for colours outside the palette


def index_plane(raw: np.ndarray, conv: Convention, path: Path) -> np.ndarray:
    """The single index plane of a mask that the convention reads as index values.

    Raises:
        MaskValueError: A colour (differing channels) or a 2/4-channel mask.
    """
    channels = raw.shape[-1]
    if channels == 1:
        return raw[..., 0]
    if channels == 3 and (raw[..., 0] == raw[..., 1]).all() and (raw[..., 0] == raw[..., 2]).all():
        return raw[..., 0]
    if channels == 3:
        raise MaskValueError(
            f"mask {path} is a colour image (its 3 channels differ) but the {conv.name} layout "
            "reads single-channel class indices; for colour-coded label maps pass --palette FILE "
            "(one line per class: NAME R G B), or convert the masks to 8-bit index PNGs"
        )
    raise MaskValueError(
        f"mask {path} has {channels} channels but the {conv.name} layout expects single-channel "
        "class indices; convert it to an 8-bit index PNG or choose the matching layout"
    )


def _snap_codes(raw: np.ndarray) -> np.ndarray:
    bits = raw >= 128
    code = (bits[..., 0].astype(np.uint32) << 16) | (bits[..., 1].astype(np.uint32) << 8)
    return (code | bits[..., 2].astype(np.uint32)) * 255  # back to the pure colour's code


def _codes(raw: np.ndarray) -> np.ndarray:
    r, g, b = (raw[..., i].astype(np.uint32) for i in range(3))
    return (r << 16) | (g << 8) | b


def _decode_colours(raw: np.ndarray, conv: Convention, path: Path) -> np.ndarray:
    codes = _snap_codes(raw) if conv.snap_colours else _codes(raw)
    keys = np.array([(r << 16) | (g << 8) | b for (r, g, b), _ in conv.palette], np.uint32)
    ids = np.array([k for _, k in conv.palette], np.uint8)
    order = np.argsort(keys)
    keys, ids = keys[order], ids[order]
    pos = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
    found = keys[pos] == codes
    if not found.all():
        bad, counts = np.unique(codes[~found], return_counts=True)
        top = np.argsort(-counts)[:8]
        shown = ", ".join(
            f"{describe_colour((int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255))} ({n} px)"
            for c, n in zip(bad[top], counts[top], strict=True)
        )
        valid = ", ".join(f"{describe_colour(rgb)}={k}" for rgb, k in conv.palette)
        raise MaskValueError(
            f"mask {path} has colours {shown}{' ...' if bad.size > 8 else ''} outside the "
            f"{conv.name} palette ({valid}); check that this is a label image of that dataset"
            + ("" if conv.snap_colours else ", or add the colours to the --palette file")
        )
    return np.ascontiguousarray(ids[pos])


def _out_of_range(plane: np.ndarray, bad: np.ndarray, conv: Convention, k: int, path: Path) -> None:
    values = np.unique(plane[bad])
    shown = ", ".join(str(v) for v in values[:10]) + (" ..." if values.size > 10 else "")
    if conv.reduce_zero_label:
        what, valid, ignored = f"raw {conv.name}", f"0..{k}", "0 and 255 = ignore, v -> id v-1"
    else:
        what, valid, ignored = "label", f"0..{k - 1}", f"{IGNORE_INDEX} = ignore"
    raise MaskValueError(
        f"mask {path} has {what} values [{shown}] outside the valid range {valid} "
        f"({k} classes; {ignored}); fix the mask, give the right --layout, or list all classes "
        "with --classes / classes.txt (colour-coded masks: pass --palette FILE)"
    )


def _decode_index(plane: np.ndarray, conv: Convention, k: int, path: Path) -> np.ndarray:
    ignore = plane == IGNORE_INDEX
    if conv.ignore_value is not None:
        ignore |= plane == conv.ignore_value
    shift = int(conv.reduce_zero_label)
    if shift:
        ignore |= plane == 0
    ids = plane.astype(np.int16) - shift
    bad = ~ignore & (ids >= k)
    if bad.any():
        _out_of_range(plane, bad, conv, k, path)
    return np.where(ignore, IGNORE_INDEX, ids).astype(np.uint8)


def decode_mask(raw: np.ndarray, conv: Convention, num_classes: int, path: Path) -> np.ndarray:
    """Raw mask pixels -> class ids ``0..K-1`` / 255, validated.

    Args:
        raw: [h, w, C] uint8 with C = 1 (indices) or 3 (colour-coded, or grey saved as RGB).
        conv: The dataset convention.
        num_classes: K.
        path: Mask file, for error messages.

    Returns:
        [h, w] uint8, C-contiguous.

    Raises:
        MaskValueError: Values or colours outside the classes, or an unreadable channel layout.
    """
    channels = raw.shape[-1]
    if conv.palette and channels == 3:
        return _decode_colours(raw, conv, path)
    if conv.palette and not conv.index_masks:
        raise MaskValueError(
            f"mask {path} has {channels} channel(s) but --palette describes colour-coded RGB "
            "masks; drop --palette for index masks, or convert the masks to RGB"
        )
    return np.ascontiguousarray(
        _decode_index(index_plane(raw, conv, path), conv, num_classes, path)
    )
