"""View draw rules: the official RS-MTDF rule, its grid-aligned variant, the evaluation view.

A *view* is the tile rendered at integer size ``S`` (zoom ``S / T``), padded right/bottom with
black to at least ``V = crop_size``, cropped at integer offset ``(oy, ox)`` to ``V x V`` and then
h-flipped when ``flip`` (docs/architecture.md, "Coordinates"). Draws happen on the CPU, per
item, from a seeded numpy generator; ``featviews.geometry`` maps the drawn views on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from featstore.constants import SCALE_RANGE
from featstore.geometry import LevelGeometry
from featstore.schema import LevelSpec


@dataclass(frozen=True)
class ViewParams:
    """One item's view, drawn on the CPU: plain ints/bools (picklable, cheap to collate).

    Attributes:
        size: rendered tile side ``S`` in px.
        oy: crop offset (rows) in zoomed px.
        ox: crop offset (columns) in zoomed px, before the flip.
        flip: whether the crop is h-flipped.
        tile: tile side ``T``.
        crop: view side ``V``.
        levels: cached level chosen per teacher name (filled by the dataset): the nearest one.
        blend: per teacher, the other cached levels mixed in and their weights (target =
            ``(1 - sum w) * levels[name] + sum w * level``, ``blend_levels``); absent: nearest
            level only.
    """

    size: int
    oy: int
    ox: int
    flip: bool
    tile: int
    crop: int
    levels: Mapping[str, LevelSpec] = field(default_factory=dict)
    blend: Mapping[str, tuple[tuple[LevelSpec, float], ...]] = field(default_factory=dict)

    def with_levels(
        self,
        levels: Mapping[str, LevelSpec],
        blend: Mapping[str, tuple[tuple[LevelSpec, float], ...]] | None = None,
    ) -> ViewParams:
        """Copy with the per-teacher level choice (and the levels mixed in) set."""
        return ViewParams(
            self.size,
            self.oy,
            self.ox,
            self.flip,
            self.tile,
            self.crop,
            dict(levels),
            dict(blend or {}),
        )


@dataclass(frozen=True)
class GridAlign:
    """Draw views whose student tokens land exactly on cached tokens of one teacher.

    ``sizes[k]`` is a cached render size (``LevelGeometry.render``: the tile resized to that many
    px, which is a zoomed view size ``S``) and ``pitch[k]`` the token pitch of that level in
    zoomed px (``stride * canvas / input_px``). Rule used by ``draw_view``: ``S`` is uniform over
    ``sizes``; each offset is ``round(k * pitch)`` with ``k`` uniform over the multiples that keep
    the crop inside ``max(S, V)``; for a flipped view with ``flipped_cache`` the column offset is
    counted from the right edge instead (``ox = S - V - round(k * pitch)``) so that the flipped
    cached level is the aligned one. Tokens are exact when ``pitch`` is an integer equal to the
    student pitch ``V / n`` and, for flipped views, ``S >= V`` (a padded flipped view puts its
    padding on the left, a flipped cached canvas on the right). Only one teacher (the one whose
    levels built this) can be aligned: DINOv2 (14 px) and CLIP (32.375 px) pitches differ.
    """

    sizes: tuple[int, ...]
    pitch: tuple[float, ...]
    flipped_cache: bool = True

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.pitch):
            raise ValueError(
                "GridAlign needs one pitch per size and at least one size; build it "
                "with GridAlign.from_levels(level_geometries)"
            )
        if min(self.pitch) <= 0 or min(self.sizes) < 1:
            raise ValueError(
                f"GridAlign sizes/pitch must be positive, got {self.sizes}, {self.pitch}"
            )

    @classmethod
    def from_levels(cls, geoms: Sequence[LevelGeometry]) -> GridAlign:
        """Build from the cached levels of one teacher (unflipped and flipped merge by size)."""
        by_size: dict[int, float] = {}
        flipped = False
        for g in geoms:
            by_size[g.render] = g.stride * g.canvas / g.input_px
            flipped = flipped or g.flipped
        sizes = tuple(sorted(by_size))
        return cls(sizes, tuple(by_size[s] for s in sizes), flipped)


def _snap_kmax(span: int, pitch: float) -> int:
    """Largest ``k`` with ``round(k * pitch) <= span`` (at most ``floor(span / pitch)``)."""
    kmax = int(math.floor(span / pitch + 1e-9))
    while kmax > 0 and round(kmax * pitch) > span:
        kmax -= 1
    return kmax


def _snapped_offset(rng: np.random.Generator, span: int, pitch: float) -> int:
    """``round(k * pitch)`` with ``k`` uniform such that the result stays in ``[0, span]``."""
    return int(round(int(rng.integers(0, _snap_kmax(span, pitch) + 1)) * pitch))


def draw_view(
    rng: np.random.Generator,
    tile_size: int,
    crop_size: int,
    scale_range: tuple[float, float] = SCALE_RANGE,
    flip_p: float = 0.5,
    grid_aligned: GridAlign | None = None,
) -> ViewParams:
    """Draw a view with the official RS-MTDF rule (or the grid-aligned variant).

    Official: ``S = randint(int(lo * T), int(hi * T))`` inclusive, pad right/bottom to ``V``,
    crop offsets uniform inclusive over ``[0, max(S, V) - V]``, flip with ``flip_p``.

    Args:
        rng: numpy random generator (per worker / per item).
        tile_size: tile side ``T``.
        crop_size: view side ``V``.
        scale_range: zoom range ``(lo, hi)`` of the rescale.
        flip_p: probability of an h-flip.
        grid_aligned: draw ``S`` and offsets on a cached token grid instead (see ``GridAlign``).

    Returns:
        The drawn view.
    """
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
    flip = bool(rng.random() < flip_p)
    if grid_aligned is None:
        size = int(rng.integers(int(lo * tile_size), int(hi * tile_size) + 1))
        span = max(size, crop_size) - crop_size
        oy = int(rng.integers(0, span + 1))
        ox = int(rng.integers(0, span + 1))
        return ViewParams(size, oy, ox, flip, tile_size, crop_size)
    k = int(rng.integers(0, len(grid_aligned.sizes)))
    size, pitch = int(grid_aligned.sizes[k]), float(grid_aligned.pitch[k])
    span = max(size, crop_size) - crop_size
    oy = _snapped_offset(rng, span, pitch)
    ox = _snapped_offset(rng, span, pitch)
    if flip and grid_aligned.flipped_cache:
        ox = span - ox  # align from the right edge: that edge becomes the flipped level's left
    return ViewParams(size, oy, ox, flip, tile_size, crop_size)


def count_views(
    tile_size: int,
    crop_size: int,
    scale_range: tuple[float, float] = SCALE_RANGE,
    grid_aligned: GridAlign | None = None,
) -> int:
    """Distinct geometric views ``(S, oy, ox, flip)`` that ``draw_view`` can produce per tile.

    The augmentation diversity of a draw rule: the official rule has every integer ``S`` and
    every integer offset; a grid-aligned rule only cached sizes and offsets on the token grid.
    """
    if grid_aligned is None:
        sizes = range(int(scale_range[0] * tile_size), int(scale_range[1] * tile_size) + 1)
        return 2 * sum((max(s, crop_size) - crop_size + 1) ** 2 for s in sizes)
    total = 0
    for size, pitch in zip(grid_aligned.sizes, grid_aligned.pitch, strict=True):
        span = max(size, crop_size) - crop_size
        offsets = {round(k * pitch) for k in range(_snap_kmax(span, pitch) + 1)}
        total += 2 * len(offsets) ** 2
    return total


def identity_view(tile_size: int, base_size: int, crop_size: int | None = None) -> ViewParams:
    """The evaluation view: ``S = base_size``, offset 0, no flip (``crop_size`` defaults to it)."""
    return ViewParams(
        base_size, 0, 0, False, tile_size, base_size if crop_size is None else crop_size
    )


__all__ = ["GridAlign", "ViewParams", "count_views", "draw_view", "identity_view"]
