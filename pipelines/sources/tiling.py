"""Cutting a scene into square tiles: the edge rules.

A window is ``(row, col, h, w)`` in scene pixels, top-left origin, with ``h == w == tile``.
Windows are listed row-major (top to bottom, then left to right).

Edge rules (``n = ceil(size / tile)`` windows per axis):

* ``"exact"``: the scene side must be a multiple of ``tile``; windows at ``k * tile``
  (LoveDA: 1024 -> 2x2 tiles of 512).
* ``"overlap_last"``: windows at ``k * tile`` for ``k < n - 1`` and the last one flush with the
  far edge at ``size - tile``, so only the last window overlaps its neighbour; no padding
  (ISPRS Potsdam: 6000 -> 12x12 tiles of 512, the last starting at 5488, 144 px of overlap).
* ``"pad"``: windows at ``k * tile``; the last one runs past the scene edge and the part outside
  is zero-padded by the reader (image 0, mask = the dataset's pad label). This is how DWL's
  ``*_crop_split.py`` scripts cut the official data: DeepGlobe (2448 -> 5x5 tiles of 512
  covering 2560, padding labelled 6 = unknown) and ISPRS Potsdam (6000 -> 12x12 tiles covering
  6144, padding painted red = 5 = clutter).

A scene exactly one tile wide gives one window under every rule.

Potsdam's default stays ``overlap_last`` (no black strips, no invented clutter); the official
rule is one ``--edge-rule pad`` away at extraction, and `edge_rule_departure` says when a store
was cut otherwise than the official data.
"""

from __future__ import annotations

from featstore.protocols import OFFICIAL_EDGE_RULES, edge_rule_departure

from .errors import TilingError

__all__ = [
    "EDGE_RULES",
    "OFFICIAL_EDGE_RULES",
    "Window",
    "edge_rule_departure",
    "tile_windows",
]

Window = tuple[int, int, int, int]
EDGE_RULES = ("exact", "overlap_last", "pad")


def _starts(size: int, tile: int, rule: str, axis: str) -> list[int]:
    """Window start offsets along one axis."""
    n = -(-size // tile)  # ceil division
    if rule == "exact" and size % tile:
        raise TilingError(
            f"scene {axis} {size} px is not a multiple of tile_size {tile} (edge rule 'exact'); "
            "use edge_rule='pad' (zero-pad the last tile) or 'overlap_last' (shift it inside)"
        )
    if rule == "overlap_last" and size < tile:
        raise TilingError(
            f"scene {axis} {size} px is smaller than tile_size {tile}, which edge rule "
            "'overlap_last' cannot cover; use edge_rule='pad' or a smaller tile_size"
        )
    starts = [k * tile for k in range(n)]
    if rule == "overlap_last":
        starts[-1] = size - tile
    return starts


def tile_windows(height: int, width: int, tile: int, rule: str = "exact") -> list[Window]:
    """Windows that cut a ``height x width`` scene into ``tile x tile`` tiles.

    Args:
        height: Scene height in pixels.
        width: Scene width in pixels.
        tile: Tile side in pixels.
        rule: Edge rule, one of ``EDGE_RULES`` (see the module docstring).

    Returns:
        Row-major list of ``(row, col, tile, tile)`` windows.

    Raises:
        TilingError: Unknown rule, non-positive sizes, or a scene the rule cannot tile.
    """
    if rule not in EDGE_RULES:
        raise TilingError(f"unknown edge rule {rule!r}; choose one of {', '.join(EDGE_RULES)}")
    if tile <= 0 or height <= 0 or width <= 0:
        raise TilingError(
            f"tile_size ({tile}) and scene size ({height}x{width}) must be positive integers"
        )
    rows = _starts(height, tile, rule, "height")
    cols = _starts(width, tile, rule, "width")
    return [(r, c, tile, tile) for r in rows for c in cols]
