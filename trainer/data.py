"""Datasets over a feature store (or a plain tile source), samplers and collation.

Each item's view is drawn on the CPU by the run's target source (``featviews.sources``: zoomed
size, crop offset, flip, and the grids that view reads) from a generator seeded by
``(seed, stream, epoch, position)``, so a killed and resumed run sees exactly the same data. The
pixel work (rendering, colour, CutMix) happens batched on the training device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from featstore.constants import IGNORE_INDEX
from featstore.errors import TileDataError
from featstore.schema import TileRecord
from featviews.draw import ViewParams
from featviews.sources import EncodedGrid, TargetSource

LOG = logging.getLogger("featcache.train")


def log_bad_tile(err: TileDataError) -> None:
    """Log a tile left out under ``--skip-bad-tiles`` (its id, file and the failed check)."""
    LOG.warning("--skip-bad-tiles: leaving out tile %r: %s", err.tile_id, err)


class TileReader(Protocol):
    """What the datasets need from a store or a source."""

    tiles: list[TileRecord]

    def read_image(self, i: int) -> np.ndarray: ...  # noqa: D102

    def read_mask(self, i: int) -> np.ndarray: ...  # noqa: D102

    def read_pixels(  # noqa: D102 - images [n, T, T, 3] and masks [n, T, T] (or None)
        self, indices: Sequence[int], masks: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


class SourceTiles:
    """A ``pipelines`` TileSource seen through the store's reader interface (online mode).

    Args:
        source: An opened ``TileSource``.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.tiles = list(source.records)
        self.class_names = tuple(source.class_names)
        self.ignore_index = int(getattr(source, "ignore_index", IGNORE_INDEX))
        self.tile_size = int(source.tile_size)

    def read_image(self, i: int) -> np.ndarray:
        """uint8 [T, T, 3]."""
        return self.source.load(i)[0]

    def read_mask(self, i: int) -> np.ndarray:
        """uint8 [T, T] (all ignore when the tile has no mask)."""
        return self._mask(self.source.load(i)[1])

    def read_pixels(
        self, indices: Sequence[int], masks: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images [n, T, T, 3] and masks [n, T, T] (None unless ``masks``): each tile
        decoded once."""
        loaded = [self.source.load(i) for i in indices]
        images = np.stack([image for image, _ in loaded])
        return images, np.stack([self._mask(m) for _, m in loaded]) if masks else None

    def _mask(self, mask: np.ndarray | None) -> np.ndarray:
        if mask is None:
            return np.full((self.tile_size, self.tile_size), self.ignore_index, np.uint8)
        return mask


class StoreDataset(Dataset):
    """Tiles with a drawn view and the grids its target source reads for it.

    Args:
        reader: A ``FeatureStore`` (or `SourceTiles` when no teacher grid is read).
        indices: Tile indices into ``reader.tiles``; position ``k`` reads ``indices[k % len]``.
        source: The run's target source (``featviews.sources``): it draws each item's view and
            reads the grids that view needs (none for the online source or without teachers).
        labeled: Also return the mask.
        seed: Base seed of the view draws.
        length: Dataset length (default ``len(indices)``; longer repeats ids, the official
            labeled-set repetition).
        stream: Separates the draws of datasets that share a seed (labeled 0, unlabeled 1).
        skip_bad: a tile failing its checksum (`TileDataError`) is logged and replaced by the
            next good position (``--skip-bad-tiles``); otherwise the error stops the run.
    """

    def __init__(
        self,
        reader: TileReader,
        indices: Sequence[int],
        source: TargetSource,
        labeled: bool,
        seed: int,
        length: int | None = None,
        stream: int = 0,
        skip_bad: bool = False,
    ) -> None:
        if not indices:
            raise ValueError("StoreDataset needs at least one tile index")
        self.reader = reader
        self.indices = [int(i) for i in indices]
        self.source = source
        self.labeled = labeled
        self.seed = int(seed)
        self.length = len(self.indices) if length is None else int(length)
        self.stream = int(stream)
        self.epoch = 0
        self.skip_bad = bool(skip_bad)
        self.bad: set[int] = set()  # tiles found bad (per process: each worker logs its own)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes every view draw)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _rng(self, k: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, self.epoch, int(k)])

    def draw(self, k: int) -> ViewParams:
        """The view of position ``k`` in the current epoch (pure function of the seeds)."""
        return self.source.draw(self._rng(k))

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not self.skip_bad:
            return self._item(k)
        # the next positions stand in for a bad tile: deterministic, and the batch stays full
        for pos in range(k, k + len(self.indices)):
            i = self.indices[pos % len(self.indices)]
            if i in self.bad:
                continue
            try:
                return self._item(pos)
            except TileDataError as err:
                self.bad.add(i)
                log_bad_tile(err)
        raise TileDataError(
            f"--skip-bad-tiles: every tile of this set ({len(self.indices)}) "
            "fails its checksum; check the store with `featcache verify STORE` "
            "and re-extract it"
        )

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items (the DataLoader's batched fetch): the same items as ``self[k]``, with
        each (teacher, level) the batch needs read from the store in one batched read."""
        if self.skip_bad:  # a bad tile is found and replaced item by item
            return [self[int(k)] for k in positions]
        ks = [int(k) for k in positions]
        tiles = [self.indices[k % len(self.indices)] for k in ks]
        reads = self.source.read_items(tiles, [self._rng(k) for k in ks])
        images, masks = self.reader.read_pixels(tiles, masks=self.labeled)
        # channels first, one copy for the batch (a strided uint8 copy per item costs 10x)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        return [
            self._assemble(i, r, images[k], None if masks is None else masks[k])
            for k, (i, r) in enumerate(zip(tiles, reads, strict=True))
        ]

    def _item(self, k: int) -> dict[str, Any]:
        i = self.indices[k % len(self.indices)]
        read = self.source.read_item(i, self._rng(k))
        image = torch.from_numpy(self.reader.read_image(i)).permute(2, 0, 1).contiguous()
        mask = self.reader.read_mask(i) if self.labeled else None
        return self._assemble(i, read, image, mask)

    def _assemble(
        self, i: int, read: dict[str, Any], image: torch.Tensor, mask: np.ndarray | None
    ) -> dict[str, Any]:
        """Tile ``i``'s image (``[3, T, T]`` uint8) and mask beside what its target source read
        for it."""
        item: dict[str, Any] = {"index": i, "image": image}
        if mask is not None:
            item["mask"] = torch.from_numpy(mask)
        item.update(read)
        item["grids"] = {name: _on_host(g) for name, g in item["grids"].items()}
        return item


