"""Synthetic dataset generator: determinism, classes, plausibility, and loading as a source."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.sources import open_source
from pipelines.synthetic import CLASS_NAMES, generate_synthetic

LOVEDA_ORDER = ("background", "building", "road", "water", "barren", "forest", "agriculture")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn"), n_images=3, size=128, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic_bytes(synth: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", n_images=3, size=128, seed=7)
    assert _files(again) == _files(synth)
    other = generate_synthetic(tmp_path / "other", n_images=3, size=128, seed=8)
    assert _files(other)["images/000.png"] != _files(synth)["images/000.png"]
    assert sorted(_files(synth)) == [
        "classes.txt",
        "images/000.png",
        "images/001.png",
        "images/002.png",
        "labels.json",
        "masks/000.png",
        "masks/001.png",
        "masks/002.png",
    ]


def test_classes_and_ranges(synth: Path) -> None:
    assert CLASS_NAMES == LOVEDA_ORDER
    assert (synth / "classes.txt").read_text().split() == list(LOVEDA_ORDER)
    seen = np.zeros(7, bool)
    for i in range(3):
        image = Image.open(synth / "images" / f"{i:03d}.png")
        mask = np.asarray(Image.open(synth / "masks" / f"{i:03d}.png"))
        assert image.mode == "RGB" and image.size == (128, 128)
        assert mask.dtype == np.uint8 and mask.shape == (128, 128) and mask.max() <= 6
        seen[np.unique(mask)] = True
    missing = [c for c, s in zip(LOVEDA_ORDER, seen, strict=True) if not s]
    assert not missing, f"missing classes {missing}"


def test_classes_look_distinct(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path, n_images=2, size=256, seed=0)
    image = np.concatenate([np.asarray(Image.open(p)) for p in sorted(root.glob("images/*"))])
    mask = np.concatenate([np.asarray(Image.open(p)) for p in sorted(root.glob("masks/*"))])
    mean = {k: image[mask == k].astype(float).mean(0) for k in range(7)}
    water, forest, barren, road = mean[3], mean[5], mean[4], mean[2]
    assert water[2] > water[0] and water.sum() < barren.sum()  # dark and bluish
    assert forest[1] > forest[0] and forest[1] > forest[2]  # green
    assert barren.sum() > forest.sum()
    assert np.ptp(road) < 25  # grey
    # the mean colours of the seven classes are pairwise distinguishable
    cols = np.stack([mean[k] for k in range(7)])
    dist = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(7) * 1e3
    assert dist.min() > 8


def test_loads_as_source(synth: Path) -> None:
    src = open_source(synth, tile_size=64)
    assert src.class_names == LOVEDA_ORDER and len(src) == 3 * 4
    image = np.asarray(Image.open(synth / "images" / "001.png"))
    mask = np.asarray(Image.open(synth / "masks" / "001.png"))
    i = [r.tile_id for r in src.records].index("images/001_r00064_c00000")
    got_image, got_mask = src.load(i)
    np.testing.assert_array_equal(got_image, image[64:128, 0:64])
    np.testing.assert_array_equal(got_mask, mask[64:128, 0:64])


def test_speed_and_arguments(tmp_path: Path) -> None:
    start = time.perf_counter()
    generate_synthetic(tmp_path / "fast", n_images=1, size=512, seed=1)
    assert time.perf_counter() - start < 3.0  # ~0.25 s on one core; generous for busy CI
    with pytest.raises(ValueError, match="multiple of tile_size 96"):
        generate_synthetic(tmp_path / "bad", n_images=1, size=128, tile_size=96)
    with pytest.raises(ValueError, match="n_images"):
        generate_synthetic(tmp_path / "bad", n_images=0)
