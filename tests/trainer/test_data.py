"""Datasets, samplers and the pre-training checks (each error message is checked)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from featstore import create_store, open_store
from tests.helpers import CLIP, DINO, TILE, build_store, tiny_config, warp_source, write_ids
from trainer.checks import DataCheckError, check_classes
from trainer.config import TeacherConfig, TrainConfig, TrainConfigError
from trainer.data import EpochSampler, StoreDataset, collate, repeat_to
from trainer.engine import Trainer


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six tiles, tiny DINOv2 at scales 1 and 2 plus flipped copies."""
    return build_store(
        tmp_path_factory.mktemp("data"), teachers=(DINO,), scales=(1.0, 2.0), flip=True
    )


def _ids(url: str) -> list[str]:
    return [t.tile_id for t in open_store(url).tiles]


def test_dataset_is_deterministic_and_reads_the_chosen_level(store: str) -> None:
    st = open_store(store)
    levels = {DINO: st.levels(DINO)}
    ds = StoreDataset(st, [1, 3, 5], warp_source(store=st, levels=levels), True, 3, length=7)
    again = StoreDataset(st, [1, 3, 5], warp_source(store=st, levels=levels), True, 3, length=7)
    assert len(ds) == 7
    views = [ds[k]["view"] for k in range(7)]
    assert views == [again[k]["view"] for k in range(7)]
    ds.set_epoch(1)
    assert views != [ds[k]["view"] for k in range(7)]
    item = ds[4]  # position 4 wraps to indices[1] = tile 3
    key = item["view"].levels[DINO].key
    assert item["index"] == 3
    assert torch.equal(item["grids"][DINO].data, torch.from_numpy(st.read(DINO, 3, key)).half())
    assert torch.equal(item["image"], torch.from_numpy(st.read_image(3)).permute(2, 0, 1))
    keys = {ds[k]["view"].levels[DINO].key for k in range(7) for ds.epoch in range(4)}
    assert len(keys) >= 2  # zoom and flip pick different cached levels
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, TILE, TILE) and batch["mask"].shape == (2, TILE, TILE)
    assert len(batch["grids"][DINO]) == 2 and batch["index"].tolist() == [1, 3]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_sampler_matches_distributed_sampler(world: int) -> None:
    for rank in range(world):
        ours = EpochSampler(11, seed=5, rank=rank, world=world)
        ref = DistributedSampler(range(11), num_replicas=world, rank=rank, shuffle=True, seed=5)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)
            ours.set_epoch(epoch, skip=2)
            assert list(ours) == list(ref)[2:] and len(ours) == len(ref) - 2


def test_repeat_to_is_the_official_repetition() -> None:
    assert repeat_to([4, 7], 5) == [4, 7, 4, 7, 4]
    assert repeat_to([1, 2, 3], 2) == [1, 2, 3]


def _cfg(tmp_path: Path, store: str, **kw: object) -> TrainConfig:
    return tiny_config(tmp_path, store, _ids(store), [TeacherConfig(DINO)], iters=1, **kw)


def test_overlapping_splits(store: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, store)
    cfg.data.unlabeled = write_ids(tmp_path / "u2.txt", _ids(store)[1:4])
    with pytest.raises(DataCheckError, match=r"labeled and unlabeled sets overlap in 1 tiles"):
        Trainer(cfg)


def test_empty_labeled_set(store: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, store)
    cfg.data.labeled = ""
    with pytest.raises(DataCheckError, match="labeled set is empty"):
        Trainer(cfg)


def test_unknown_split_name(store: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, store)
    cfg.data.val = "valid"
    with pytest.raises(DataCheckError, match=r"split\(s\) \['valid'\] not in the tile index"):
        Trainer(cfg)


def test_missing_teacher_and_level(store: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, store)
    cfg.model.teachers = [TeacherConfig(CLIP, "clip224")]
    with pytest.raises(DataCheckError, match=f"teacher '{CLIP}' is not in the store"):
        Trainer(cfg)
    cfg = _cfg(tmp_path, store)
    cfg.distill.levels = ["s1.00", "s0.50"]
    with pytest.raises(DataCheckError, match=r"no cached level\(s\) \['s0.50'\]"):
        Trainer(cfg)


def test_fingerprint_mismatch_names_the_difference(store: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, store)
    cfg.data.fingerprint = "0" * 64
    with pytest.raises(DataCheckError, match="store fingerprint .* != the run's 000000000000"):
        Trainer(cfg)
    # a resumed run pins the store it started with; a re-extracted store with another schema
    other = build_store(tmp_path / "other", n_images=6, teachers=(DINO,), scales=(1.0,))
    cfg = _cfg(tmp_path, store)
    Trainer(cfg).run()
    cfg.data.store = other
    cfg.runtime.resume = "auto"
    with pytest.raises(DataCheckError, match=r"schema.teachers\[0\].levels"):
        Trainer(cfg)


def test_incomplete_store_lists_missing_tiles(store: str, tmp_path: Path) -> None:
    st = open_store(store)
    schema = dataclasses.replace(st.schema, teachers=st.schema.teachers[:1])
    url = str(tmp_path / "partial.zarr")
    writer = create_store(url, schema, st.tiles)
    lv = st.levels(DINO)
    feats = {DINO: {x.key: np.stack([st.read(DINO, i, x.key) for i in (0, 1)]) for x in lv}}
    writer.write_shard(
        0,
        feats,
        np.stack([st.read_image(i) for i in (0, 1)]),
        np.stack([st.read_mask(i) for i in (0, 1)]),
    )
    cfg = _cfg(tmp_path, url)
    with pytest.raises(
        DataCheckError,
        match=r"incomplete: 4 selected tiles are not written.*" + st.tiles[2].tile_id,
    ):
        Trainer(cfg)


