"""Tile sources: datasets on disk -> uniformly tiled uint8 RGB tiles with class-index masks."""

from .conventions import CONVENTIONS, IGNORE_INDEX, Convention
from .errors import (
    BandError,
    EmptySourceError,
    ImageReadError,
    LabelConventionError,
    LabelConventionWarning,
    LayoutError,
    MaskValueError,
    SizeMismatchError,
    SourceError,
    SplitFileError,
    TilingError,
)
from .labels import LabelOptions, read_palette
from .source import LAYOUTS, TileSource, open_configured, open_source, pixel_hash
from .tiling import EDGE_RULES, tile_windows

__all__ = [
    "CONVENTIONS",
    "EDGE_RULES",
    "IGNORE_INDEX",
    "LAYOUTS",
    "BandError",
    "Convention",
    "EmptySourceError",
    "ImageReadError",
    "LabelConventionError",
    "LabelConventionWarning",
    "LabelOptions",
    "LayoutError",
    "MaskValueError",
    "SizeMismatchError",
    "SourceError",
    "SplitFileError",
    "TileSource",
    "TilingError",
    "open_configured",
    "open_source",
    "pixel_hash",
    "read_palette",
    "tile_windows",
]
