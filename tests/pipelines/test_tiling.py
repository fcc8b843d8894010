"""Edge rules of ``tile_windows``, checked against hand-computed windows and a coverage grid."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.sources import EDGE_RULES, TilingError, tile_windows


def _coverage(windows: list[tuple[int, int, int, int]], h: int, w: int) -> np.ndarray:
    """How many windows cover each pixel of a canvas big enough for padded windows."""
    cover = np.zeros((h + 1024, w + 1024), np.int32)
    for r, c, th, tw in windows:
        cover[r : r + th, c : c + tw] += 1
    return cover


def test_overlap_last_600_by_64_by_hand() -> None:
    wins = tile_windows(600, 600, 64, "overlap_last")
    starts = [0, 64, 128, 192, 256, 320, 384, 448, 512, 536]  # last flush: 600 - 64
    assert wins == [(r, c, 64, 64) for r in starts for c in starts]
    cover = _coverage(wins, 600, 600)
    assert (cover[:600, :600] >= 1).all()
    assert cover[600:].sum() == 0 and cover[:, 600:].sum() == 0  # nothing past the edge
    # only the last column overlaps its neighbour: columns 536..575 are covered twice per row band
    assert (cover[0, 536:576] == 2).all() and (cover[0, :536] == 1).all()


def test_potsdam_and_deepglobe_scales() -> None:
    potsdam = tile_windows(6000, 6000, 512, "overlap_last")
    assert len(potsdam) == 144 and potsdam[-1] == (5488, 5488, 512, 512)
    deepglobe = tile_windows(2448, 2448, 512, "pad")
    assert len(deepglobe) == 25 and deepglobe[-1] == (2048, 2048, 512, 512)
    assert deepglobe[-1][0] + 512 == 2560  # zero-padded to 2560 like DWL
    loveda = tile_windows(1024, 1024, 512, "exact")
    assert loveda == [
        (0, 0, 512, 512),
        (0, 512, 512, 512),
        (512, 0, 512, 512),
        (512, 512, 512, 512),
    ]


def test_pad_runs_past_edge_non_square() -> None:
    wins = tile_windows(130, 200, 64, "pad")
    assert [w[0] for w in wins[::4]] == [0, 64, 128]
    assert [w[1] for w in wins[:4]] == [0, 64, 128, 192]
    cover = _coverage(wins, 130, 200)
    assert (cover[:192, :256] == 1).all() and cover.sum() == 12 * 64 * 64


def test_exact_refuses_remainder_and_names_fix() -> None:
    with pytest.raises(TilingError, match=r"600 px.*tile_size 64.*edge_rule='pad'"):
        tile_windows(600, 512, 64, "exact")


def test_single_tile_and_small_scene() -> None:
    for rule in EDGE_RULES:
        assert tile_windows(64, 64, 64, rule) == [(0, 0, 64, 64)]
    assert tile_windows(40, 40, 64, "pad") == [(0, 0, 64, 64)]
    with pytest.raises(TilingError, match="smaller than tile_size"):
        tile_windows(40, 40, 64, "overlap_last")
    with pytest.raises(TilingError, match="unknown edge rule 'wrap'"):
        tile_windows(64, 64, 64, "wrap")
    with pytest.raises(TilingError, match="positive"):
        tile_windows(64, 64, 0, "pad")


@given(
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    t=st.integers(8, 96),
    rule=st.sampled_from(["overlap_last", "pad"]),
)
def test_windows_cover_scene(h: int, w: int, t: int, rule: str) -> None:
    if rule == "overlap_last" and (h < t or w < t):
        return
    wins = tile_windows(h, w, t, rule)
    n_r, n_c = -(-h // t), -(-w // t)
    assert len(wins) == n_r * n_c
    cover = _coverage(wins, h, w)
    assert (cover[:h, :w] >= 1).all()
    if rule == "overlap_last":
        assert all(r + t <= h and c + t <= w for r, c, _, _ in wins)
        assert max(r for r, *_ in wins) == h - t and max(c for _, c, *_ in wins) == w - t
    else:
        assert all(r % t == 0 and c % t == 0 for r, c, _, _ in wins)
