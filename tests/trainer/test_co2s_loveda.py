"""A short Co2S run on the real LoveDA sample: the losses fall, the same seed gives the same
metrics, and a killed and resumed run gives them too.

The three LoveDA scenes cut into 128 px tiles (the store of test_engine_loveda.py), class text
rows from the tiny random text tower of `featcache text` (LoveDA's built-in concept lists), the
real tiny students. This shows the method runs and learns real imagery end to end, not the
accuracy Co2S reaches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore import open_store
from tests.helpers import write_ids
from tests.trainer.test_engine_loveda import extract_loveda
from trainer.config import TrainConfig
from trainer.engine import train

CROP = 64  # a multiple of the students' patch 16, half a 128 px tile
ITERS = 20
KILL = 7


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Tiny models run faster on one thread than on two busy cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loveda_text_store(loveda_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipelines.text import TextConfig, run_text

    url = extract_loveda(loveda_sample, tmp_path_factory.mktemp("co2s_loveda"))
    run_text(TextConfig(url, concepts="builtin", tiny=True))
    return url


def _config(url: str, folder: Path, stop_after: int | None = None) -> TrainConfig:
    """Tiny students, 4+2 views of the first scene's tiles, 4 held-out tiles of each scene."""
    ids = [t.tile_id for t in open_store(url).tiles]
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(method="co2s", mode="cached", crop_size=CROP)
    cfg.data.store = url
    cfg.data.labeled = write_ids(folder / "l.txt", ids[0:64:4])
    cfg.data.unlabeled = write_ids(folder / "u.txt", ids[1:64:2])
    cfg.data.val = write_ids(folder / "v.txt", [ids[i] for i in (2, 66, 130, 190)])
    cfg.data.num_workers = 0
    cfg.data.scale_range = (0.5, 1.0)  # 128 px tiles in a 64 px crop: keep the context
    cfg.model.tiny = True
    # random init: far above the official rates (measured: head 1e-2 collapses to ln 7)
    cfg.co2s.lr_backbone, cfg.co2s.lr_head, cfg.co2s.lr_queries = 1e-3, 3e-3, 3e-3
    cfg.schedule.batch_labeled, cfg.schedule.batch_unlabeled = 4, 2
    cfg.schedule.iters, cfg.schedule.eval_interval = ITERS, ITERS
    cfg.schedule.stop_after = stop_after
    cfg.runtime.out_dir = str(folder / "run")
    cfg.runtime.device = "cpu"
    cfg.runtime.progress = False
    cfg.runtime.tensorboard = False
    return cfg


@pytest.mark.real_data
def test_co2s_on_loveda_learns_and_replays(
    loveda_text_store: str, tmp_path: Path, one_thread: None
) -> None:
    url = loveda_text_store
    first = train(_config(url, tmp_path / "a"))
    again = train(_config(url, tmp_path / "b"))
    killed = train(_config(url, tmp_path / "c", stop_after=KILL))
    assert killed.step == KILL
    cfg = _config(url, tmp_path / "c")
    cfg.runtime.resume = "auto"
    resumed = train(cfg)

    losses = np.asarray(first.losses)
    assert losses[-5:].mean() < 0.95 * losses[:5].mean(), losses  # measured 1.62 vs 1.87
    assert set(first.metrics) == {"clip", "dinov3", "fused"}
    # 4 held-out 128 px tiles, every pixel labeled or ignored: the matrix counts them all
    assert 0 < first.metrics["fused"]["pixels"] <= 4 * 128 * 128
    same = json.dumps(first.metrics, sort_keys=True)
    assert json.dumps(again.metrics, sort_keys=True) == same, "same seed, other metrics"
    assert json.dumps(resumed.metrics, sort_keys=True) == same, "kill + resume, other metrics"
    assert again.losses == first.losses and resumed.losses == first.losses[KILL:]
