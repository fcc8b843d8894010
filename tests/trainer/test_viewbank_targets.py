"""View bank in training: bank targets equal the online teacher on the same view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featstore import LevelSpec, StoreSchema, TeacherEntry, TileRecord, create_store, open_store
from featstore.geometry import LevelGeometry
from featviews.bank import (
    NO_SLOT,
    bank_reuse,
    bank_targets_to_student,
    bank_view,
    draw_bank_item,
    load_bank_targets,
)
from featviews.draw import ViewParams
from featviews.geometry import ViewGeometry, token_valid
from featviews.render import render_views
from featviews.sample import resample_to_student
from featviews.sources import SourceContext, ViewBankSource, ViewSampling
from pipelines.teachers import create_teacher
from pipelines.viewbank import build_view_bank
from tests.helpers import ref_level_targets, ref_resample

T, BASE, N, K = 64, 70, 4, 3
TEACHER = "dinov2_vitb14"


def _teacher() -> Any:
    # create_teacher seeds random init, so this is the network that filled the store.
    return create_teacher(TEACHER, tiny=True, base_size=BASE)


@pytest.fixture(scope="module")
def bank_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, np.ndarray]:
    """A store of 4 random tiles, levels s1.00 and s2.00 from the tiny teacher, K=3 bank."""
    teacher = _teacher()
    levels = (LevelSpec(1.0), LevelSpec(2.0))
    schema = StoreSchema("toy", T, BASE, ("a",), 255, 2, (TeacherEntry(teacher.spec, levels),))
    tiles = [TileRecord(f"t{i}", "src", (0, 0, T, T), "train", f"h{i}") for i in range(N)]
    url = str(Path(tmp_path_factory.mktemp("bank")) / "s.zarr")
    writer = create_store(url, schema, tiles)
    images = np.random.default_rng(0).integers(0, 256, (N, T, T, 3), dtype=np.uint8)
    for s in writer.pending_shards():
        r = writer.shard_tiles(s)
        feats = {}
        for lv in levels:  # the levels' contents only matter for the warped-view rows
            g = LevelGeometry.from_specs(T, BASE, lv, teacher.spec).grid
            feats[lv.key] = (
                np.random.default_rng(s)
                .normal(size=(len(r), g, g, teacher.spec.channels))
                .astype(np.float32)
            )
        writer.write_shard(
            s, {TEACHER: feats}, images[r.start : r.stop], np.zeros((len(r), T, T), np.uint8)
        )
    writer.finalize()
    build_view_bank(url, tiny=True, k=K, seed=11, batch_size=4)
    return open_store(url), images


def _online(teacher: Any, image: np.ndarray, view: ViewParams, n: int) -> torch.Tensor:
    """Online mode, independently: render the view (trainer.augment), run the teacher, resample."""
    geom = ViewGeometry.from_params([view])
    x = render_views(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0), geom)
    grid = teacher(x)
    return resample_to_student(grid, teacher.input_px(view.crop), teacher.spec.stride, view.crop, n)


@pytest.mark.parametrize("n", [5, 7])
def test_bank_targets_equal_online_teacher(bank_store: tuple[Any, np.ndarray], n: int) -> None:
    store, images = bank_store
    teacher = _teacher()
    spec = store.schema.teacher(TEACHER).spec
    for i in range(N):
        for slot in range(K):
            size, oy, ox, flip = (int(v) for v in store.bank.params(i)[slot])
            view = ViewParams(size, oy, ox, bool(flip), T, BASE)
            online = _online(teacher, images[i], view, n)
            grid = load_bank_targets(store, TEACHER, i, slot)
            bank = bank_targets_to_student(grid, spec, BASE, n, BASE)
            # fp16 storage: |err| <= 2**-11 |x| (+ render float noise through the teacher)
            tol = 2.0**-10 * online.abs().max().item()
            assert (bank - online).abs().max().item() <= tol
    assert (store.bank.params()[..., 3] == 1).any()  # flipped views were covered


def test_bank_view_draws_bank_rows_and_warped_views(bank_store: tuple[Any, np.ndarray]) -> None:
    store, _ = bank_store
    rng = np.random.default_rng(0)
    slots = set()
    for _ in range(30):
        view, slot = bank_view(store, 2, rng, p_bank=1.0)
        row = store.bank.params(2)[slot]
        assert (view.size, view.oy, view.ox, int(view.flip)) == tuple(int(v) for v in row)
        assert (view.tile, view.crop) == (T, BASE)
        slots.add(slot)
    assert slots == set(range(K))
    warped = [bank_view(store, 2, rng, p_bank=0.0) for _ in range(30)]
    assert all(slot == NO_SLOT and T // 2 <= v.size <= 2 * T for v, slot in warped)
    mixed = [bank_view(store, 2, rng, p_bank=0.5)[1] for _ in range(400)]
    assert 0.4 < np.mean(np.array(mixed) >= 0) < 0.6
    with pytest.raises(ValueError, match="p_bank"):
        bank_view(store, 2, rng, p_bank=1.5)


def test_bank_targets_provider_mixes_bank_and_levels(bank_store: tuple[Any, np.ndarray]) -> None:
    store, _ = bank_store
    spec = store.schema.teacher(TEACHER).spec
    levels = {TEACHER: store.levels(TEACHER)}
    rng = np.random.default_rng(3)
    items = [draw_bank_item(store, i % N, rng, levels, p_bank=0.5) for i in range(12)]
    assert {slot >= 0 for _, slot, _ in items} == {True, False}
    batch = {
        "bank_slot": torch.tensor([s for _, s, _ in items]),
        "grids": {TEACHER: [torch.from_numpy(g[TEACHER]) for _, _, g in items]},
        "view": [v for v, _, _ in items],
    }
    geom = ViewGeometry.from_params(batch["view"])
    geoms = {(TEACHER, lv.key): store.level_geometry(TEACHER, lv) for lv in levels[TEACHER]}
    ctx = SourceContext(ViewSampling(T, BASE, BASE), levels, geoms, store)
    provider = ViewBankSource(ctx)
    n = 5
    targets, valid = provider.stream_targets(TEACHER, n, batch, geom)
    torch.testing.assert_close(valid, token_valid(geom, n))
    input_px = spec.input_px(BASE, BASE)  # bank views are rendered at the store's base size
    for b, (view, slot, _) in enumerate(items):
        i = b % N
        if slot >= 0:  # the bank grid of that slot, read at the student centres
            grid = store.bank.read(TEACHER, i, slot)
            want = ref_resample(grid, input_px, spec.stride, n)
        else:  # the nearest cached level, sampled through the view geometry
            key = view.levels[TEACHER].key
            grid = store.read(TEACHER, i, key)
            want = ref_level_targets(grid, view, store.level_geometry(TEACHER, key), n)
        torch.testing.assert_close(
            targets[b].double(), torch.from_numpy(want), rtol=1e-5, atol=1e-5
        )


def _count_bank_uses(store: Any, iterations: int, batch: int, p_bank: float) -> np.ndarray:
    """Brute force: run the sampler's draws and count the uses of each (tile, slot) bank view."""
    rng = np.random.default_rng(5)
    counts = np.zeros((N, K), np.int64)
    order = np.concatenate([rng.permutation(N) for _ in range(iterations * batch // N + 1)])
    for tile in order[: iterations * batch]:  # epochs over the tiles, as the loader does
        _, slot = bank_view(store, int(tile), rng, p_bank)
        if slot != NO_SLOT:
            counts[tile, slot] += 1
    return counts


@pytest.mark.parametrize("p_bank", [1.0, 0.5])
def test_bank_reuse(bank_store: tuple[Any, np.ndarray], p_bank: float) -> None:
    store, _ = bank_store
    iterations, batch = 600, 4  # 2400 items over 4 tiles x 3 slots: 200 uses per view at p=1
    counts = _count_bank_uses(store, iterations, batch, p_bank)
    # each view used about equally often; the mean equals the expectation within sampling noise
    # (binomial: the bank share of 2400 draws at p=0.5 has a 1 % standard deviation)
    assert counts.min() > 0.7 * counts.mean()
    got = bank_reuse(K, N, iterations, batch, p_bank=p_bank)
    assert got == pytest.approx(counts.mean(), rel=0.05)
    # the docstring's example, by hand: 118 passes per tile over K = 8 views -> 118 / 8 = 14.75
    assert bank_reuse(8, n_tiles=100, iterations=118 * 100 // 4, batch=4) == pytest.approx(14.75)
    with pytest.raises(ValueError, match="k >= 1"):
        bank_reuse(0, 10, 1, 1)
