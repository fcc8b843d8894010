"""Dataset conventions: class names, mask encodings, edge rules and padding labels.

Class orders and colour maps follow RS-MTDF / DWL (see docs/design rs-mtdf-reference §1).
Masks come out as class indices ``0..K-1`` with ``IGNORE_INDEX`` (255) for ignored pixels.

Colour-coded masks (ISPRS Potsdam, DeepGlobe) are decoded by thresholding each channel at 128,
which snaps slightly off colours (JPEG or resampling noise) to the nearest pure colour; a pure
colour outside the dataset's palette is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import MaskValueError

__all__ = [
    "CONVENTIONS",
    "DEEPGLOBE",
    "GENERIC",
    "IGNORE_INDEX",
    "LOVEDA",
    "POTSDAM",
    "Convention",
    "decode_mask",
]

IGNORE_INDEX = 255
_UNMAPPED = 254  # internal LUT marker for colours outside the palette

# Pure colours are coded r*4 + g*2 + b after thresholding.
_COLOUR_NAMES = ("black", "blue", "green", "cyan", "red", "magenta", "yellow", "white")


@dataclass(frozen=True)
class Convention:
    """How one dataset encodes its labels and cuts its scenes.

    Attributes:
        name: Dataset name recorded in the store.
        class_names: Class names in label order (empty: decided at open time).
        edge_rule: Default tiling edge rule (see ``tiling``).
        pad_label: Mask value of padded pixels under the ``"pad"`` rule.
        raw_offset: Subtracted from single-channel raw labels, wrapping below zero
            (LoveDA: 1, so raw 0 = no-data becomes 255).
        palette: For colour-coded masks, ``(colour name, class index)`` pairs; a colour mapped
            to ``IGNORE_INDEX`` is ignored.
    """

    name: str
    class_names: tuple[str, ...]
    edge_rule: str = "pad"
    pad_label: int = IGNORE_INDEX
    raw_offset: int = 0
    palette: tuple[tuple[str, int], ...] = ()

    def with_classes(self, class_names: tuple[str, ...], name: str | None = None) -> Convention:
        """Copy with class names (and optionally the dataset name) filled in."""
        return replace(self, class_names=class_names, name=name or self.name)


LOVEDA = Convention(
    "loveda",
    ("background", "building", "road", "water", "barren", "forest", "agriculture"),
    edge_rule="exact",
    raw_offset=1,
)
POTSDAM = Convention(
    "potsdam",
    ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"),
    edge_rule="overlap_last",
    pad_label=5,  # DWL paints Potsdam padding red = clutter
    # black marks eroded boundaries in ISPRS' "noBoundary" labels: ignore them
    palette=(
        ("white", 0),
        ("blue", 1),
        ("cyan", 2),
        ("green", 3),
        ("yellow", 4),
        ("red", 5),
        ("black", IGNORE_INDEX),
    ),
)
DEEPGLOBE = Convention(
    "deepglobe",
    (
        "urban_land",
        "agriculture_land",
        "rangeland",
        "forest_land",
        "water",
        "barren_land",
        "unknown",
    ),
    edge_rule="pad",
    pad_label=6,  # DWL's zero padding becomes 6 = unknown
    palette=(
        ("cyan", 0),
        ("yellow", 1),
        ("magenta", 2),
        ("green", 3),
        ("blue", 4),
        ("white", 5),
        ("black", 6),
    ),
)
GENERIC = Convention("folder", ())
CONVENTIONS = {c.name: c for c in (LOVEDA, POTSDAM, DEEPGLOBE, GENERIC)}


def _palette_lut(palette: tuple[tuple[str, int], ...]) -> np.ndarray:
    lut = np.full(8, _UNMAPPED, np.uint8)
    for colour, index in palette:
        lut[_COLOUR_NAMES.index(colour)] = index
    return lut


def _decode_colours(raw: np.ndarray, conv: Convention, path: Path) -> np.ndarray:
    bits = raw >= 128
    code = (bits[..., 0].astype(np.uint8) << 2) | (bits[..., 1].astype(np.uint8) << 1)
    code |= bits[..., 2].astype(np.uint8)
    out = _palette_lut(conv.palette)[code]
    if (out == _UNMAPPED).any():
        bad = sorted({_COLOUR_NAMES[c] for c in np.unique(code[out == _UNMAPPED])})
        valid = ", ".join(f"{c}={i}" for c, i in conv.palette)
        raise MaskValueError(
            f"mask {path} has colours {bad} outside the {conv.name} palette ({valid}); "
            "check that this is a label image of that dataset"
        )
    return out


def _check_range(
    mask: np.ndarray, num_classes: int, path: Path, what: str, allow_ignore: bool = True
) -> None:
    counts = np.bincount(mask.ravel(), minlength=256)
    if allow_ignore:
        counts[IGNORE_INDEX] = 0
    bad = np.flatnonzero(counts[num_classes:]) + num_classes
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        ignore = f" (and {IGNORE_INDEX} = ignore)" if allow_ignore else ""
        raise MaskValueError(
            f"mask {path} has {what} values [{shown}] outside the valid range "
            f"0..{num_classes - 1}{ignore}; fix the mask, give the right layout, or list all "
            "classes in classes.txt"
        )


def decode_mask(raw: np.ndarray, conv: Convention, num_classes: int, path: Path) -> np.ndarray:
    """Raw mask pixels -> class indices ``0..K-1`` / 255, validated.

    Args:
        raw: [h, w, C] uint8 with C = 1 (indices or raw labels) or 3 (colour-coded).
        conv: The dataset convention.
        num_classes: K.
        path: Mask file, for error messages.

    Returns:
        [h, w] uint8, C-contiguous.

    Raises:
        MaskValueError: Values or colours outside the class range, or a wrong channel count.
    """
    channels = raw.shape[-1]
    if channels == 3 and conv.palette:
        return _decode_colours(raw, conv, path)
    if channels != 1:
        kind = "colour-coded (3 channels)" if channels == 3 else f"{channels}-channel"
        raise MaskValueError(
            f"mask {path} is {kind} but the {conv.name} layout expects single-channel class "
            "indices; convert it to an 8-bit index PNG or choose the matching layout"
        )
    plane = raw[..., 0]
    if conv.raw_offset:
        # Raw labels run 0..K with 0 = no-data; check before shifting so messages show raw values.
        _check_range(plane, num_classes + conv.raw_offset, path, f"raw {conv.name}", False)
        return np.ascontiguousarray(plane - np.uint8(conv.raw_offset))  # uint8 wraps 0 -> 255
    _check_range(plane, num_classes, path, "label")
    return np.ascontiguousarray(plane)