def _on_host(grid: Any) -> Any:
    """An item's grid as the batch carries it: cached grids stay encoded (`EncodedGrid`, decoded
    on the training device); decoded arrays (bank grids) travel as float16, which halves host
    memory and transfer (decoded values are at most fp16-precise)."""
    if isinstance(grid, EncodedGrid):
        return grid
    return torch.from_numpy(grid).to(torch.float16)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images/masks; keep views and per-teacher grids as lists (grid sizes may differ)."""
    batch: dict[str, Any] = {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "image": torch.stack([it["image"] for it in items]),
        "view": [it["view"] for it in items],
        "grids": {name: [it["grids"][name] for it in items] for name in items[0]["grids"]},
    }
    if "mask" in items[0]:
        batch["mask"] = torch.stack([it["mask"] for it in items])
    blended = {name for it in items for name in it.get("blend_grids", {})}
    if blended:  # levels mixed in by the scale blend; None for items without
        batch["blend_grids"] = {
            name: [it["blend_grids"].get(name) for it in items] for name in sorted(blended)
        }
    if "bank_slot" in items[0]:  # view_bank mode: -1 marks a warped view
        batch["bank_slot"] = torch.tensor([it["bank_slot"] for it in items], dtype=torch.int64)
    return batch


class EpochSampler(Sampler[int]):
    """Shuffled, rank-sharded, resumable sampler (the ``DistributedSampler`` rule).

    The permutation of epoch ``e`` is ``torch.randperm(n, generator=seed + e)``, padded by
    wrapping to a multiple of ``world`` and strided by rank, exactly as ``DistributedSampler``
    with ``shuffle=True, drop_last=False``. ``skip`` positions are left out at the start (resume
    mid-epoch without loading the skipped items).

    Args:
        n: Dataset length.
        seed: Shuffle seed.
        rank: This process's rank.
        world: Number of processes.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = int(n), int(seed), int(rank), int(world)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and how many leading positions of this rank to skip."""
        self.epoch, self.skip = int(epoch), int(skip)

    @property
    def per_rank(self) -> int:
        """Positions per rank per epoch."""
        return math.ceil(self.n / self.world)

    def order(self) -> list[int]:
        """This rank's full order for the current epoch."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self.per_rank * self.world
        perm += (perm * math.ceil(total / max(len(perm), 1)))[: total - len(perm)]
        return perm[self.rank : total : self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip :])

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)


def repeat_to(indices: Sequence[int], length: int) -> list[int]:
    """Repeat ids ``ceil(length / len)`` times and truncate (the official labeled repetition)."""
    if not indices:
        return []
    reps = math.ceil(length / len(indices))
    return (list(indices) * max(reps, 1))[: max(length, len(indices))]


def iters_per_epoch(n_driver: int, world: int, batch: int) -> int:
    """Iterations per epoch: ``floor(ceil(n / world) / batch)`` (drop_last, per rank)."""
    return math.ceil(n_driver / world) // batch


__all__ = [
    "EpochSampler",
    "SourceTiles",
    "StoreDataset",
    "TileReader",
    "collate",
    "iters_per_epoch",
    "log_bad_tile",
    "repeat_to",
]
