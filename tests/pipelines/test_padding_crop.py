"""No stored padding: zoom < 1 levels keep only the tokens a tile point can read.

One synthetic source is extracted twice with the tiny teachers, with and without
``--keep-padding``. Expected grid sides are written out by hand from the contract (render =
round(scale * base), token pitch, ``m = min(grid, floor(valid_tokens - 0.5) + 2)``); the targets
of every valid token are compared bit for bit between the two stores.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore import StoreSchema, fingerprint, open_store
from featstore import layout as L
from featstore.verify import verify_store
from featviews.geometry import ViewGeometry
from tests.helpers import CLIP, CROP, DINO, build_store, tiny_config, warp_source
from trainer.checks import DataCheckError
from trainer.config import TeacherConfig
from trainer.data import StoreDataset, collate

SCALES = (0.5, 0.59, 1.0, 2.0)
N_TILES = 4
# (full canvas grid, stored grid) per level, tile 64 px, base 70 px, stride 14 (snapped ViTs).
# valid_tokens = render / 70 * input_px / 14, the token coordinate of the tile's right edge.
GRIDS = {
    # tiny DINOv2: input 70 px for the 70 px canvas -> 5 tokens; 140 px canvas -> 10.
    DINO: {
        "s0.50": (5, 4),  # render 35: valid 35/14 = 2.5, floor(2.0) + 2 = 4
        "s0.59": (5, 4),  # render round(41.3) = 41: valid 2.93, floor(2.43) + 2 = 4
        "s1.00": (5, 5),  # no padding
        "s2.00": (10, 10),
    },
    # tiny CLIP: input 224 px for the 70 px canvas -> 16 tokens; 448 px for 140 -> 32.
    CLIP: {
        "s0.50": (16, 9),  # valid 35/70 * 16 = 8.0, floor(7.5) + 2 = 9
        "s0.59": (16, 10),  # valid 41/70 * 16 = 9.37, floor(8.87) + 2 = 10
        "s1.00": (16, 16),
        "s2.00": (32, 32),
    },
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same source extracted with --crop-padding and with --keep-padding (the default)."""
    from pipelines.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("padding")
    source = generate_synthetic(root / "syn", n_images=N_TILES, size=64, seed=3)
    out = {}
    for name, keep in (("cropped", False), ("kept", True)):
        out[name] = build_store(
            root / name, teachers=(DINO, CLIP), scales=SCALES, flip=True, source=source,
            keep_padding=keep,
        )  # fmt: skip
    return out


def _level_bytes(url: str, teacher: str, key: str) -> int:
    """Bytes of a level's shard files (its zarr.json metadata left out)."""
    folder = os.path.join(url, L.feature_path(teacher, key), "c")
    return sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files
    )


def test_schema_records_the_choice_and_older_stores_read_as_kept(stores: dict[str, str]) -> None:
    cropped, kept = (open_store(stores[k]).schema for k in ("cropped", "kept"))
    assert (cropped.padding_tokens, kept.padding_tokens) == ("cropped", "kept")
    # a store written before the field: no key in its schema dict, read as "kept", and its
    # fingerprint unchanged (the kept schema writes no key either)
    old = kept.to_dict()
    assert "padding_tokens" not in old
    assert StoreSchema.from_dict(old).padding_tokens == "kept"
    assert cropped.to_dict()["padding_tokens"] == "cropped"
    tiles = open_store(stores["kept"]).tiles
    assert fingerprint(cropped, tiles) != fingerprint(kept, tiles)
    with pytest.raises(ValueError, match="padding_tokens"):
        StoreSchema("d", 64, padding_tokens="trimmed")


def test_resuming_with_the_other_choice_names_the_option(stores: dict[str, str]) -> None:
    from featstore.errors import FingerprintMismatchError
    from featstore.writer import create_store

    for url, other, hint in (
        (stores["kept"], "cropped", "resume it with --keep-padding"),
        (stores["cropped"], "kept", "resume it with --crop-padding"),
    ):
        st = open_store(url)
        schema = dataclasses.replace(st.schema, padding_tokens=other)
        with pytest.raises(FingerprintMismatchError, match=hint):
            create_store(url, schema, st.tiles)


def test_stored_shapes_follow_the_formula_and_crop_the_kept_grid(stores: dict[str, str]) -> None:
    cropped, kept = open_store(stores["cropped"]), open_store(stores["kept"])
    for teacher, levels in GRIDS.items():
        for key, (full, m) in levels.items():
            for flip in ("", "f"):
                k = key + flip
                a = cropped.read(teacher, 0, k)
                assert a.shape[:2] == (m, m), (teacher, k)
                assert kept.read(teacher, 0, k).shape[:2] == (full, full), (teacher, k)
                assert cropped.level_geometry(teacher, k).grid == m
                for i in range(N_TILES):  # the same tokens, only the padding corner dropped
                    want = kept.read_half(teacher, i, k)[:m, :m]
                    assert np.array_equal(cropped.read_half(teacher, i, k), want), (teacher, k)


