"""Building a view bank: the draw rule, view rendering, resume and the bank fingerprint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featstore import (
    BankSpec,
    FingerprintMismatchError,
    LevelSpec,
    StoreSchema,
    TeacherEntry,
    TileRecord,
    add_bank,
    create_store,
    open_store,
    verify_store,
)
from featstore.bank import PARAMS, bank_path
from featviews.bank import draw_bank_params
from featviews.draw import draw_view
from featviews.render import render_tile_views
from pipelines.teachers import TeacherSpecMismatchError, create_teacher
from pipelines.viewbank import ViewBankError, bank_shard_arrays, build_view_bank

T, BASE, N, TPS = 64, 70, 5, 2  # tiny ViT: 70 px views -> 5x5 tokens
TEACHER = "dinov2_vitb14"


def make_store(path: Path, store_pixels: bool = True, layer: str | None = None) -> str:
    """A finished store of the tiny teacher (random level features; random pixels)."""
    spec = create_teacher(TEACHER, tiny=True, base_size=BASE).spec
    if layer is not None:  # a store made by another variant of the teacher
        spec = dataclasses.replace(spec, layer=layer)
    schema = StoreSchema(
        "toy", T, BASE, ("a",), 255, TPS, (TeacherEntry(spec, (LevelSpec(1.0),)),), store_pixels
    )
    tiles = [TileRecord(f"t{i}", "src", (0, 0, T, T), "train", f"h{i}") for i in range(N)]
    writer = create_store(str(path), schema, tiles)
    rng = np.random.default_rng(0)
    g = spec.grid_size(BASE, BASE)
    for s in writer.pending_shards():
        n = len(writer.shard_tiles(s))
        feats = {spec.name: {"s1.00": rng.normal(size=(n, g, g, spec.channels)).astype("f4")}}
        pixels = {}
        if store_pixels:
            pixels = {
                "images": rng.integers(0, 256, (n, T, T, 3), dtype=np.uint8),
                "masks": rng.integers(0, 3, (n, T, T), dtype=np.uint8),
            }
        writer.write_shard(s, feats, **pixels)
    writer.finalize()
    return str(path)


def test_draw_follows_the_official_rule() -> None:
    spec = BankSpec(k=400, seed=3, crop=BASE, scale_range=(0.5, 2.0), flip_p=0.25)
    p = draw_bank_params(range(10), spec, T).reshape(-1, 4).astype(np.int64)
    size, oy, ox, flip = p.T
    span = np.maximum(size, BASE) - BASE
    assert size.min() == T // 2 and size.max() == 2 * T  # inclusive at both ends
    assert ((oy >= 0) & (oy <= span) & (ox >= 0) & (ox <= span)).all()
    assert ((oy == 0) & (ox == 0))[size <= BASE].all()  # no offset when the view is padded
    cropped = span > 0
    for off in (oy, ox):  # inclusive at both ends, uniform in between
        assert (off == span)[cropped].any() and (off == 0)[cropped].any()
        assert abs((off[cropped] / span[cropped]).mean() - 0.5) < 0.03
    assert abs(flip.mean() - 0.25) < 0.03
    # the trainer's draw_view with the same parameters has the same support
    rng = np.random.default_rng(0)
    views = [draw_view(rng, T, BASE, (0.5, 2.0), 0.25) for _ in range(4000)]
    assert {v.size for v in views} == set(size.tolist()) == set(range(T // 2, 2 * T + 1))
    assert all(0 <= v.oy <= max(v.size, BASE) - BASE for v in views)


def test_draw_is_per_tile_deterministic() -> None:
    spec = BankSpec(k=4, seed=7, crop=BASE)
    full = draw_bank_params(range(6), spec, T)
    np.testing.assert_array_equal(draw_bank_params([4, 1], spec, T), full[[4, 1]])
    other = draw_bank_params(range(6), BankSpec(k=4, seed=8, crop=BASE), T)
    assert not np.array_equal(full, other)
    assert full.dtype == np.int32 and full.shape == (6, 4, 4)


def test_render_matches_trainer_render_views() -> None:
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (T, T, 3), dtype=np.uint8)
    params = np.array(
        [[T, 0, 0, 0], [40, 0, 0, 1], [128, 50, 7, 0], [97, 3, 27, 1], [BASE, 0, 0, 1]], np.int32
    )
    views = render_tile_views(tile, params, BASE)
    # the contract written out with torch's own antialiased resize, one view at a time
    x = torch.from_numpy(tile).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    for view, (size, oy, ox, flip) in zip(views, params.tolist(), strict=True):
        z = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        want = torch.zeros((3, BASE, BASE))
        h, w = min(size - oy, BASE), min(size - ox, BASE)
        want[:, :h, :w] = z[0, :, oy : oy + h, ox : ox + w]
        torch.testing.assert_close(view, want.flip(-1) if flip else want, atol=2e-5, rtol=0)
    # S == T, no flip: the tile itself, black beyond it (hand-built)
    want = np.zeros((3, BASE, BASE), np.float32)
    want[:, :T, :T] = tile.transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(views[0].numpy(), want, atol=1e-7)


def test_resumed_bank_equals_uninterrupted(tmp_path: Path) -> None:
    a, b = make_store(tmp_path / "a.zarr"), make_store(tmp_path / "b.zarr")
    build_view_bank(a, tiny=True, k=3, seed=5, batch_size=4)
    # b: a "killed" run that wrote shard 1 only, then the same command again
    spec = open_store(a).schema.bank
    writer = add_bank(b, spec)
    teacher = {TEACHER: _seeded_teacher()}
    r = writer.shard_tiles(1)
    images = np.stack([open_store(b).read_image(i) for i in r])
    writer.write_bank_shard(1, *bank_shard_arrays(teacher, images, list(r), spec, T, 4))
    assert writer.pending_shards() == [0, 2]
    build_view_bank(b, tiny=True, k=3, seed=5, batch_size=4)
    sa, sb = open_store(a), open_store(b)
    assert sa.fingerprint == sb.fingerprint and sb.bank.complete
    for path in (PARAMS, bank_path(TEACHER)):
        np.testing.assert_array_equal(sa._group[path][:], sb._group[path][:])
    assert verify_store(a) == [] and verify_store(b) == []


def _seeded_teacher() -> Any:
    # create_teacher seeds random init, so this is the network build_view_bank uses.
    return create_teacher(TEACHER, tiny=True, base_size=BASE)


def test_bank_parameters_change_the_fingerprint(tmp_path: Path) -> None:
    url = make_store(tmp_path / "s.zarr")
    fp0 = open_store(url).fingerprint
    build_view_bank(url, tiny=True, k=2, seed=0)
    fp1 = open_store(url).fingerprint
    build_view_bank(url, tiny=True, k=2, seed=0)  # same bank: a no-op resume
    assert open_store(url).fingerprint == fp1
    with pytest.raises(FingerprintMismatchError, match="seed"):
        build_view_bank(url, tiny=True, k=2, seed=1)
    build_view_bank(url, tiny=True, k=2, seed=1, overwrite=True)
    fp2 = open_store(url).fingerprint
    build_view_bank(url, tiny=True, k=3, seed=1, overwrite=True)
    assert len({fp0, fp1, fp2, open_store(url).fingerprint}) == 4


def test_build_refuses_unusable_stores(tmp_path: Path) -> None:
    url = make_store(tmp_path / "nopix.zarr", store_pixels=False)
    with pytest.raises(ViewBankError, match="store_pixels"):
        build_view_bank(url, tiny=True, k=2)
    url = make_store(tmp_path / "s.zarr")
    with pytest.raises(ViewBankError, match="not in"):
        build_view_bank(url, teacher_names=["sam_vitb"], tiny=True, k=2)
    url = make_store(tmp_path / "other.zarr", layer="blocks[0]")
    with pytest.raises(TeacherSpecMismatchError, match="differs in layer"):
        build_view_bank(url, tiny=True, k=2)
