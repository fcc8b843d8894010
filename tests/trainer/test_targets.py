"""Cached-target sampling against coordinates computed by hand from the contract formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featstore.geometry import LevelGeometry
from featstore.schema import LevelSpec, TeacherSpec
from featviews.draw import GridAlign, ViewParams, draw_view
from featviews.geometry import ViewGeometry
from featviews.levels import choose_level
from featviews.sample import cutmix_targets, resample_to_student, sample_targets
from trainer.augment import box_mask

T, V, BASE, N = 64, 70, 70, 5
CONST = 7.0


def _spec(input_size: int, stride: int) -> TeacherSpec:
    return TeacherSpec(
        "t",
        "timm",
        "vit",
        None,
        None,
        input_size=input_size,
        stride=stride,
        channels=3,
        extra=(("snap_to_stride", "1"),),
    )


DINO = _spec(BASE, 14)  # input = canvas, 14 px tokens: 5x5 at scale 1 (the 518/37 analogue)
CLIPISH = _spec(32, 8)  # input smaller than the canvas: 4x4 at scale 1


def _level(spec: TeacherSpec, scale: float, flipped: bool = False) -> LevelGeometry:
    return LevelGeometry.from_specs(T, BASE, LevelSpec(scale, flipped), spec)


def _coord_grid(g: int) -> torch.Tensor:
    """Token (i, j) holds (i, j, CONST)."""
    i, j = torch.meshgrid(
        torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([i, j, torch.full_like(i, CONST)], -1)


def _expected(
    p: ViewParams,
    render: int,
    canvas: int,
    input_px: int,
    stride: int,
    grid: int,
    flipped_level: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops over the contract: view px -> zoomed px -> tile px -> token coordinate."""
    out = np.zeros((N, N, 3))
    valid = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            vy, vx = (i + 0.5) * V / N, (j + 0.5) * V / N
            if p.flip:
                vx = V - vx
            zy, zx = vy + p.oy, vx + p.ox
            valid[i, j] = float(0 <= zy < p.size and 0 <= zx < p.size)
            ty, tx = zy * T / p.size, zx * T / p.size
            if flipped_level:
                tx = T - tx
            uy = ty * render / T * input_px / canvas / stride - 0.5
            ux = tx * render / T * input_px / canvas / stride - 0.5
            out[i, j] = (min(max(uy, 0), grid - 1), min(max(ux, 0), grid - 1), CONST)
    return out, valid


def _check(cases: list[tuple[ViewParams, LevelGeometry]]) -> None:
    params = [p for p, _ in cases]
    lgs = [lg for _, lg in cases]
    geom = ViewGeometry.from_params(params)
    targets, valid = sample_targets([_coord_grid(lg.grid) for lg in lgs], lgs, geom, N)
    assert targets.shape == (len(cases), N, N, 3) and targets.dtype == torch.float32
    for b, (p, lg) in enumerate(cases):
        exp, exp_valid = _expected(
            p, lg.render, lg.canvas, lg.input_px, lg.stride, lg.grid, lg.flipped
        )
        np.testing.assert_allclose(targets[b].numpy(), exp, atol=2e-5, err_msg=f"case {b}: {p}")
        np.testing.assert_array_equal(valid[b].numpy(), exp_valid, err_msg=f"case {b}: {p}")


def test_identity_view_reads_cached_grid_exactly() -> None:
    lg = _level(DINO, 1.0)
    assert lg.grid == N
    grids = torch.randn(3, N, N, 16)
    geom = ViewGeometry.from_params([ViewParams(BASE, 0, 0, False, T, V)] * 3)
    targets, valid = sample_targets(grids, lg, geom, N)
    assert torch.equal(targets, grids)
    assert torch.equal(valid, torch.ones(3, N, N))


def test_flipped_identity_exact() -> None:
    grid, grid_f = torch.randn(N, N, 8), torch.randn(N, N, 8)
    geom = ViewGeometry.from_params([ViewParams(BASE, 0, 0, True, T, V)] * 2)
    targets, valid = sample_targets(
        [grid_f, grid], [_level(DINO, 1.0, True), _level(DINO, 1.0)], geom, N
    )
    assert torch.equal(targets[0], grid_f)  # flipped view on the flipped cache
    assert torch.equal(targets[1], torch.flip(grid, dims=[1]))  # mirrored unflipped cache
    assert torch.equal(valid, torch.ones(2, N, N))


