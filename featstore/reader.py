"""Read a store: random tile access (decoded), statistics, and an xarray/DataTree view."""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xarray as xr
import zarr

from featstore import layout as L
from featstore.bank import BankReader
from featstore.codecs import FeatureCodec, PCACodec, get_codec
from featstore.errors import (
    IncompleteStoreError,
    MissingTeacherError,
    StoreFormatError,
    TileNotDoneError,
)
from featstore.geometry import LevelGeometry
from featstore.schema import LevelSpec, StoreSchema, TileRecord

LevelLike = str | LevelSpec


def open_store(
    url: str, *, require_complete: bool = False, storage_options: dict[str, Any] | None = None
) -> FeatureStore:
    """Open a store read-only.

    Args:
        url: local path or fsspec URL.
        require_complete: raise ``IncompleteStoreError`` unless the store was finalized.
        storage_options: passed to fsspec for remote URLs.
    """
    url = str(url)
    group = L.open_root(url, "r", storage_options)
    store = FeatureStore(url, group, L.read_header(group, url))
    if require_complete and not store.complete:
        raise IncompleteStoreError(
            f"store {url!r} is not complete ({int((~store.done()).sum())} tiles not done); "
            "finish the extraction (it resumes) and finalize it"
        )
    return store


class FeatureStore:
    """Read access to a feature store; trusts only tiles whose shard is done."""

    def __init__(self, url: str, group: zarr.Group, meta: dict[str, Any]) -> None:
        self.url = url
        self._group = group
        self._meta = meta
        self.schema = StoreSchema.from_dict(meta["schema"])
        self.fingerprint: str = meta["fingerprint"]
        self.package_version: str = meta.get("package_version", "")
        self._arrays: dict[str, zarr.Array] = {}
        self._codecs: dict[str, FeatureCodec] = {}
        self._tiles: list[TileRecord] | None = None
        self._done = np.asarray(group["done"][:]).astype(bool)
        self._bank: BankReader | None = None

    def __len__(self) -> int:
        return int(self._done.shape[0])

    def __repr__(self) -> str:
        return (
            f"FeatureStore({self.url!r}, tiles={len(self)}, teachers={self.teacher_names}, "
            f"complete={self.complete})"
        )

    @property
    def complete(self) -> bool:
        """Whether the store was finalized."""
        return bool(self._meta.get("complete"))

    @property
    def tiles(self) -> list[TileRecord]:
        """The tile index (read once)."""
        if self._tiles is None:
            self._tiles = L.read_tiles(self._group)
        return self._tiles

    @property
    def teacher_names(self) -> tuple[str, ...]:
        """Teachers in schema order."""
        return self.schema.teacher_names

    def levels(self, teacher: str) -> tuple[LevelSpec, ...]:
        """Cached levels of ``teacher``."""
        return self.schema.teacher(teacher).levels

    def _level_key(self, teacher: str, level: LevelLike) -> str:
        key = level.key if isinstance(level, LevelSpec) else str(level)
        keys = [lv.key for lv in self.levels(teacher)]
        if key not in keys:
            raise MissingTeacherError(
                f"teacher {teacher!r} has no level {key!r} in {self.url!r}; cached levels: {keys}"
            )
        return key

    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            self._arrays[path] = self._group[path]
        return self._arrays[path]

    def level_geometry(self, teacher: str, level: LevelLike = "s1.00") -> LevelGeometry:
        """Geometry of a cached level (grid from the stored array)."""
        key = self._level_key(teacher, level)
        grid = self._array(L.feature_path(teacher, key)).shape[1]
        return LevelGeometry.from_specs(
            self.schema.tile_size,
            self.schema.base_size,
            LevelSpec.from_key(key),
            self.schema.teacher(teacher).spec,
            grid,
        )

    def codec(self, teacher: str) -> FeatureCodec:
        """The teacher's codec, with the PCA basis loaded from the store when needed."""
        if teacher not in self._codecs:
            codec = get_codec(self.schema.teacher(teacher).codec)
            if isinstance(codec, PCACodec):
                mean_p, basis_p = L.pca_paths(teacher)
                codec.set_basis(self._array(mean_p)[:], self._array(basis_p)[:])
            self._codecs[teacher] = codec
        return self._codecs[teacher]

    def done(self) -> np.ndarray:
        """bool ``[N]``: tiles that readers may trust (as of open/refresh)."""
        return self._done.copy()

    def refresh(self) -> None:
        """Re-read the header and the done flags (a writer may have progressed)."""
        self._meta = L.read_header(self._group, self.url)
        self.schema = StoreSchema.from_dict(self._meta["schema"])
        self.fingerprint = self._meta["fingerprint"]
        self._done = np.asarray(self._group["done"][:]).astype(bool)
        self._bank = None

    @property
    def has_bank(self) -> bool:
        """Whether the store declares an exact view bank (``schema.bank``)."""
        return self.schema.bank is not None

    @property
    def bank(self) -> BankReader:
        """The exact view bank (``StoreFormatError`` when the store has none)."""
        if self._bank is None:
            self._bank = BankReader(self.url, self._group, self.schema)
        return self._bank

    def _check_done(self, i: int) -> int:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"tile {i} out of range: {self.url!r} has {len(self)} tiles")
        if not self._done[i]:
            raise TileNotDoneError(
                f"tile {i} of {self.url!r} is not done (its shard was never "
                "committed); resume the extraction"
            )
        return i

    def read_encoded(
        self, teacher: str, i: int, level: LevelLike = "s1.00"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored ``(data, aux)`` of tile ``i``, without decoding."""
        key = self._level_key(teacher, level)
        i = self._check_done(i)
        data = self._array(L.feature_path(teacher, key))[i]
        has_aux = self.codec(teacher).aux_shape(self.schema.teacher(teacher).spec.channels)
        aux = self._array(L.aux_path(teacher, key))[i] if has_aux is not None else None
        return data, aux

    def read(self, teacher: str, i: int, level: LevelLike = "s1.00") -> np.ndarray:
        """Decoded float32 ``[g, g, C]`` tokens of tile ``i``."""
        data, aux = self.read_encoded(teacher, i, level)
        return np.asarray(self.codec(teacher).decode(data, aux), dtype=np.float32)

    def read_half(self, teacher: str, i: int, level: LevelLike = "s1.00") -> np.ndarray:
        """Decoded float16 ``[g, g, C]`` tokens of tile ``i`` (no float32 copy for fp16 stores).

        Equals ``read(...).astype(float16)``; the trainer's datasets read through it.
        """
        data, aux = self.read_encoded(teacher, i, level)
        return np.asarray(self.codec(teacher).decode_half(data, aux), dtype=np.float16)

    def read_many(
        self, teacher: str, indices: Sequence[int], level: LevelLike = "s1.00", max_workers: int = 8
    ) -> np.ndarray:
        """Decoded float32 ``[n, g, g, C]`` for several tiles, read concurrently."""
        indices = list(indices)
        if not indices:
            geo = self.level_geometry(teacher, level)
            return np.zeros(
                (0, geo.grid, geo.grid, self.schema.teacher(teacher).spec.channels), np.float32
            )
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(indices)))) as pool:
            return np.stack(list(pool.map(lambda i: self.read(teacher, i, level), indices)))

    def _pixels_array(self, name: str) -> zarr.Array:
        if not self.schema.store_pixels:
            raise StoreFormatError(
                f"store {self.url!r} holds no pixels (store_pixels=False); "
                "read images from the tile source instead"
            )
        return self._array(f"pixels/{name}")

    def read_image(self, i: int) -> np.ndarray:
        """uint8 ``[T, T, 3]`` image of tile ``i``."""
        return np.asarray(self._pixels_array("image")[self._check_done(i)])

    def read_mask(self, i: int) -> np.ndarray:
        """uint8 ``[T, T]`` mask of tile ``i`` (``ignore_index`` where unlabeled)."""
        return np.asarray(self._pixels_array("mask")[self._check_done(i)])

    def stats(self, teacher: str, level: LevelLike = "s1.00") -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) float32 ``[C]`` of the decoded features over all tiles."""
        key = self._level_key(teacher, level)
        stats = self._meta.get("stats")
        if not self.complete or not stats:
            raise IncompleteStoreError(
                f"store {self.url!r} is not finalized: no statistics yet; "
                "call StoreWriter.finalize() after the last shard"
            )
        entry = stats[teacher][key]
        return np.asarray(entry["mean"], np.float32), np.asarray(entry["std"], np.float32)

    def to_dataset(self, teacher: str) -> xr.Dataset:
        """Lazy (dask) Dataset of the teacher's decoded levels with named dims."""
        return _teacher_dataset(self, teacher)

    def to_datatree(self) -> xr.DataTree:
        """DataTree: ``/tiles`` (index), ``/pixels`` (if kept), ``/teachers/<name>`` (levels)."""
        nodes: dict[str, xr.Dataset] = {
            "/": xr.Dataset(
                attrs={
                    "dataset": self.schema.dataset,
                    "fingerprint": self.fingerprint,
                    "complete": int(self.complete),
                    "url": self.url,
                }
            ),
            "/tiles": _tiles_dataset(self),
        }
        if self.schema.store_pixels:
            nodes["/pixels"] = xr.Dataset(
                {
                    "image": (("tile", "py", "px", "rgb"), _lazy(self, "pixels/image")),
                    "mask": (("tile", "py", "px"), _lazy(self, "pixels/mask")),
                },
                coords=_tile_coords(self),
            )
        for name in self.teacher_names:
            nodes[f"/teachers/{name}"] = self.to_dataset(name)
        return xr.DataTree.from_dict(nodes)


def _lazy(store: FeatureStore, path: str) -> Any:
    import dask.array as da

    arr = store._array(path)
    chunks = (store.schema.tiles_per_shard, *arr.shape[1:])
    return da.from_array(
        arr, chunks=chunks, lock=False, name=f"featstore-{store.fingerprint[:16]}-{path}"
    )


def _tile_coords(store: FeatureStore) -> dict[str, Any]:
    return {"tile": [t.tile_id for t in store.tiles], "done": ("tile", store.done())}


def _teacher_dataset(store: FeatureStore, teacher: str) -> xr.Dataset:
    entry = store.schema.teacher(teacher)
    codec = store.codec(teacher)
    has_aux = codec.aux_shape(entry.spec.channels) is not None
    data_vars = {}
    for level in entry.levels:
        key = level.key
        aux = _lazy(store, L.aux_path(teacher, key)) if has_aux else None
        decoded = codec.decode(_lazy(store, L.feature_path(teacher, key)), aux)
        geo = store.level_geometry(teacher, key)
        attrs = {
            "scale": level.scale,
            "flipped": int(level.flipped),
            "render": geo.render,
            "canvas": geo.canvas,
            "input_px": geo.input_px,
            "stride": geo.stride,
        }
        data_vars[key] = xr.Variable(("tile", f"y_{key}", f"x_{key}", "channel"), decoded, attrs)
    return xr.Dataset(
        data_vars,
        coords=_tile_coords(store),
        attrs={
            "teacher": json.dumps(entry.spec.to_dict(), sort_keys=True),
            "codec": json.dumps(entry.codec, sort_keys=True),
        },
    )


def _tiles_dataset(store: FeatureStore) -> xr.Dataset:
    tiles = store.tiles
    return xr.Dataset(
        {
            "source": ("tile", np.array([t.source for t in tiles], dtype=str)),
            "split": ("tile", np.array([t.split for t in tiles], dtype=str)),
            "pixel_hash": ("tile", np.array([t.pixel_hash for t in tiles], dtype=str)),
            "crs": ("tile", np.array([t.crs or "" for t in tiles], dtype=str)),
            "window": (("tile", "window_field"), np.array([t.window for t in tiles], np.int64)),
            "transform": (("tile", "affine"), np.asarray(store._array("tiles/transform")[:])),
        },
        coords={**_tile_coords(store), "window_field": ["row", "col", "height", "width"]},
    )


__all__ = ["FeatureStore", "open_store"]
