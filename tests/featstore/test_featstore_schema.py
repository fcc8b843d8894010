"""Schema round trips, level keys, teacher input sizes, fingerprints and LevelGeometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_schema, tiny_tiles

from featstore import (
    LevelGeometry,
    LevelSpec,
    MissingTeacherError,
    StoreSchema,
    TeacherSpec,
    TileRecord,
    fingerprint,
)

DINO = TeacherSpec(
    "dinov2_vitb14",
    "timm",
    "vit_base_patch14_dinov2",
    None,
    None,
    518,
    14,
    768,
    extra=(("snap_to_stride", "1"),),
)
CLIP = TeacherSpec(
    "clip_vitl14",
    "open_clip",
    "ViT-L-14",
    None,
    None,
    224,
    14,
    1024,
    extra=[("snap_to_stride", "1")],
)
CNN = TeacherSpec("timm:effnet", "timm", "tf_efficientnet_lite0", None, None, 518, 16, 112)


def test_schema_json_round_trip() -> None:
    schema = tiny_schema({"a": {"name": "pca", "k": 3}, "b": {"name": "int8"}})
    back = StoreSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert back == schema
    tile = tiny_tiles(2)[1]
    assert TileRecord.from_dict(json.loads(json.dumps(tile.to_dict()))) == tile
    assert CLIP.extra == (("snap_to_stride", "1"),)  # list input canonicalised to tuples


def test_level_keys() -> None:
    assert LevelSpec(1.0).key == "s1.00"
    assert LevelSpec(0.5, True).key == "s0.50f"
    assert LevelSpec(1.125).key == "s1.125"
    for key in ("s1.00", "s0.50f", "s2.00", "s1.125"):
        assert LevelSpec.from_key(key).key == key
    assert LevelSpec.from_key("s0.75f") == LevelSpec(0.75, True)
    with pytest.raises(ValueError, match="bad level key"):
        LevelSpec.from_key("x1.0")


def test_input_px_and_grid() -> None:
    assert DINO.input_px(518, 518) == 518 and DINO.grid_size(518, 518) == 37
    assert DINO.input_px(600, 518) == 588  # 600 snapped down to 42 * 14
    assert CLIP.input_px(518, 518) == 224 and CLIP.grid_size(1036, 518) == 32
    assert CNN.input_px(600, 518) == 600 and CNN.grid_size(518, 518) == 33  # ceil(518 / 16)
    floor = TeacherSpec(
        "f", "timm", "x", None, None, 518, 16, 8, extra=(("grid_rounding", "floor"),)
    )
    assert floor.grid_size(518, 518) == 32


def test_fingerprint_changes_with_codec_tiles_and_order() -> None:
    tiles = tiny_tiles(5)
    base = fingerprint(tiny_schema(), tiles)
    assert base == fingerprint(StoreSchema.from_dict(tiny_schema().to_dict()), tiny_tiles(5))
    assert base != fingerprint(tiny_schema({"tiny": {"name": "int8"}}), tiles)
    assert base != fingerprint(tiny_schema(), tiny_tiles(5, salt="x"))
    assert base != fingerprint(tiny_schema(), tiles[::-1])
    assert base != fingerprint(tiny_schema(tps=4), tiles)


def test_missing_teacher_message() -> None:
    with pytest.raises(MissingTeacherError, match="'nope' is not in the store"):
        tiny_schema().teacher("nope")


def geo(spec: TeacherSpec, scale: float, flipped: bool = False) -> LevelGeometry:
    return LevelGeometry.from_specs(512, 518, LevelSpec(scale, flipped), spec)


def test_identity_level_maps_token_centres_to_integers() -> None:
    g = geo(DINO, 1.0)
    assert (g.render, g.canvas, g.input_px, g.stride, g.grid) == (518, 518, 518, 14, 37)
    j = np.arange(37, dtype=np.float64)
    centres = (j + 0.5) * 14 * 512 / 518  # hand-derived tile px of token centres
    ty, tx = g.tile_to_token(centres, centres)
    np.testing.assert_allclose(ty, j, atol=1e-9)
    np.testing.assert_allclose(tx, j, atol=1e-9)
    assert g.tile_to_token(0.0, 512.0) == pytest.approx((-0.5, 36.5))


def test_flipped_level_mirrors_x_only() -> None:
    g = geo(DINO, 1.0, flipped=True)
    assert g.tile_to_token(0.0, 0.0) == pytest.approx((-0.5, 36.5))
    assert g.tile_to_token(512.0, 512.0) == pytest.approx((36.5, -0.5))
    centre0 = 7 * 512 / 518  # tile px of the first token centre of the unflipped tile
    assert g.tile_to_token(centre0, 512 - centre0) == pytest.approx((0.0, 0.0))
    ty, tx = g.tile_to_token(*g.token_to_tile(3.0, 5.0))
    assert (ty, tx) == pytest.approx((3.0, 5.0))


def test_half_scale_on_padded_canvas() -> None:
    g = geo(DINO, 0.5)
    assert (g.render, g.canvas, g.input_px, g.grid) == (259, 518, 518, 37)
    # Tile right edge lands at 259 canvas px = 18.5 tokens: 18.0 in centre coordinates.
    assert g.tile_to_token(512.0, 256.0) == pytest.approx((18.0, 8.75))
    assert g.valid_tokens == pytest.approx(18.5)


def test_double_scale_and_clip_and_cnn() -> None:
    g = geo(DINO, 2.0)
    assert (g.render, g.canvas, g.input_px, g.grid) == (1036, 1036, 1036, 74)
    assert g.tile_to_token(256.0, 512.0) == pytest.approx((36.5, 73.5))
    c = geo(CLIP, 1.0)
    assert (c.input_px, c.grid) == (224, 16)
    assert c.tile_to_token(256.0, 512.0) == pytest.approx((7.5, 15.5))
    e = geo(CNN, 1.0)
    assert e.grid == 33
    assert e.tile_to_token(0.0, 512.0) == pytest.approx((-0.5, 518 / 16 - 0.5))


def test_tile_to_token_on_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    g = geo(DINO, 1.0, flipped=True)
    y = torch.tensor([0.0, 256.0], dtype=torch.float64)
    ty, tx = g.tile_to_token(y, y)
    assert isinstance(ty, torch.Tensor) and isinstance(tx, torch.Tensor)
    ey, ex = g.tile_to_token(y.numpy(), y.numpy())
    np.testing.assert_allclose(ty.numpy(), ey)
    np.testing.assert_allclose(tx.numpy(), ex)
