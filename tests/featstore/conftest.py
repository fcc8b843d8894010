"""Fixtures for featstore tests: a tiny schema (T=32, g=4, C=8), tiles and store URLs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pytest

from featstore import LevelSpec, StoreSchema, TeacherEntry, TeacherSpec, TileRecord

T, BASE, C = 32, 28, 8


def tiny_teacher(name: str = "tiny", channels: int = C) -> TeacherSpec:
    """A ViT-like spec: 28 px input at base size, stride 7 -> 4x4 tokens at scale 1."""
    return TeacherSpec(
        name=name,
        family="timm",
        arch="tiny_vit",
        weights="random",
        weights_sha256=None,
        input_size=BASE,
        stride=7,
        channels=channels,
        extra=(("snap_to_stride", "1"),),
    )


def tiny_schema(
    codecs: dict[str, dict[str, Any]] | None = None, tps: int = 8, store_pixels: bool = True
) -> StoreSchema:
    """Schema with teachers named by ``codecs`` (default: one fp16 teacher, two levels)."""
    codecs = codecs or {"tiny": {"name": "fp16"}}
    teachers = tuple(
        TeacherEntry(tiny_teacher(name), (LevelSpec(1.0), LevelSpec(0.5, True)), codec)
        for name, codec in codecs.items()
    )
    return StoreSchema(
        dataset="toy",
        tile_size=T,
        base_size=BASE,
        class_names=("a", "b"),
        ignore_index=255,
        tiles_per_shard=tps,
        teachers=teachers,
        store_pixels=store_pixels,
    )


def tiny_tiles(n: int, salt: str = "") -> list[TileRecord]:
    """n tiles with distinct ids and hashes; every other one georeferenced."""
    return [
        TileRecord(
            tile_id=f"t{i:03d}",
            source=f"scene{i // 4}.tif",
            window=(i // 4 * T, i % 4 * T, T, T),
            split="train" if i % 3 else "val",
            pixel_hash=f"h{i}{salt}",
            transform=(1.0, 0.0, float(i), 0.0, -1.0, 5.0) if i % 2 else None,
            crs="EPSG:32631" if i % 2 else None,
        )
        for i in range(n)
    ]


def random_shard(schema: StoreSchema, n: int, seed: int) -> dict[str, Any]:
    """Random features/images/masks for a shard of n tiles."""
    rng = np.random.default_rng(seed)
    feats = {
        e.spec.name: {
            lv.key: rng.normal(size=(n, 4, 4, C)).astype(np.float32) * 3 + 1 for lv in e.levels
        }
        for e in schema.teachers
    }
    images = rng.integers(0, 256, size=(n, T, T, 3), dtype=np.uint8)
    masks = rng.integers(0, 7, size=(n, T, T), dtype=np.uint8)
    return {"features": feats, "images": images, "masks": masks}


@pytest.fixture(params=["local", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """The same suite runs over a local directory and an fsspec memory:// store."""
    if request.param == "local":
        yield str(tmp_path / "store.zarr")
        return
    name = f"featstore-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture
def shard_data() -> Callable[[StoreSchema, int, int], dict[str, Any]]:
    """Factory for random shard contents."""
    return random_shard
