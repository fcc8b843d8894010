"""Engine tests: cached == online on the identity view, determinism, kill + resume, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featstore import open_store
from featstore.schema import LevelSpec
from featviews.draw import identity_view
from tests.helpers import (
    CLIP,
    CROP,
    DINO,
    TILE,
    build_store,
    online_source,
    tiny_config,
    warp_source,
)
from trainer.checkpoint import CheckpointError
from trainer.config import TeacherConfig
from trainer.data import collate
from trainer.engine import Trainer, TrainResult, train
from trainer.losses import NonFiniteLossError
from trainer.prepare import student_config
from trainer.step import LossSettings, compute_losses, render_batch
from trainer.student import Student


@pytest.fixture(scope="module")
def store2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six synthetic tiles, tiny DINOv2 + CLIP teachers, scale 1 only."""
    return build_store(tmp_path_factory.mktemp("store2"), teachers=(DINO, CLIP))


def _identity_batch(store, indices: list[int]) -> dict:
    items = []
    for i in indices:
        view = identity_view(TILE, CROP, CROP).with_levels(
            {n: LevelSpec(1.0) for n in store.teacher_names}
        )
        items.append(
            {
                "index": i,
                "image": torch.from_numpy(store.read_image(i)).permute(2, 0, 1).contiguous(),
                "mask": torch.from_numpy(store.read_mask(i)),
                "view": view,
                "grids": {
                    n: torch.from_numpy(store.read(n, i, "s1.00")).half()
                    for n in store.teacher_names
                },
            }
        )
    return collate(items)


