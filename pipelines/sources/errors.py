"""Typed errors raised while opening or reading a tile source.

Every error is a ``ValueError`` subclass (bad input, not a bug) whose message names the file or
option at fault and says how to fix it.
"""

from __future__ import annotations

from featstore.errors import FeatcacheError

__all__ = [
    "BandError",
    "EmptySourceError",
    "ImageReadError",
    "LabelConventionError",
    "LabelConventionWarning",
    "LayoutError",
    "MaskValueError",
    "SizeMismatchError",
    "SourceError",
    "SplitFileError",
    "TilingError",
]


class SourceError(FeatcacheError, ValueError):
    """Base class of every tile-source input error."""


class LayoutError(SourceError):
    """Unknown layout name, or a folder that matches no known layout."""


class EmptySourceError(SourceError):
    """A source folder or split file that holds no usable scene."""


class ImageReadError(SourceError):
    """An image or mask file that cannot be decoded (missing, truncated, unsupported)."""


class BandError(SourceError):
    """An image whose bands are not 8-bit RGB and no ``bands=`` selection fixes it."""


class SizeMismatchError(SourceError):
    """An image and its mask with different pixel sizes."""


class LabelConventionError(SourceError):
    """Class names or label options missing, conflicting, or inconsistent with the masks."""


class LabelConventionWarning(UserWarning):
    """Masks that two label conventions read differently, and no option picked one."""


class MaskValueError(SourceError):
    """A mask holding values outside the class range (or colours outside the palette)."""


class SplitFileError(SourceError):
    """A malformed split-file line or a line naming a file that does not exist."""


class TilingError(SourceError):
    """A scene that cannot be cut into tiles under the requested edge rule."""