def test_class_count_mismatch(store: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, store)
    cfg.model.num_classes = 3
    expected = r"--num-classes 3 \(model.num_classes\) but the data has 7 classes"
    with pytest.raises(DataCheckError, match=expected):
        Trainer(cfg)

    class Masks:  # a reader whose masks use more labels than the class list
        tiles = open_store(store).tiles

        def read_mask(self, i: int) -> np.ndarray:
            return np.full((4, 4), 5 if i == 1 else 0, np.uint8)

    with pytest.raises(DataCheckError, match=r"has label 5 >= 3 classes"):
        check_classes(None, ("a", "b", "c"), Masks(), [0, 1], 255)


def test_config_yaml_round_trip_and_bad_keys(tmp_path: Path) -> None:
    cfg = TrainConfig()
    cfg.model.teachers = [TeacherConfig(DINO), TeacherConfig(CLIP, "clip224")]
    cfg.data.scale_range = (0.75, 1.5)
    cfg.dump(tmp_path / "c.yaml")
    back = TrainConfig.load(tmp_path / "c.yaml")
    assert back == cfg
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(TrainConfigError, match=r"unknown config keys \['optim.learning_rate'\]"):
        TrainConfig.load(tmp_path / "bad.yaml")
    with pytest.raises(TrainConfigError, match="--crop 64: must be a multiple of 14"):
        TrainConfig(crop_size=64, data=dataclasses.replace(cfg.data, store="x")).validate()


def test_batched_fetch_equals_item_by_item_with_one_read_per_level(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`__getitems__` (the DataLoader's batched fetch) gives the items `ds[k]` gives, and reads
    each (teacher, level) the batch needs once, not once per item, all in one call."""
    st = open_store(store)
    levels = {DINO: st.levels(DINO)}
    src = warp_source(store=st, levels=levels, scale_blend=0.25)
    ds = StoreDataset(st, [0, 1, 2, 3, 4, 5], src, True, 7, length=12)
    one = [ds[k] for k in range(12)]
    calls: list[tuple[str, str, int]] = []
    round_trips: list[int] = []
    real = st.read_batches_encoded

    def counted(requests: list[tuple[str, str, list[int]]], **kw: Any) -> Any:
        round_trips.append(len(requests))
        calls.extend((name, key, len(rows)) for name, key, rows in requests)
        return real(requests, **kw)

    monkeypatch.setattr(st, "read_batches_encoded", counted)
    batch = ds.__getitems__(list(range(12)))
    assert round_trips == [len(calls)]  # every level of the batch in one call
    wanted = {(DINO, it["view"].levels[DINO].key) for it in one}
    wanted |= {(DINO, lv.key) for it in one for lv, _ in it["view"].blend.get(DINO, ())}
    assert sorted((n, k) for n, k, _ in calls) == sorted(wanted)  # one read per level
    assert sum(n for *_, n in calls) == sum(1 + len(it["view"].blend.get(DINO, ())) for it in one)
    for a, b in zip(one, batch, strict=True):
        assert a["view"] == b["view"] and a["index"] == b["index"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["grids"][DINO].data, b["grids"][DINO].data)
        for ga, gb in zip(
            a["blend_grids"].get(DINO, []), b["blend_grids"].get(DINO, []), strict=True
        ):
            assert torch.equal(ga.data, gb.data)
    # and the DataLoader takes the batched path
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    calls.clear()
    first = next(iter(loader))
    assert calls and first["index"].tolist() == [it["index"] for it in one[:4]]


def test_encoded_grids_are_pinned_by_the_dataloader(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DataLoader's pin_memory reaches the tensors inside an `EncodedGrid` (no GPU here:
    the tensors' pin_memory is replaced by a recording copy)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from featviews.sources import EncodedGrid

    pinned: list[int] = []

    def fake_pin(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pinned.append(t.numel())
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    grid = EncodedGrid(torch.zeros(2, 2, 3, dtype=torch.int8), torch.ones(2, 3))
    out = pin_memory({"grids": {DINO: [grid]}})
    got = out["grids"][DINO][0]
    assert isinstance(got, EncodedGrid) and pinned == [12, 6]
    assert torch.equal(got.data, grid.data) and torch.equal(got.aux, grid.aux)


def test_batched_fetch_keeps_each_teacher_s_grids_apart(tmp_path: Path) -> None:
    """With two teachers, every item's grid of each teacher is that teacher's stored tile and
    level (`read_encoded`), batched or item by item."""
    st = open_store(build_store(tmp_path, n_images=3, teachers=(DINO, CLIP), scales=(1.0, 2.0)))
    levels = {name: st.levels(name) for name in (DINO, CLIP)}
    src = warp_source(store=st, levels=levels, scale_blend=0.25)
    ds = StoreDataset(st, [0, 1, 2], src, False, 3, length=6)
    batch = ds.__getitems__(list(range(6)))
    for k, item in enumerate(batch):
        assert set(item["grids"]) == {DINO, CLIP}
        for name in (DINO, CLIP):
            stored, _ = st.read_encoded(name, item["index"], item["view"].levels[name].key)
            assert np.array_equal(item["grids"][name].data.numpy(), stored)
            assert torch.equal(item["grids"][name].data, ds[k]["grids"][name].data)
