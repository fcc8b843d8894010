"""Shared builders of the trainer tests (no tests here): tiny synthetic stores and configs.

Other test files import this module by path (``tests/trainer`` is not a package).
"""

from __future__ import annotations

from pathlib import Path

from trainer.config import TeacherConfig, TrainConfig

TILE = 64
CROP = 70  # a multiple of 14; also the store's base_size so that scale 1 is the identity view
DINO, CLIP = "dinov2_vitb14", "clip_vitl14"


def build_store(root: Path, n_images: int = 6, teachers: tuple[str, ...] = (DINO,),
                scales: tuple[float, ...] = (1.0,), flip: bool = False, seed: int = 0,
                tiles_per_shard: int = 2, source: Path | None = None) -> str:
    """Synthetic scenes (one tile each) extracted with tiny teachers by the real pipeline."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction
    from pipelines.synthetic import generate_synthetic

    if source is None:
        source = generate_synthetic(root / "syn", n_images=n_images, size=TILE, seed=seed)
    cfg = ExtractConfig(source=str(source), out=str(root / "store.zarr"), teachers=teachers,
                        tiny=True, scales=scales, flip=flip, tile_size=TILE, base_size=CROP,
                        tiles_per_shard=tiles_per_shard, batch_size=8)
    return run_extraction(cfg, progress=False)


def write_ids(path: Path, ids: list[str]) -> str:
    """A tile-id list file."""
    path.write_text("\n".join(ids) + "\n")
    return str(path)


def tiny_config(root: Path, store: str, ids: list[str], teachers: list[TeacherConfig],
                n_lab: int = 2, n_unl: int = 2, iters: int = 4, **runtime: object) -> TrainConfig:
    """Cached-mode config over ``ids`` split into labeled / unlabeled / val lists."""
    cfg = TrainConfig(mode="cached", crop_size=CROP)
    cfg.data.store = store
    cfg.data.labeled = write_ids(root / "lab.txt", ids[:n_lab])
    cfg.data.unlabeled = write_ids(root / "unl.txt", ids[n_lab:n_lab + n_unl])
    cfg.data.val = write_ids(root / "val.txt", ids[n_lab + n_unl:])
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
