"""Training in ``view_bank`` target mode: bank targets in a real step equal the online teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featstore import open_store
from featviews.sources import ViewBankSource
from tests.helpers import (
    CLIP,
    DINO,
    build_store,
    online_source,
    ref_level_targets,
    ref_resample,
    tiny_config,
)
from trainer.checks import DataCheckError
from trainer.config import TeacherConfig
from trainer.engine import Trainer

K = 3
TEACHERS = [TeacherConfig(DINO, "full"), TeacherConfig(CLIP, "clip224")]


@pytest.fixture(scope="module")
def bank_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six synthetic tiles, tiny DINOv2 + CLIP teachers (levels 1 and 2), a K=3 bank of both."""
    from pipelines.viewbank import build_view_bank

    url = build_store(tmp_path_factory.mktemp("vb"), teachers=(DINO, CLIP), scales=(1.0, 2.0))
    return build_view_bank(url, tiny=True, k=K, seed=5, batch_size=8)


class Recorder:
    """Wraps a target provider and keeps what each call of a training step saw and returned."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int, Any, Any, Any, torch.Tensor, torch.Tensor]] = []

    def __call__(
        self, name: str, n: int, views: Any, batch_l: Any, batch_u: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        target, valid = self.inner(name, n, views, batch_l, batch_u)
        self.calls.append((name, n, views, batch_l, batch_u, target.clone(), valid.clone()))
        return target, valid


def _config(root: Path, url: str, iters: int = 2, p_bank: float = 1.0) -> Any:
    ids = [t.tile_id for t in open_store(url).tiles]
    cfg = tiny_config(root, url, ids, TEACHERS, iters=iters)
    cfg.distill.target_mode = "view_bank"
    cfg.distill.p_bank = p_bank
    return cfg


def test_bank_targets_in_a_step_equal_online_teachers(bank_url: str, tmp_path: Path) -> None:
    from trainer.online import load_teachers

    cfg = _config(tmp_path, bank_url)
    cfg.fixmatch.cutmix_p = 0.0  # strong view == weak view == the bank view the teacher saw
    cfg.fixmatch.photometric = False
    trainer = Trainer(cfg)
    assert isinstance(trainer.method.source, ViewBankSource)
    assert trainer.bank_reuse == pytest.approx(2 * 4 / (4 * K))  # 2 iters x 4 views, 4 tiles
    recorder = Recorder(trainer.method.source)
    trainer.method.source = recorder
    result = trainer.run()
    assert result.step == 2 and np.isfinite(result.losses).all()
    # independent path: the registry teachers on the trainer's own rendered views
    online = online_source(load_teachers(TEACHERS, True, torch.device("cpu"), 70))
    store = open_store(bank_url)
    seen = set()
    assert len(recorder.calls) == 2 * len(TEACHERS)
    for name, n, views, batch_l, batch_u, target, valid in recorder.calls:
        assert n == (16 if name == CLIP else 5)
        slots = torch.cat([batch_l["bank_slot"], batch_u["bank_slot"]])
        assert bool((slots >= 0).all())
        # each item's view is the bank row of its slot
        for batch in (batch_l, batch_u):
            for i, s, v in zip(
                batch["index"].tolist(), batch["bank_slot"].tolist(), batch["view"], strict=True
            ):
                row = store.bank.params(i)[s]
                assert (v.size, v.oy, v.ox, int(v.flip)) == tuple(int(x) for x in row)
                seen.add((v.size, v.flip))
        with torch.no_grad():
            want, want_valid = online(name, n, views, batch_l, batch_u)
        tol = 2.0**-10 * float(want.abs().max())  # fp16 storage of the bank grids
        assert float((target - want).abs().max()) <= tol, name
        torch.testing.assert_close(valid, want_valid)
    assert len(seen) > 2  # several zooms (and flips) were exercised


def _ref_item(store: Any, name: str, n: int, batch: Any, b: int) -> np.ndarray:
    """By hand: a bank item's bank grid at the student centres, or its cached level via the view."""
    index, slot, view = int(batch["index"][b]), int(batch["bank_slot"][b]), batch["view"][b]
    if slot >= 0:
        spec, base = store.schema.teacher(name).spec, store.schema.base_size
        grid = store.bank.read(name, index, slot)
        return ref_resample(grid, spec.input_px(view.crop, base), spec.stride, n)
    key = view.levels[name].key
    grid = store.read(name, index, key).astype(np.float16)  # what the loader hands over
    return ref_level_targets(grid, view, store.level_geometry(name, key), n)


def _ref_cutmix(own: np.ndarray, boxes: Any, view: int) -> np.ndarray:
    """Official target CutMix by hand: token cells mix by their area inside the box."""
    n = own.shape[1]
    cell = view / n

    def overlap(lo: int, length: int) -> np.ndarray:
        return np.array(
            [
                max(0.0, min((i + 1) * cell, lo + length) - max(i * cell, lo)) / cell
                for i in range(n)
            ]
        )

    out = own.copy()
    for b, (y, x, h, w) in enumerate(np.asarray(boxes, dtype=np.int64)):
        a = np.outer(overlap(y, h), overlap(x, w))[..., None]
        out[b] = (1 - a) * own[b] + a * own[len(own) - 1 - b]  # partner: the batch reversed
    return out


def test_mixed_bank_and_warped_run_uses_both_sources(bank_url: str, tmp_path: Path) -> None:
    cfg = _config(tmp_path, bank_url, iters=2, p_bank=0.5)  # colour + CutMix on (defaults)
    cfg.schedule.eval_interval = 2
    trainer = Trainer(cfg)
    slots = [trainer.loaders.ds_u[k]["bank_slot"] for k in range(16)]
    assert min(slots) == -1 and max(slots) >= 0  # both kinds of views occur
    recorder = Recorder(trainer.method.source)
    trainer.method.source = recorder
    result = trainer.run()
    assert result.step == 2 and np.isfinite(result.losses).all()
    assert (tmp_path / "run" / "latest.pt").is_file() and "ema" in result.metrics
    store = open_store(bank_url)
    kinds = set()
    for name, n, views, batch_l, batch_u, target, _ in recorder.calls:
        own_l = np.stack(
            [_ref_item(store, name, n, batch_l, b) for b in range(len(batch_l["view"]))]
        )
        own_u = np.stack(
            [_ref_item(store, name, n, batch_u, b) for b in range(len(batch_u["view"]))]
        )
        want = np.concatenate([own_l, _ref_cutmix(own_u, views.boxes, views.geom_u.crop)])
        np.testing.assert_allclose(
            target.double().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=name
        )
        kinds |= {int(s) >= 0 for s in torch.cat([batch_l["bank_slot"], batch_u["bank_slot"]])}
    assert kinds == {True, False}  # the steps themselves read both sources


def test_view_bank_errors_name_the_fix(bank_url: str, tmp_path: Path) -> None:
    cfg = _config(tmp_path, bank_url)
    cfg.crop_size = 84
    with pytest.raises(DataCheckError, match=r"70 px views but crop_size is 84.*crop_size 70"):
        Trainer(cfg)
    plain = build_store(tmp_path / "plain", n_images=4)
    cfg = _config(tmp_path, plain)
    cfg.model.teachers = [TeacherConfig(DINO)]
    with pytest.raises(DataCheckError, match="has none: build one with `featcache bank"):
        Trainer(cfg)
