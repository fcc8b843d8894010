"""Which cached levels a view reads: the nearest zoom and the neighbours the scale blend mixes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from featstore.schema import LevelSpec


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


__all__ = ["BLEND_MIN_WEIGHT", "blend_levels", "choose_level"]
