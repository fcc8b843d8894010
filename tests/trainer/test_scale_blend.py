"""Scale blend: neighbouring cached levels mixed into a view's target with a log-zoom kernel.

Expectations are computed by hand from the contract formulas (render sizes, token pitch in tile
px, the kernel ``exp(-(log2(S / render) / width) ** 2)``), not with the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featstore import LevelGeometry, LevelSpec, TeacherSpec, open_store
from featviews.draw import ViewParams
from featviews.geometry import ViewGeometry
from featviews.levels import blend_levels
from featviews.sample import mix_levels, sample_targets
from tests.helpers import CROP, DINO, build_store, ref_level_targets, warp_source
from trainer.data import StoreDataset, collate

T, BASE, N = 64, 70, 5
SPEC = TeacherSpec(
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


def _kernel(size: int, render: int, width: float) -> float:
    return math.exp(-((math.log2(size / render) / width) ** 2))


def test_blend_levels_weights_orientation_and_exact_reads() -> None:
    levels = [LevelSpec(0.5), LevelSpec(1.0), LevelSpec(1.0, True), LevelSpec(2.0)]
    # renders 35, 70, 140 px. S = 99: 99^2 = 9801 > 70 * 140, so 2x is the nearest
    got = blend_levels(levels, 99, True, T, BASE, 1.0)
    k = {r: _kernel(99, r, 1.0) for r in (35, 70, 140)}  # all three above 5 % of the nearest
    total = sum(k.values())
    assert [lv for lv, _ in got] == [LevelSpec(2.0), LevelSpec(1.0, True), LevelSpec(0.5)]
    assert [w for _, w in got] == pytest.approx([k[140] / total, k[70] / total, k[35] / total])
    # a narrow kernel drops the far 0.5x level (weight < 5 % of the nearest)
    narrow = blend_levels(levels, 99, False, T, BASE, 0.5)
    assert [lv for lv, _ in narrow] == [LevelSpec(2.0), LevelSpec(1.0)]
    assert narrow[1][1] == pytest.approx(
        _kernel(99, 70, 0.5) / (_kernel(99, 70, 0.5) + _kernel(99, 140, 0.5))
    )
    # an exact render size, or width 0, reads the nearest level alone
    assert blend_levels(levels, 70, True, T, BASE, 1.0) == ((LevelSpec(1.0, True), 1.0),)
    assert blend_levels(levels, 99, False, T, BASE, 0.0) == ((LevelSpec(2.0), 1.0),)


def _level(scale: float) -> LevelGeometry:
    return LevelGeometry.from_specs(T, BASE, LevelSpec(scale), SPEC)


def _field(g: int, a: tuple[float, float, float]) -> torch.Tensor:
    """Token (i, j) of a g x g grid holds (a0 * i + a1, a2 * j, 1): linear in token coords."""
    i, j = torch.meshgrid(
        torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([a[0] * i + a[1], a[2] * j, torch.ones_like(i)], -1).float()


def test_mixed_targets_equal_hand_computed_mix() -> None:
    """Two levels hold different linear fields; the target must be their kernel-weighted mix."""
    view = ViewParams(99, 11, 17, False, T, BASE)  # between the 70 px and 140 px renders
    fields = {1.0: (1.0, 0.0, 1.0), 2.0: (2.0, 1.0, -1.0)}
    geom = ViewGeometry.from_params([view, ViewParams(70, 3, 0, False, T, BASE)])
    lg = {s: _level(s) for s in fields}
    grids = {s: _field(lg[s].grid, fields[s]) for s in fields}
    mix = blend_levels([LevelSpec(1.0), LevelSpec(2.0)], 99, False, T, BASE, 0.5)
    near = mix[0][0].scale
    target, _ = sample_targets([grids[near], grids[1.0]], [lg[near], lg[1.0]], geom, N)
    exact = target[1].clone()
    extras = [[(grids[lv.scale], lg[lv.scale], w) for lv, w in mix[1:]], []]
    mix_levels(target, extras, lambda g, lgs, sub: sample_targets(g, lgs, sub, N)[0], geom)

    k = {1.0: _kernel(99, 70, 0.5), 2.0: _kernel(99, 140, 0.5)}
    expected = np.zeros((N, N, 3))
    for s, (a0, a1, a2) in fields.items():
        pitch = 14 * T / round(s * BASE)  # tile px per token (input = canvas = render here)
        g = lg[s].grid
        for i in range(N):
            for j in range(N):
                zy, zx = (i + 0.5) * BASE / N + view.oy, (j + 0.5) * BASE / N + view.ox
                uy = min(max(zy * T / view.size / pitch - 0.5, 0), g - 1)
                ux = min(max(zx * T / view.size / pitch - 0.5, 0), g - 1)
                w = k[s] / (k[1.0] + k[2.0])
                expected[i, j] += w * np.array([a0 * uy + a1, a2 * ux, 1.0])
    assert torch.allclose(target[0].double(), torch.from_numpy(expected), atol=1e-4)
    assert torch.equal(target[1], exact)  # a sample without extras is untouched


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six tiles, tiny DINOv2 at scales 1 and 2 plus flipped copies."""
    return build_store(
        tmp_path_factory.mktemp("blend"), teachers=(DINO,), scales=(1.0, 2.0), flip=True
    )