def test_identity_view_cached_equals_online(store2: str, tmp_path: Path) -> None:
    from trainer.online import load_teachers

    store = open_store(store2)
    teachers = [TeacherConfig(DINO, "full"), TeacherConfig(CLIP, "clip224")]
    cfg = tiny_config(tmp_path, store2, [], teachers)
    torch.manual_seed(0)
    model = Student(student_config(cfg, 7, {DINO: 32, CLIP: 32})).eval()
    batch = _identity_batch(store, [0, 1, 2])
    views = render_batch(batch, None, torch.device("cpu"), torch.Generator(), 0.0)
    geoms = {(n, "s1.00"): store.level_geometry(n, "s1.00") for n in store.teacher_names}
    online = online_source(load_teachers(teachers, True, torch.device("cpu"), CROP))
    settings = LossSettings(masked=True)
    names = [DINO, CLIP]
    with torch.no_grad():
        cached = compute_losses(
            model, None, views, warp_source(geoms), batch, None, names, settings
        )
        live = compute_losses(model, None, views, online, batch, None, names, settings)
        # the targets themselves, against the teacher run directly on the rendered view
        t_c, v_c = warp_source(geoms)(DINO, 5, views, batch, None)
        direct = online.ctx.teachers[DINO](views.x_l)
    assert torch.allclose(t_c, direct, rtol=2e-3, atol=2e-3)
    assert bool((v_c == 1).all())
    for name in names:
        a, b = cached[f"distill/{name}"], live[f"distill/{name}"]
        assert float(a) > 0
        assert abs(float(a) - float(b)) <= 2e-3 * float(b), (name, float(a), float(b))
    assert torch.equal(cached["loss_x"], live["loss_x"])


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_same_seed_same_run_and_resume_equals_uninterrupted(store2: str, tmp_path: Path) -> None:
    ids = [t.tile_id for t in open_store(store2).tiles]
    teachers = [TeacherConfig(DINO)]
    runs = {}
    for name, stop in (("a", None), ("b", None), ("c", 2)):
        root = tmp_path / name
        root.mkdir()
        cfg = tiny_config(root, store2, ids, teachers, iters=3)
        cfg.schedule.eval_interval = 3
        cfg.schedule.stop_after = stop
        first = train(cfg)
        if stop is not None:  # "killed" after 2 iterations: resume from latest.pt
            assert first.step == 2 and first.metrics == {}
            cfg.schedule.stop_after = None
            cfg.runtime.resume = "auto"
            train(cfg)
        runs[name] = root / "run" / "latest.pt"
    a, b, c = (_weights(runs[k]) for k in "abc")
    assert a["run"]["step"] == c["run"]["step"] == 3
    for key in ("student", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"same seed differs in {key}.{k}"
            assert torch.equal(a[key][k], c[key][k]), f"resume differs in {key}.{k}"
    # json: NaN precisions (classes never predicted) compare equal as text
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"]) == json.dumps(c["metrics"])
    assert a["metrics"]["ema"]["pixels"] == 2 * TILE * TILE
    rows = (tmp_path / "c" / "run" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_resume_with_other_architecture_is_refused(store2: str, tmp_path: Path) -> None:
    ids = [t.tile_id for t in open_store(store2).tiles]
    cfg = tiny_config(tmp_path, store2, ids, [TeacherConfig(DINO)], iters=1)
    train(cfg)
    cfg.model.student = {"features": 8}
    cfg.runtime.resume = "auto"
    with pytest.raises(CheckpointError, match="another student architecture.*features"):
        train(cfg)


def test_non_finite_loss_stops_with_step_terms_and_ids(store2: str, tmp_path: Path) -> None:
    ids = [t.tile_id for t in open_store(store2).tiles]
    cfg = tiny_config(tmp_path, store2, ids, [TeacherConfig(DINO)], iters=2)
    trainer = Trainer(cfg)
    with torch.no_grad():
        for p in trainer.model.head.parameters():
            p.fill_(float("nan"))
    # the batch is named by tile ids (what verify and the split files name)
    named = r"step 0: .*loss_x=nan.*batch ids \['images/00\d'"
    with pytest.raises(NonFiniteLossError, match=named):
        trainer.run()
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_online_mode_from_a_plain_source(store2: str, tmp_path: Path) -> None:
    """No store at all: tiles from the image folder, targets from the teachers on the views."""
    src = Path(store2).parent / "syn"
    cfg = tiny_config(
        tmp_path, store2, [], [TeacherConfig(DINO), TeacherConfig(CLIP, "clip224")], iters=2
    )
    ids = sorted(p.stem for p in (src / "images").glob("*.png"))
    (tmp_path / "lab.txt").write_text("\n".join(f"images/{i}" for i in ids[:2]))
    (tmp_path / "unl.txt").write_text("\n".join(f"images/{i}" for i in ids[2:4]))
    (tmp_path / "val.txt").write_text("\n".join(f"images/{i}" for i in ids[4:]))
    cfg.mode, cfg.data.store, cfg.data.source, cfg.data.tile_size = "online", None, str(src), TILE
    result = train(cfg)
    assert result.step == 2 and all(np.isfinite(result.losses))
    ckpt = _weights(tmp_path / "run" / "latest.pt")
    assert ckpt["store"] == {} and ckpt["tile"] == {"tile_size": TILE, "base_size": CROP}


def _run_recording(cfg: Any) -> tuple[set[torch.dtype], int, TrainResult]:
    """Run ``cfg``; return the student's Linear output dtypes and its first block's call count."""
    trainer = Trainer(cfg)
    dtypes: set[torch.dtype] = set()
    calls = [0]
    for mod in trainer.model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    block = trainer.model.backbone.blocks[0]
    # a pre-hook: checkpoint recomputation stops early, before a block's forward hooks would run
    block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    result = trainer.run()
    return dtypes, calls[0], result


def test_bf16_autocast_and_activation_checkpointing_are_used(store2: str, tmp_path: Path) -> None:
    ids = [t.tile_id for t in open_store(store2).tiles]
    (tmp_path / "plain").mkdir()
    (tmp_path / "fast").mkdir()
    plain = tiny_config(tmp_path / "plain", store2, ids, [TeacherConfig(DINO)], iters=1)
    fast = tiny_config(
        tmp_path / "fast",
        store2,
        ids,
        [TeacherConfig(DINO)],
        iters=1,
        bf16=True,
        grad_checkpointing=True,
    )
    dtypes_plain, calls_plain, _ = _run_recording(plain)
    dtypes_fast, calls_fast, result = _run_recording(fast)
    assert result.step == 1 and np.isfinite(result.losses[0])
    # bf16 autocast: every Linear of the student computes in bfloat16 (float32 without it)
    assert dtypes_plain == {torch.float32}
    assert dtypes_fast == {torch.bfloat16}
    # activation checkpointing re-runs each block in backward: one more call per training forward
    assert calls_fast > calls_plain > 0


def _expected_exact_reads(store: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The cached scale-1 grids of a batch's tiles, mirrored for flipped views.

    A grid-aligned view of the only cached level (render = crop, offset 0) puts every student
    token centre on a cached token centre, so its targets are the cached tokens themselves.
    """
    out = []
    for b, view in enumerate(batch["view"]):
        grid = torch.from_numpy(store.read(DINO, int(batch["index"][b]), "s1.00")).float()
        out.append(grid.flip(1) if view.flip else grid)
    return torch.stack(out)


def test_grid_aligned_targets_are_exact_cached_tokens(store2: str, tmp_path: Path) -> None:
    st = open_store(store2)
    ids = [t.tile_id for t in st.tiles]
    cfg = tiny_config(tmp_path, store2, ids, [TeacherConfig(DINO)], iters=2)
    cfg.distill.target_mode = "grid_aligned"
    cfg.fixmatch.cutmix_p = 0.0  # CutMix would mix two tiles' targets
    trainer = Trainer(cfg)
    views = [trainer.loaders.ds_u.draw(k) for k in range(20)]
    # the only cached level renders at 70 px = crop: the only grid-aligned offset is 0
    assert all((v.size, v.oy, v.ox) == (CROP, 0, 0) for v in views)
    assert {v.flip for v in views} == {False, True}
    seen: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]] = []
    provider = trainer.method.source

    def recording(name: str, n: int, views: Any, batch_l: Any, batch_u: Any) -> Any:
        target, valid = provider(name, n, views, batch_l, batch_u)
        seen.append((target.detach().cpu(), batch_l, batch_u))
        return target, valid

    trainer.method.source = recording
    assert trainer.run().step == 2
    assert len(seen) == 2
    for target, batch_l, batch_u in seen:
        want = torch.cat([_expected_exact_reads(st, batch_l), _expected_exact_reads(st, batch_u)])
        assert torch.equal(target, want)  # bit-exact: no interpolation anywhere
