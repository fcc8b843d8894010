"""Shared builders of the tests (no tests here): tiny synthetic stores and configs.

Test files import it as ``tests.helpers`` (pyproject's ``pythonpath = ["."]`` puts the repository
root on the path). Its name does not start with ``test_``, so pytest does not collect it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import TeacherConfig, TrainConfig

TILE = 64
CROP = 70  # a multiple of 14; also the store's base_size so that scale 1 is the identity view
DINO, CLIP = "dinov2_vitb14", "clip_vitl14"


def build_store(
    root: Path,
    n_images: int = 6,
    teachers: tuple[str, ...] = (DINO,),
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    seed: int = 0,
    tiles_per_shard: int = 2,
    source: Path | None = None,
    codec: dict[str, Any] | None = None,
    keep_padding: bool = True,
) -> str:
    """Synthetic scenes (one tile each) extracted with tiny teachers by the real pipeline
    (``codec``: the store's codec, default fp16; ``keep_padding=False``: ``--crop-padding``)."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction
    from pipelines.synthetic import generate_synthetic

    if source is None:
        source = generate_synthetic(root / "syn", n_images=n_images, size=TILE, seed=seed)
    cfg = ExtractConfig(
        source=str(source),
        out=str(root / "store.zarr"),
        teachers=teachers,
        tiny=True,
        scales=scales,
        flip=flip,
        tile_size=TILE,
        base_size=CROP,
        tiles_per_shard=tiles_per_shard,
        batch_size=8,
        codec=codec or {"name": "fp16"},
        keep_padding=keep_padding,
    )
    return run_extraction(cfg, progress=False)


def write_ids(path: Path, ids: list[str]) -> str:
    """A tile-id list file."""
    path.write_text("\n".join(ids) + "\n")
    return str(path)


def tiny_run_args(root: Path) -> list[str]:
    """``featcache train`` options of a tiny CPU run: the tiny student at ``CROP``, batch 2+2, the
    sets ``root/{l,u,v}.txt`` (written with `write_ids`), no workers, no progress bar. The caller
    adds ``train``, the store, ``--out`` and whatever the test is about."""
    return [
        "--tiny", "--crop", str(CROP), "--batch", "2+2",
        "--labeled", str(root / "l.txt"), "--unlabeled", str(root / "u.txt"),
        "--val", str(root / "v.txt"),
        "--device", "cpu", "--workers", "0", "--no-progress",
    ]  # fmt: skip


def tiny_config(
    root: Path,
    store: str,
    ids: list[str],
    teachers: list[TeacherConfig],
    n_lab: int = 2,
    n_unl: int = 2,
    iters: int = 4,
    **runtime: object,
) -> TrainConfig:
    """Cached-mode config over ``ids`` split into labeled / unlabeled / val lists."""
    cfg = TrainConfig(mode="cached", crop_size=CROP)
    cfg.data.store = store
    cfg.data.labeled = write_ids(root / "lab.txt", ids[:n_lab])
    cfg.data.unlabeled = write_ids(root / "unl.txt", ids[n_lab : n_lab + n_unl])
    cfg.data.val = write_ids(root / "val.txt", ids[n_lab + n_unl :])
    cfg.data.num_workers = 0
    cfg.model.teachers = teachers
    cfg.model.tiny = True
    cfg.schedule.batch_labeled = 2
    cfg.schedule.batch_unlabeled = 2
    cfg.schedule.iters = iters
    cfg.schedule.log_interval = 1
    cfg.runtime.out_dir = str(root / "run")
    cfg.runtime.device = "cpu"
    cfg.runtime.progress = False
    cfg.runtime.tensorboard = False
    for k, v in runtime.items():
        setattr(cfg.runtime, k, v)
    return cfg


# Reference target sampling, written out from the contract (docs: student token centre
# (i + 0.5) V / n -> view px -> tile px -> level token coordinate, bilinear with border clamp), one
# token at a time in float64 numpy. Tests compare the vectorised torch code against it.


def ref_bilinear(grid: np.ndarray, uy: float, ux: float) -> np.ndarray:
    """Bilinear read of ``grid[g, g, C]`` at token coordinates (token centre = integer), clamped."""
    g = grid.shape[0]
    uy, ux = min(max(uy, 0.0), g - 1.0), min(max(ux, 0.0), g - 1.0)
    y0, x0 = min(math.floor(uy), max(g - 2, 0)), min(math.floor(ux), max(g - 2, 0))
    y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
    fy, fx = uy - y0, ux - x0
    grid = grid.astype(np.float64)
    return (
        grid[y0, x0] * (1 - fy) * (1 - fx)
        + grid[y0, x1] * (1 - fy) * fx
        + grid[y1, x0] * fy * (1 - fx)
        + grid[y1, x1] * fy * fx
    )


def ref_level_targets(grid: np.ndarray, view: Any, level: Any, n: int) -> np.ndarray:
    """``[n, n, C]`` targets of ``view`` (``ViewParams``) read from a cached level's grid.

    ``level`` is the level's ``LevelGeometry``; only its token pitch (``tokens_per_tile_px``),
    orientation and tile size are used.
    """
    f, crop = level.tokens_per_tile_px, view.crop
    out = np.zeros((n, n, grid.shape[-1]))
    for i in range(n):
        for j in range(n):
            vy, vx = (i + 0.5) * crop / n, (j + 0.5) * crop / n
            zy, zx = vy + view.oy, (crop - vx if view.flip else vx) + view.ox  # zoomed tile px
            ty, tx = zy * view.tile / view.size, zx * view.tile / view.size
            if level.level.flipped:
                tx = level.tile_size - tx
            out[i, j] = ref_bilinear(grid, ty * f - 0.5, tx * f - 0.5)
    return out


def ref_resample(grid: np.ndarray, input_px: int, stride: int, n: int) -> np.ndarray:
    """``[n, n, C]``: a teacher grid computed on the whole view, read at the student centres.

    The teacher saw the view resized to ``input_px``; its token ``j`` is centred at input px
    ``(j + 0.5) stride`` and student centre ``i`` at input px ``(i + 0.5) input_px / n``.
    """
    u = [(i + 0.5) * input_px / n / stride - 0.5 for i in range(n)]
    out = np.zeros((n, n, grid.shape[-1]))
    for i in range(n):
        for j in range(n):
            out[i, j] = ref_bilinear(grid, u[i], u[j])
    return out


# Target sources built as the trainer builds them (featviews.sources), for tests that drive a
# source by hand.


def warp_source(level_geoms: Any = None, store: Any = None, levels: Any = None, **sampling: Any):
    """A ``warp`` source over ``level_geoms`` (and ``store``/``levels`` to draw and read items)."""
    from featviews.sources import SourceContext, ViewSampling, WarpSource

    view = ViewSampling(sampling.pop("tile", TILE), CROP, CROP, **sampling)
    return WarpSource(SourceContext(view, levels or {}, level_geoms or {}, store))


def online_source(teachers: Any, masked: bool = True):
    """An ``online`` source running ``teachers`` (by name) on the views."""
    from featviews.sources import OnlineSource, SourceContext, ViewSampling

    return OnlineSource(
        SourceContext(ViewSampling(TILE, CROP, CROP), teachers=teachers, masked=masked)
    )
