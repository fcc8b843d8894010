"""The method seam: registries, and the supervised-only baseline trained by the same engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from featstore import open_store
from featstore.constants import IGNORE_INDEX
from featviews.sources import SOURCES
from tests.helpers import DINO, build_store, tiny_config
from trainer.config import METHOD_NAMES, ONLINE_SOURCE, TARGET_MODES, TeacherConfig
from trainer.engine import Trainer
from trainer.errors import TrainConfigError
from trainer.methods import METHODS, RSMTDF, Supervised
from trainer.presets import OFFICIAL, departures


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_store(tmp_path_factory.mktemp("methods"), n_images=6)


def _ids(url: str) -> list[str]:
    return [t.tile_id for t in open_store(url).tiles]


def test_config_names_equal_the_registries() -> None:
    """The torch-free lists the CLI offers are the registries' keys, in the same order."""
    assert tuple(METHODS) == METHOD_NAMES
    assert set(SOURCES) == set(TARGET_MODES) | {ONLINE_SOURCE}
    assert [SOURCES[m].reads_cache for m in TARGET_MODES] == [True] * len(TARGET_MODES)
    assert not SOURCES[ONLINE_SOURCE].reads_cache


def test_rs_mtdf_is_the_default_method(store: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, store, _ids(store), [TeacherConfig(DINO)], iters=1)
    trainer = Trainer(cfg)
    assert type(trainer.method) is RSMTDF and trainer.loaders.ds_u is not None


def test_supervised_refuses_named_teachers(store: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, store, _ids(store), [TeacherConfig(DINO)], iters=1)
    cfg.method = "supervised"
    with pytest.raises(TrainConfigError, match="--method supervised trains without teachers"):
        Trainer(cfg)


def _supervised(tmp_path: Path, store: str, iters: int = 2) -> Any:
    cfg = tiny_config(tmp_path, store, _ids(store), None, iters=iters)
    cfg.method = "supervised"
    return cfg


def test_supervised_step_is_cross_entropy_on_labeled_views(store: str, tmp_path: Path) -> None:
    """One step: labeled views only, and the loss is torch's CE (ignore 255) on those views."""
    trainer = Trainer(_supervised(tmp_path, store))
    assert type(trainer.method) is Supervised
    assert trainer.loaders.ds_u is None  # no unlabeled stream at all
    assert not trainer.model.translators  # no teacher heads
    seen: list[Any] = []
    losses = trainer.method.losses

    def spy(model: Any, ema: Any, batch_l: Any, batch_u: Any, gen: Any) -> Any:
        from featviews.geometry import ViewGeometry
        from featviews.render import render_masks, render_views
        from trainer.step import normalize

        # the expected loss, from the weights before this step: CE written with torch alone
        with torch.no_grad():
            geom = ViewGeometry.from_params(batch_l["view"])
            x = render_views(batch_l["image"], geom)
            y = render_masks(batch_l["mask"], geom, IGNORE_INDEX)
            logits = model(normalize(x), need_translated=False).logits
            want = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        terms = losses(model, ema, batch_l, batch_u, gen)
        seen.append((batch_u, float(terms["loss"].detach()), float(want), len(batch_l["view"])))
        return terms

    trainer.method.losses = spy
    result = trainer.run()
    assert result.step == 2 and len(seen) == 2
    for batch_u, got, want, n in seen:
        assert batch_u is None and n == 2
        assert got == pytest.approx(want, rel=1e-6)
    assert set(result.metrics) == {"student", "ema"}


def test_supervised_run_records_its_method_and_recipe(store: str, tmp_path: Path) -> None:
    cfg = _supervised(tmp_path, store, iters=1)
    trainer = Trainer(cfg)
    trainer.run()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == "supervised" and saved["distill"]["enabled"] is False
    assert trainer.summary[0].startswith("method supervised: labeled views only")
    # FixMatch / distillation / translator entries of the recipe do not apply to it
    keys = {d.key for d in departures(trainer.cfg)}
    assert not {k for k in keys if k.startswith(("fixmatch.", "distill."))}
    assert "schedule.batch_unlabeled" not in keys
    # ... while a shared entry still counts: another learning rate is a departure
    trainer.cfg.optim.lr = OFFICIAL["optim.lr"][0] * 2
    assert "optim.lr" in {d.key for d in departures(trainer.cfg)}


def test_unknown_method_names_the_choices(store: str, tmp_path: Path) -> None:
    cfg = _supervised(tmp_path, store)
    cfg.method = "mean-teacher"
    with pytest.raises(TrainConfigError, match=r"method \(--method\) = 'mean-teacher'"):
        cfg.validate()
