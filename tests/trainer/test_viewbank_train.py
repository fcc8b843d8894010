"""Training in ``view_bank`` target mode: bank targets in a real step equal the online teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_engine_utils import CLIP, DINO, build_store, tiny_config

from featstore import open_store
from trainer.checks import DataCheckError
from trainer.config import TeacherConfig
from trainer.engine import Trainer
from trainer.viewbank import BankTargets

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

    def __call__(self, name: str, n: int, views: Any, batch_l: Any, batch_u: Any
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
    from trainer.online import OnlineTargets, load_teachers

    cfg = _config(tmp_path, bank_url)
    cfg.fixmatch.cutmix_p = 0.0  # strong view == weak view == the bank view the teacher saw
    cfg.fixmatch.photometric = False
    trainer = Trainer(cfg)
    assert isinstance(trainer.targets, BankTargets)
    assert trainer.bank_reuse == pytest.approx(2 * 4 / (4 * K))  # 2 iters x 4 views, 4 tiles
    recorder = Recorder(trainer.targets)
    trainer.targets = recorder
    result = trainer.run()
    assert result.step == 2 and np.isfinite(result.losses).all()
    # independent path: the registry teachers on the trainer's own rendered views
    online = OnlineTargets(load_teachers(TEACHERS, True, torch.device("cpu"), 70))
    store = open_store(bank_url)
    seen = set()
    assert len(recorder.calls) == 2 * len(TEACHERS)
    for name, n, views, batch_l, batch_u, target, valid in recorder.calls:
        assert n == (16 if name == CLIP else 5)
        slots = torch.cat([batch_l["bank_slot"], batch_u["bank_slot"]])
        assert bool((slots >= 0).all())
        # each item's view is the bank row of its slot
        for batch in (batch_l, batch_u):
            for i, s, v in zip(batch["index"].tolist(), batch["bank_slot"].tolist(),
                               batch["view"], strict=True):
                row = store.bank.params(i)[s]
                assert (v.size, v.oy, v.ox, int(v.flip)) == tuple(int(x) for x in row)
                seen.add((v.size, v.flip))
        with torch.no_grad():
            want, want_valid = online(name, n, views, batch_l, batch_u)
        tol = 2.0**-10 * float(want.abs().max())  # fp16 storage of the bank grids
        assert float((target - want).abs().max()) <= tol, name
        torch.testing.assert_close(valid, want_valid)
    assert len(seen) > 2  # several zooms (and flips) were exercised


def test_mixed_bank_and_warped_run_completes(bank_url: str, tmp_path: Path) -> None:
    cfg = _config(tmp_path, bank_url, iters=2, p_bank=0.5)  # colour + CutMix on (defaults)
    cfg.schedule.eval_interval = 2
    trainer = Trainer(cfg)
    slots = [trainer.loaders.ds_u[k]["bank_slot"] for k in range(16)]
    assert min(slots) == -1 and max(slots) >= 0  # both kinds of views occur
    result = trainer.run()
    assert result.step == 2 and np.isfinite(result.losses).all()
    assert (tmp_path / "run" / "latest.pt").is_file() and "ema" in result.metrics


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
