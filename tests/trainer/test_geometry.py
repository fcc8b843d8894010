"""View drawing, level choice and view -> tile mapping against hand-written expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featstore.geometry import LevelGeometry
from featstore.schema import LevelSpec, TeacherSpec
from featviews.draw import GridAlign, ViewParams, count_views, draw_view, identity_view
from featviews.geometry import ViewGeometry, token_valid, view_to_tile
from featviews.levels import choose_level

T, V, BASE = 64, 70, 70


def test_draw_view_official_statistics() -> None:
    rng = np.random.default_rng(0)
    views = [draw_view(rng, T, V) for _ in range(3000)]
    sizes = np.array([v.size for v in views])
    assert sizes.min() == 32 and sizes.max() == 128  # randint(int(.5 T), int(2 T)) inclusive
    assert abs(sizes.mean() - 80.0) < 2.0  # uniform over 32..128
    for v in views:
        span = max(v.size, V) - V
        assert 0 <= v.oy <= span and 0 <= v.ox <= span
        assert (v.tile, v.crop) == (T, V)
    big = [v for v in views if v.size > 100]
    assert max(v.oy for v in big) > 40  # offsets really spread over the valid range
    flips = np.mean([v.flip for v in views])
    assert 0.45 < flips < 0.55
    assert not any(draw_view(rng, T, V, flip_p=0.0).flip for _ in range(50))


def test_draw_view_rejects_bad_range() -> None:
    with pytest.raises(ValueError, match="scale_range"):
        draw_view(np.random.default_rng(0), T, V, scale_range=(2.0, 0.5))


def test_identity_view() -> None:
    v = identity_view(T, BASE)
    assert (v.size, v.oy, v.ox, v.flip, v.tile, v.crop) == (BASE, 0, 0, False, T, BASE)
    assert identity_view(T, BASE, crop_size=80).crop == 80


def _brute_nearest(levels: list[LevelSpec], size: int, flip: bool) -> LevelSpec:
    """Brute force with floats: smallest |log(S/render)|, then smaller scale, then orientation."""

    def key(lv: LevelSpec) -> tuple[float, float, bool]:
        d = abs(math.log(size / round(lv.scale * BASE)))
        return (round(d, 12), lv.scale, lv.flipped != flip)

    return min(levels, key=key)


def test_choose_level_nearest_and_orientation() -> None:
    levels = [LevelSpec(0.5), LevelSpec(1.0), LevelSpec(1.0, True), LevelSpec(2.0)]
    assert choose_level(levels, 70, True, T, BASE) == LevelSpec(1.0, True)
    assert choose_level(levels, 70, False, T, BASE) == LevelSpec(1.0)
    assert choose_level(levels, 130, True, T, BASE) == LevelSpec(2.0)  # no flipped 2x: unflipped
    assert choose_level(levels, 98, False, T, BASE) == LevelSpec(1.0)  # 98/70 = 1.4 < 140/98
    assert choose_level(levels, 99, False, T, BASE) == LevelSpec(2.0)  # 99^2 > 70 * 140
    # exact tie (70^2 = 35 * 140) goes to the smaller scale
    assert choose_level([LevelSpec(2.0), LevelSpec(0.5)], 70, False, T, BASE) == LevelSpec(0.5)
    for size in range(20, 200, 3):
        for flip in (False, True):
            assert choose_level(levels, size, flip, T, BASE) == _brute_nearest(levels, size, flip)
    with pytest.raises(ValueError, match="no cached levels"):
        choose_level([], 70, False, T, BASE)


def test_view_to_tile_matches_contract() -> None:
    params = [
        ViewParams(100, 7, 20, True, T, V),
        ViewParams(50, 0, 0, False, T, V),
        ViewParams(50, 0, 0, True, T, V),
    ]
    geom = ViewGeometry.from_params(params)
    vy = torch.tensor([[0.5, 30.25, 69.5]], dtype=torch.float64).view(1, 3, 1)
    vx = torch.tensor([[1.0, 33.5, 60.0]], dtype=torch.float64).view(1, 1, 3)
    ty, tx, valid = view_to_tile(geom, vy, vx)
    for b, p in enumerate(params):
        for i, y in enumerate([0.5, 30.25, 69.5]):
            for j, x in enumerate([1.0, 33.5, 60.0]):
                xu = V - x if p.flip else x
                zy, zx = y + p.oy, xu + p.ox
                assert ty[b, i, j].item() == pytest.approx(zy * T / p.size, abs=1e-12)
                assert tx[b, i, j].item() == pytest.approx(zx * T / p.size, abs=1e-12)
                assert bool(valid[b, i, j]) == (0 <= zy < p.size and 0 <= zx < p.size)


def test_token_valid_marks_padding() -> None:
    geom = ViewGeometry.from_params(
        [ViewParams(35, 0, 0, False, T, V), ViewParams(35, 0, 0, True, T, V)]
    )
    tv = token_valid(geom, 5)  # centres 7, 21, 35, 49, 63: only 7 and 21 are inside [0, 35)
    expect = np.zeros((5, 5))
    expect[:2, :2] = 1
    np.testing.assert_array_equal(tv[0].numpy(), expect)
    np.testing.assert_array_equal(tv[1].numpy(), expect[:, ::-1])


def _dino_like_levels() -> list[LevelGeometry]:
    spec = TeacherSpec(
        "t",
        "timm",
        "vit",
        None,
        None,
        input_size=BASE,
        stride=14,
        channels=3,
        extra=(("snap_to_stride", "1"),),
    )
    return [
        LevelGeometry.from_specs(T, BASE, LevelSpec(s, f), spec)
        for s in (1.0, 2.0)
        for f in (False, True)
    ]


def test_grid_aligned_draws_follow_the_rule() -> None:
    align = GridAlign.from_levels(_dino_like_levels())
    assert align.sizes == (70, 140) and align.pitch == (14.0, 14.0) and align.flipped_cache
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(400):
        v = draw_view(rng, T, V, grid_aligned=align)
        assert v.size in (70, 140)
        span = max(v.size, V) - V
        assert 0 <= v.oy <= span and 0 <= v.ox <= span
        assert v.oy % 14 == 0
        assert (span - v.ox if v.flip else v.ox) % 14 == 0
        seen.add((v.size, v.oy))
    assert {(140, k * 14) for k in range(6)} <= seen
    with pytest.raises(ValueError, match="GridAlign"):
        GridAlign((), ())


@pytest.mark.parametrize("align", [None, GridAlign((8, 12, 16), (2.0, 3.0, 2.5))])
def test_count_views_matches_the_views_draw_view_produces(align: GridAlign | None) -> None:
    """Brute force: collect every distinct (S, oy, ox, flip) over many draws on a tiny tile."""
    rng = np.random.default_rng(0)
    seen = {
        (p.size, p.oy, p.ox, p.flip)
        for p in (draw_view(rng, 8, 7, (0.5, 2.0), 0.5, align) for _ in range(60_000))
    }
    assert count_views(8, 7, (0.5, 2.0), align) == len(seen)
    # by hand: official 2 * (4 sizes <= 7 with one offset + sum_{k=2..10} k^2); aligned
    # spans 1 / 5 / 9 at pitch 2 / 3 / 2.5 give 1 / 2 / 4 offsets per axis
    assert len(seen) == (2 * (4 + 384) if align is None else 2 * (1 + 4 + 16))