@pytest.mark.parametrize("spec", [DINO, CLIPISH], ids=["dino", "clipish"])
def test_coordinate_grid_geometry(spec: TeacherSpec) -> None:
    l1, l1f, l2, l2f, lh = (
        _level(spec, 1.0),
        _level(spec, 1.0, True),
        _level(spec, 2.0),
        _level(spec, 2.0, True),
        _level(spec, 0.5),
    )
    assert lh.canvas == BASE and lh.render == 35  # 0.5x on a padded canvas
    cases = [
        (ViewParams(70, 0, 0, False, T, V), l1),
        (ViewParams(70, 0, 0, True, T, V), l1),  # flip, unflipped level
        (ViewParams(90, 13, 5, False, T, V), l1),  # rescale + crop offsets
        (ViewParams(90, 20, 7, True, T, V), l1f),  # flipped view, flipped level
        (ViewParams(128, 58, 3, False, T, V), l2),  # 2x level
        (ViewParams(140, 35, 70, True, T, V), l2f),  # 2x flipped level
        (ViewParams(140, 70, 0, True, T, V), l2),
        (ViewParams(50, 0, 0, False, T, V), l1),  # padded view (S < V)
        (ViewParams(40, 0, 0, True, T, V), lh),  # padded flipped view on the 0.5x level
        (ViewParams(35, 0, 0, False, T, V), lh),  # exactly the 0.5x render
        (ViewParams(33, 0, 0, True, T, V), l1f),
    ]
    _check(cases)  # one call, mixed levels and grid sizes in one batch


def test_grid_aligned_views_land_on_cached_tokens() -> None:
    lgs = [_level(DINO, s, f) for s in (1.0, 2.0) for f in (False, True)]
    by_spec = {lg.level: lg for lg in lgs}
    rng = np.random.default_rng(1)
    params = [draw_view(rng, T, V, grid_aligned=GridAlign.from_levels(lgs)) for _ in range(24)]
    chosen = [by_spec[choose_level(list(by_spec), p.size, p.flip, T, BASE)] for p in params]
    assert {lg.level for lg in chosen} == set(by_spec)
    targets, valid = sample_targets(
        [_coord_grid(lg.grid) for lg in chosen], chosen, ViewGeometry.from_params(params), N
    )
    coords = targets[..., :2]
    assert torch.equal(coords, coords.round())  # every target is one exact cached token
    assert torch.equal(valid, torch.ones_like(valid))
    _check(list(zip(params, chosen, strict=True)))


def test_sample_targets_rejects_mismatched_grid() -> None:
    geom = ViewGeometry.from_params([ViewParams(70, 0, 0, False, T, V)])
    with pytest.raises(ValueError, match="expects"):
        sample_targets([torch.zeros(4, 4, 3)], [_level(DINO, 1.0)], geom, N)


def _cell_fraction_bruteforce(boxes: torch.Tensor) -> torch.Tensor:
    """Fraction of each 14x14 token cell's pixels inside the box (pixel counting)."""
    m = box_mask(boxes, V).double()
    return torch.nn.functional.avg_pool2d(m.unsqueeze(1), V // N).squeeze(1)


def test_cutmix_targets_weights() -> None:
    boxes = torch.tensor(
        [
            [14, 28, 28, 14],  # aligned: tokens (1,2), (2,2) fully inside
            [0, 0, 7, 14],  # half of token (0,0)
            [0, 0, 0, 0],  # no CutMix
            [5, 9, 40, 33],
        ]
    )  # arbitrary
    tg = torch.randn(4, N, N, 6, dtype=torch.float64)
    valid = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64).view(4, 1, 1).expand(4, N, N)
    mixed, mixed_valid = cutmix_targets(tg, valid.clone(), boxes, V)
    a = _cell_fraction_bruteforce(boxes)
    assert set(a[0].unique().tolist()) == {0.0, 1.0} and a[0].sum() == 2
    assert a[1, 0, 0] == 0.5 and a[1].sum() == 0.5
    partner = tg.flip(0)
    exp = (1 - a).unsqueeze(-1) * tg + a.unsqueeze(-1) * partner
    torch.testing.assert_close(mixed, exp, atol=1e-12, rtol=0)
    torch.testing.assert_close(mixed_valid, (1 - a) * valid + a * valid.flip(0), atol=1e-12, rtol=0)
    assert torch.equal(mixed[0, 1, 2], tg[3, 1, 2]) and torch.equal(mixed[0, 0, 0], tg[0, 0, 0])
    assert torch.equal(mixed[2], tg[2])
    assert mixed_valid[1, 0, 0] == 0.5  # own validity 0 mixed half with partner's 1


def test_resample_to_student() -> None:
    grid = torch.randn(2, N, N, 4)
    assert torch.equal(resample_to_student(grid, 70, 14, V, N), grid)
    out = resample_to_student(_coord_grid(4).expand(2, 4, 4, 3), 32, 8, V, N)
    for i in range(N):
        u = (i + 0.5) * V / N * 32 / V / 8 - 0.5  # view px -> teacher input px -> token
        u = min(max(u, 0.0), 3.0)
        np.testing.assert_allclose(out[:, i, :, 0].numpy(), u, atol=1e-6)
        np.testing.assert_allclose(out[:, :, i, 1].numpy(), u, atol=1e-6)
    np.testing.assert_allclose(out[..., 2].numpy(), CONST, atol=1e-5)