def test_dataset_view_and_info_show_the_stored_grid(stores: dict[str, str]) -> None:
    from click.testing import CliRunner

    from featcache.cli import main

    st = open_store(stores["cropped"])
    ds = st.to_dataset(CLIP)
    assert ds["s0.50f"].shape == (N_TILES, 9, 9, st.schema.teacher(CLIP).spec.channels)
    assert np.array_equal(ds["s0.50f"][1].values, st.read(CLIP, 1, "s0.50f"))
    res = CliRunner().invoke(main, ["info", stores["cropped"]])
    assert res.exit_code == 0, res.output
    assert "level s0.59f: scale 0.59 flipped, grid 10x10" in res.output
    assert "level s2.00: scale 2, grid 32x32" in res.output
    assert "(--crop-padding)" in res.output
    kept = CliRunner().invoke(main, ["info", stores["kept"]]).output
    assert "level s0.59f: scale 0.59 flipped, grid 16x16" in kept and "--keep-padding" in kept


def test_cropped_levels_take_fewer_bytes(stores: dict[str, str]) -> None:
    for teacher, levels in GRIDS.items():
        channels = open_store(stores["kept"]).schema.teacher(teacher).spec.channels
        for key, (full, m) in levels.items():
            saved = _level_bytes(stores["kept"], teacher, key) - _level_bytes(
                stores["cropped"], teacher, key
            )
            # uncompressed fp16 chunks: the difference is exactly the dropped tokens
            assert saved == N_TILES * (full * full - m * m) * channels * 2, (teacher, key)
            if full > m:
                assert saved > 0


def test_verify_passes_on_both(stores: dict[str, str]) -> None:
    assert verify_store(stores["cropped"]) == []
    assert verify_store(stores["kept"]) == []


def _targets(url: str, teacher: str, n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Targets of 24 random views (seeded, scale blend on) read from the store at ``url``."""
    st = open_store(url)
    levels = {t: st.levels(t) for t in st.teacher_names}
    geoms = {(t, lv.key): st.level_geometry(t, lv.key) for t in levels for lv in levels[t]}
    source = warp_source(geoms, store=st, levels=levels, scale_blend=1.0)
    ds = StoreDataset(st, list(range(N_TILES)), source, False, 7, 24)
    batch = collate([ds[k] for k in range(24)])
    geom = ViewGeometry.from_params(batch["view"])
    got, valid = source.stream_targets(teacher, n, batch, geom)
    return got, valid, batch["view"]


@pytest.mark.parametrize("teacher, n", [(DINO, 5), (CLIP, 16)])
def test_targets_of_valid_tokens_are_bit_identical(
    stores: dict[str, str], teacher: str, n: int
) -> None:
    got_c, valid_c, views_c = _targets(stores["cropped"], teacher, n)
    got_k, valid_k, views_k = _targets(stores["kept"], teacher, n)
    assert views_c == views_k  # the same draws (levels, blend, flips) from both stores
    # the test covers cropped levels, flipped ones included, with padded (invalid) tokens
    zoomed_out = [v for v in views_k if v.levels[teacher].scale < 1]
    assert any(v.flip for v in zoomed_out) and any(not v.flip for v in zoomed_out)
    assert torch.equal(valid_c, valid_k) and (valid_k == 0).any()
    on = valid_k > 0
    assert torch.equal(got_c[on], got_k[on])
    # padding targets do differ (clamped edge tokens vs tokens of the black canvas): the
    # comparison above would see a wrong crop
    assert not torch.equal(got_c[~on], got_k[~on])


@pytest.mark.parametrize("teacher, n", [(DINO, 5), (CLIP, 16)])
def test_cutmix_targets_differ_only_where_the_partner_token_is_padding(
    stores: dict[str, str], teacher: str, n: int
) -> None:
    """CutMix mixes ``(1 - a) * own + a * partner``: in a fractional box-edge cell where one of
    the two is padding, that padding target enters a token of weight > 0 (the one place the
    crop shows in a masked loss)."""
    from featviews.sample import cutmix_targets, cutmix_weights
    from trainer.augment import cutmix_boxes

    got_c, valid, _ = _targets(stores["cropped"], teacher, n)
    got_k, _, _ = _targets(stores["kept"], teacher, n)
    boxes = cutmix_boxes(len(valid), CROP, torch.Generator().manual_seed(0), p=1.0)
    mix_c, w = cutmix_targets(got_c, valid, boxes, CROP)
    mix_k, _ = cutmix_targets(got_k, valid, boxes, CROP)
    a = cutmix_weights(boxes, CROP, n)
    # a padding target enters the mix with a nonzero coefficient: own (1 - a) or partner's (a)
    pad_mixed = ((a < 1) & (valid == 0)) | ((a > 0) & (valid.flip(0) == 0))
    same = (w > 0) & ~pad_mixed
    assert torch.equal(mix_c[same], mix_k[same])
    differ = (w > 0) & pad_mixed
    assert differ.any() and not torch.equal(mix_c[differ], mix_k[differ])


def _open(url: str, root: Path, masked: bool) -> None:
    from trainer.prepare import open_data

    ids = [t.tile_id for t in open_store(url).tiles]
    cfg = tiny_config(root, url, ids, [TeacherConfig(DINO)], n_lab=2, n_unl=1)
    cfg.distill.masked = masked
    open_data(cfg)


def test_unmasked_loss_is_refused_on_a_cropped_store(
    stores: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(DataCheckError, match="--keep-padding") as err:
        _open(stores["cropped"], tmp_path, masked=False)
    assert "--masked" in str(err.value) and "dinov2_vitb14/s0.50" in str(err.value)
    _open(stores["cropped"], tmp_path, masked=True)  # masked: padding weighs 0, allowed
    _open(stores["kept"], tmp_path, masked=False)  # the official unmasked loss on all tokens
