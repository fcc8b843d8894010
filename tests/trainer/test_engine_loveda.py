"""A short cached run on real LoveDA tiles: the loss falls and the model beats a constant map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_engine_utils import DINO, write_ids

from featstore import open_store
from trainer.config import TeacherConfig, TrainConfig
from trainer.engine import train

TILE, CROP = 128, 70


@pytest.mark.slow  # ~40 s idle, >90 s on a loaded 2-core box
@pytest.mark.real_data
def test_short_loveda_run_learns(loveda_sample: Path, tmp_path: Path) -> None:
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction

    url = run_extraction(ExtractConfig(
        source=str(loveda_sample), out=str(tmp_path / "store.zarr"), teachers=(DINO,),
        tiny=True, tile_size=TILE, base_size=CROP, tiles_per_shard=16, batch_size=16, limit=64),
        progress=False)
    store = open_store(url)
    ids = [t.tile_id for t in store.tiles]  # the 64 tiles of the first scene
    # many tiles hold one class only: rank by class diversity so val is a real test
    div = [len(set(np.unique(store.read_mask(i)).tolist()) - {255}) for i in range(len(ids))]
    ranked = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-div[i], i))]
    lab, val, unl = ranked[0:24:2], ranked[1:16:2], ranked[24:40]
    cfg = TrainConfig(mode="cached", crop_size=CROP)
    cfg.data.store = url
    cfg.data.labeled = write_ids(tmp_path / "l.txt", lab)
    cfg.data.unlabeled = write_ids(tmp_path / "u.txt", unl)
    cfg.data.val = write_ids(tmp_path / "v.txt", val)
    cfg.data.num_workers = 0
    cfg.model.teachers = [TeacherConfig(DINO)]
    cfg.model.tiny = True
    cfg.optim.lr, cfg.optim.lr_multi = 2e-3, 5.0  # random init: far above the fine-tune lr
    cfg.schedule.batch_labeled = cfg.schedule.batch_unlabeled = 4
    cfg.schedule.iters = 25
    cfg.schedule.eval_interval = 25
    cfg.runtime.out_dir = str(tmp_path / "run")
    cfg.runtime.device = "cpu"
    cfg.runtime.progress = False
    cfg.runtime.tensorboard = False
    result = train(cfg)
    losses = np.asarray(result.losses)
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses
    # the constant predictor of the val set's majority class, counted independently
    masks = np.stack([store.read_mask(ids.index(t)) for t in val])
    counts = np.bincount(masks[masks != 255].ravel(), minlength=7)
    # IoU of the majority class; the other present classes score 0, absent ones are skipped
    const_oa = counts.max() / counts.sum()
    const_miou = const_oa / np.count_nonzero(counts)
    print("constant", const_miou, const_oa, "losses", losses[:5].mean(), losses[-5:].mean())
    m = result.metrics["student"]  # the EMA lags behind early in a run this short
    assert m["miou"] > const_miou or m["oa"] > const_oa, (m, const_miou, const_oa)