def test_dataset_and_cached_targets_mix_the_neighbouring_levels(store: str) -> None:
    st = open_store(store)
    levels = {DINO: st.levels(DINO)}
    on = StoreDataset(
        st, [0, 1, 2, 3], warp_source(store=st, levels=levels, scale_blend=1.0), False, 2, 16
    )
    off = StoreDataset(st, [0, 1, 2, 3], warp_source(store=st, levels=levels), False, 2, 16)
    items = [on[k] for k in range(16)]
    renders = (CROP, 2 * CROP)
    assert any(renders[0] < it["view"].size < renders[1] for it in items)
    for k, it in enumerate(items):
        view = it["view"]
        assert view.levels == off.draw(k).levels and not off.draw(k).blend  # nearest unchanged
        near_r = view.levels[DINO].render_px(CROP)
        other_r = sum(renders) - near_r
        k_near, k_other = _kernel(view.size, near_r, 1.0), _kernel(view.size, other_r, 1.0)
        if view.size in renders or k_other < 0.05 * k_near:  # exact read / too far to mix
            assert not view.blend and DINO not in it["blend_grids"]
            continue
        ((level, w),) = view.blend[DINO]  # two cached zooms: one level mixed in
        assert level.render_px(CROP) == other_r and level.flipped == view.flip
        assert w == pytest.approx(k_other / (k_near + k_other))
        # the level's stored bytes, encoded as the store holds them (fp16 here)
        assert torch.equal(
            it["blend_grids"][DINO][0].data,
            torch.from_numpy(st.read(DINO, it["index"], level.key)).half(),
        )

    batch = collate(items[:8])
    geom = ViewGeometry.from_params(batch["view"])
    provider = warp_source(
        {(DINO, lv.key): st.level_geometry(DINO, lv.key) for lv in st.levels(DINO)}, store=st
    )
    got, _ = provider.stream_targets(DINO, 5, batch, geom)
    for b, view in enumerate(batch["view"]):
        pairs = [(view.levels[DINO], 1.0 - sum(w for _, w in view.blend.get(DINO, ())))]
        pairs += list(view.blend.get(DINO, ()))
        idx = int(batch["index"][b])
        # each level read by hand through the view, then mixed with the kernel weights
        want = sum(
            w
            * ref_level_targets(
                st.read(DINO, idx, lv.key).astype(np.float16),
                view,
                st.level_geometry(DINO, lv.key),
                5,
            )
            for lv, w in pairs
        )
        np.testing.assert_allclose(
            got[b].double().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=str(b)
        )
