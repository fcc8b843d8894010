"""View geometry: draw (CPU, per item), batch (device tensors), map view px to tile px.

A *view* is the tile rendered at integer size ``S`` (zoom ``S / T``), padded right/bottom with
black to at least ``V = crop_size``, cropped at integer offset ``(oy, ox)`` to ``V x V`` and then
h-flipped when ``flip`` (docs/architecture.md, "Coordinates"). View px ``(vy, vx)`` maps to
zoomed px ``(vy + oy, vx' + ox)`` with ``vx' = V - vx`` when flipped, and to tile px by ``T / S``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

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


def _zoom_distance_key(size: int, render: int) -> tuple[int, int]:
    """``max(S/r, r/S)`` as an exact fraction ``(num, den)`` (orders like ``|log(S/r)|``)."""
    return (max(size, render), min(size, render))


def choose_level(
    levels: Sequence[LevelSpec], size: int, flip: bool, tile_size: int, base_size: int
) -> LevelSpec:
    """Cached level nearest to a view of zoomed size ``S``, orientation matched when possible.

    Nearest scale by ``|log(S / render)|`` with ``render = round(scale * base_size)`` (exact
    integer comparison; ties go to the smaller scale); among levels at that scale, the one whose
    ``flipped`` equals ``flip`` when it exists. ``tile_size`` only validates ``size``.

    Raises:
        ValueError: no levels, or a non-positive size.
    """
    if not levels:
        raise ValueError("choose_level: the teacher has no cached levels; extract at least s1.00")
    if size < 1 or tile_size < 1:
        raise ValueError(f"choose_level: view size {size} and tile size {tile_size} must be >= 1")
    ordered = sorted(levels, key=lambda lv: (lv.scale, lv.flipped != flip))
    best = ordered[0]
    best_num, best_den = _zoom_distance_key(size, best.render_px(base_size))
    for lv in ordered[1:]:
        num, den = _zoom_distance_key(size, lv.render_px(base_size))
        # strictly better only: equal distance keeps the smaller scale / matching orientation
        if num * best_den < best_num * den:
            best, best_num, best_den = lv, num, den
    return best


BLEND_MIN_WEIGHT = 0.05  # levels below this share of the nearest level's weight are not read


def blend_levels(
    levels: Sequence[LevelSpec],
    size: int,
    flip: bool,
    tile_size: int,
    base_size: int,
    width: float,
) -> tuple[tuple[LevelSpec, float], ...]:
    """Cached levels to mix for a view of zoomed size ``S``, with normalised weights.

    Each cached scale (orientation-matched when possible, as in ``choose_level``) gets weight
    ``exp(-(log2(S / render) / width) ** 2)``; scales below ``BLEND_MIN_WEIGHT`` of the
    nearest one are dropped and the rest normalised. The nearest level (``choose_level``) comes
    first. Nearest only when ``width <= 0`` or when ``S`` equals a cached render size (an exact
    read stays exact). Mixing levels averages out part of the teacher's dependence on the
    sub-token phase, which differs between levels (measured in BENCHMARKS.md section 6).

    Args:
        levels: The teacher's allowed cached levels.
        size: View's zoomed tile size ``S`` in px.
        flip: Whether the view is flipped.
        tile_size: Tile side ``T`` (validates ``size``).
        base_size: Store base size (render px of a level = ``round(scale * base)``).
        width: Kernel width in octaves of zoom (0: nearest level only).

    Returns:
        ``((nearest, w0), (level, w), ...)``, weights summing to 1, heaviest first.
    """
    nearest = choose_level(levels, size, flip, tile_size, base_size)
    r_near = nearest.render_px(base_size)
    if width <= 0 or r_near == size:
        return ((nearest, 1.0),)

    def kernel(render: int) -> float:
        return math.exp(-((math.log2(size / render) / width) ** 2))

    k_near = kernel(r_near)
    picked = []
    for render in sorted({lv.render_px(base_size) for lv in levels} - {r_near}):
        k = kernel(render)
        if k >= BLEND_MIN_WEIGHT * k_near:
            same = [lv for lv in levels if lv.render_px(base_size) == render]
            picked.append((choose_level(same, size, flip, tile_size, base_size), k))
    picked.sort(key=lambda p: -p[1])
    total = k_near + sum(k for _, k in picked)
    return ((nearest, k_near / total),) + tuple((lv, k / total) for lv, k in picked)


@dataclass
class ViewGeometry:
    """A batch of views as device tensors ``[B]`` (``S``, ``oy``, ``ox`` int64, ``flip`` bool)."""

    size: torch.Tensor
    oy: torch.Tensor
    ox: torch.Tensor
    flip: torch.Tensor
    tile: int
    crop: int

    @classmethod
    def from_params(
        cls, params: Sequence[ViewParams], device: torch.device | str | None = None
    ) -> ViewGeometry:
        """Collate per-item ``ViewParams`` (all with the same tile and crop size)."""
        if not params:
            raise ValueError("ViewGeometry.from_params needs at least one ViewParams")
        tiles, crops = {p.tile for p in params}, {p.crop for p in params}
        if len(tiles) != 1 or len(crops) != 1:
            raise ValueError(
                f"a batch must share tile and crop size, got tiles {sorted(tiles)} "
                f"crops {sorted(crops)}; resize tiles when building the store"
            )
        ints = torch.tensor([[p.size, p.oy, p.ox, int(p.flip)] for p in params], dtype=torch.int64)
        ints = ints.to(device) if device is not None else ints
        return cls(ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3].bool(), tiles.pop(), crops.pop())

    def __len__(self) -> int:
        return int(self.size.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.size.device

    def to(self, device: torch.device | str) -> ViewGeometry:
        """Copy to ``device``."""
        return ViewGeometry(
            self.size.to(device),
            self.oy.to(device),
            self.ox.to(device),
            self.flip.to(device),
            self.tile,
            self.crop,
        )

    def select(self, index: Sequence[int] | torch.Tensor) -> ViewGeometry:
        """The views at ``index`` (a sub-batch)."""
        idx = torch.as_tensor(index, dtype=torch.int64, device=self.device)
        return ViewGeometry(
            self.size[idx], self.oy[idx], self.ox[idx], self.flip[idx], self.tile, self.crop
        )

    def per_sample(self, ndim: int) -> tuple[torch.Tensor, ...]:
        """``(S, oy, ox, flip)`` viewed as ``[B, 1, ..., 1]`` with ``ndim`` trailing dims."""
        shape = (-1,) + (1,) * ndim
        return tuple(t.view(shape) for t in (self.size, self.oy, self.ox, self.flip))


ViewBatch = ViewGeometry


def view_to_tile(
    geom: ViewGeometry, vy: torch.Tensor, vx: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map continuous view px to tile px, with validity (not in padding).

    Args:
        geom: the batch geometry.
        vy: view rows, shape ``[B or 1, *]`` (broadcast against the batch).
        vx: view columns, same rank as ``vy``.
        dtype: floating dtype of the computation (float64 keeps identity views exact).

    Returns:
        ``(ty, tx, valid)`` broadcast to ``[B, *]``; ``valid`` is bool, true iff the zoomed point
        lies in ``[0, S)^2``.
    """
    if vy.dim() != vx.dim() or vy.dim() < 1:
        raise ValueError("view_to_tile: vy and vx need the same rank >= 1 with a batch dim first")
    size, oy, ox, flip = (
        t.to(dtype) if t.dtype != torch.bool else t for t in geom.per_sample(vy.dim() - 1)
    )
    vy, vx = vy.to(dtype), vx.to(dtype)
    zy = vy + oy
    zx = torch.where(flip, geom.crop - vx, vx) + ox
    valid = (zy >= 0) & (zy < size) & (zx >= 0) & (zx < size)
    scale = geom.tile / size
    ty, tx = zy * scale, zx * scale
    ty, tx = torch.broadcast_tensors(ty, tx)
    return ty, tx, valid.expand_as(ty)


def token_centres(
    view_size: int, n: int, device: Any = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Centres ``(i + 0.5) * V / n`` of an ``n``-token student grid over a ``V`` px view."""
    return (torch.arange(n, device=device, dtype=dtype) + 0.5) * (view_size / n)


def token_valid(geom: ViewGeometry, n: int) -> torch.Tensor:
    """Float ``[B, n, n]``: 1 where the student token centre is inside the rendered area."""
    c = token_centres(geom.crop, n, device=geom.device)
    _, _, valid = view_to_tile(geom, c.view(1, n, 1), c.view(1, 1, n))
    return valid.to(torch.float32)


__all__ = [
    "GridAlign",
    "ViewBatch",
    "ViewGeometry",
    "ViewParams",
    "BLEND_MIN_WEIGHT",
    "blend_levels",
    "choose_level",
    "count_views",
    "draw_view",
    "identity_view",
    "token_centres",
    "token_valid",
    "view_to_tile",
]
