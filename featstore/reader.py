"""Read a store: random tile access (decoded), statistics, and an xarray/DataTree view."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.core.sync import sync as zarr_sync

from featstore import layout as L
from featstore.bank import BankReader
from featstore.batchread import (
    _ZARRS_FORK,
    BATCH_PIPELINES,
    _batch_pipeline,
    _checksums,
    _crc32,
    _out_buffer,
    _read_jobs,
    _read_tiles_at_once,
    default_batch_pipeline,
)
from featstore.codecs import FeatureCodec, Float16Codec, PCACodec, get_codec
from featstore.errors import (
    IncompleteStoreError,
    MissingTeacherError,
    StoreFormatError,
    TileDataError,
    TileNotDoneError,
)
from featstore.geometry import LevelGeometry
from featstore.integrity import (
    ArraySpec,
    expected_arrays,
    missing_shard_files,
    open_array,
    shard_file,
    spec_problems,
)
from featstore.schema import LevelSpec, StoreSchema, TileRecord

LevelLike = str | LevelSpec

_CRC_MISMATCH = (
    "does not match the checksum recorded when it was written "
    "(corrupted, truncated or deleted shard)"
)
_ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


def _data_aux(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """``(data, aux or None)`` of a level read's arrays (see ``FeatureStore._level_paths``)."""
    return arrays[0], (arrays[1] if len(arrays) > 1 else None)


def _read_failure(err: BaseException) -> str:
    """What a failed tile read says: a chunk failing its own crc32c (the codec chain's last
    inner codec) is the same damage as a crc32 mismatch, and is reported as one."""
    if "checksum" in str(err).lower():
        return _CRC_MISMATCH
    return f"cannot be read ({type(err).__name__}: {err})"


def open_store(
    url: str | zarr.storage.ZipStore,
    *,
    require_complete: bool = False,
    storage_options: dict[str, Any] | None = None,
    verify_reads: bool = True,
) -> FeatureStore:
    """Open a store read-only.

    Args:
        url: local folder, ``.zip`` file, fsspec URL (``http://``, ``zip://...::``,
            ``memory://``...) or a zarr ``ZipStore`` (reopened by path, read-only: every
            process, e.g. each DataLoader worker, opens its own).
        require_complete: raise ``IncompleteStoreError`` unless the store was finalized.
        storage_options: passed to fsspec for remote URLs.
        verify_reads: compare every tile read with the crc32 recorded when it was written
            (``TileDataError`` on a mismatch); costs about one crc32 pass over the bytes read.
    """
    url = str(url.path) if isinstance(url, zarr.storage.ZipStore) else str(url)
    group = L.open_root(url, "r", storage_options)
    store = FeatureStore(url, group, L.read_header(group, url), verify_reads, storage_options)
    if require_complete and not store.complete:
        raise IncompleteStoreError(
            f"store {url!r} is not complete ({int((~store.done()).sum())} tiles not done); "
            "finish the extraction (it resumes) and finalize it"
        )
    return store


class FeatureStore:
    """Read access to a feature store; trusts only tiles whose shard is done.

    Every tile read (features, aux, image, mask) is compared with the crc32 recorded when it
    was written, and every array with the dtype/shape/fill its schema implies, so a damaged
    store raises `TileDataError` / `StoreFormatError` instead of handing out wrong values.
    ``verify_reads=False`` skips the crc32 (one pass over the bytes read); the lazy xarray view
    (`to_dataset`) is not checked.
    """

    def __init__(
        self,
        url: str,
        group: zarr.Group,
        meta: dict[str, Any],
        verify_reads: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self._storage_options = storage_options
        self.verify_reads = bool(verify_reads)
        self._root: zarr.Group | None = group
        self._pid = os.getpid()
        self._meta = meta
        self.schema = StoreSchema.from_dict(meta["schema"])
        self.fingerprint: str = meta["fingerprint"]
        self.package_version: str = meta.get("package_version", "")
        self._arrays: dict[str, zarr.Array] = {}
        self._codecs: dict[str, FeatureCodec] = {}
        self._tiles: list[TileRecord] | None = None
        # levels added later (``extract --add``) have their own done and checksum tables
        self._done = L.read_done(group, self.schema)
        self._bank: BankReader | None = None
        self._specs: dict[str, ArraySpec] | None = None
        self._crcs: np.ndarray | None = None
        self._crc_cols = {p: c for c, p in enumerate(L.all_checksum_arrays(self.schema))}

    @property
    def _group(self) -> zarr.Group:
        """The root group, opened in this process.

        A forked DataLoader worker must not use its parent's group: an HTTP filesystem's session
        belongs to the parent's event loop ("Timeout context manager should be used inside a
        task"), and a zip's file handle shares its offset with the parent (``Bad CRC-32``). So
        each process reopens the store on its first access; a local store reopens as cheaply.
        """
        if self._root is None or self._pid != os.getpid():
            self._root = L.open_root(self.url, "r", self._storage_options)
            self._pid = os.getpid()
            self._arrays, self._bank = {}, None  # bound to the old group
        return self._root

    def __getstate__(self) -> dict[str, Any]:
        # spawned workers (DataLoader "spawn"/"forkserver") get the store without its zarr
        # objects and reopen it themselves
        state = dict(self.__dict__)
        state.update(_root=None, _arrays={}, _bank=None)
        return state

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
        group = self._group  # first: in a new process it drops the parent's arrays
        if path not in self._arrays:
            problems = self.array_problems([path])
            if problems:
                raise StoreFormatError(f"store {self.url!r}: {problems[0]}; {self._fix()}")
            self._arrays[path] = group[path]
        return self._arrays[path]

    def _fix(self) -> str:
        return (
            f"check the store with `featcache verify {self.url}`, then re-extract it "
            "(`featcache extract` into a new store, or over it with --overwrite)"
        )

    def array_problems(self, paths: Sequence[str]) -> list[str]:
        """Missing arrays, or arrays whose dtype/shape/fill differ from what the schema implies."""
        if self._specs is None:
            self._specs = expected_arrays(self.schema, len(self))
        out = []
        for path in paths:
            arr, err = open_array(self._group, path)
            if err is None and path in self._specs:
                out += spec_problems(arr, path, self._specs[path])
            elif err is not None:
                out.append(err)
        return out

    def missing_files(self, paths: Sequence[str], indices: Sequence[int]) -> list[str]:
        """Shard files of ``paths`` holding tiles ``indices`` that are gone (deleted, lost).

        Cheap (one existence check per shard and array), so a run can refuse a store with a
        lost shard before it starts rather than when it first reads the shard.
        """
        fs, root = L.store_fs(self.url, self._storage_options)
        n, tps = len(self), self.schema.tiles_per_shard
        shards = [self.schema.shard_range(k, n) for k in sorted({int(i) // tps for i in indices})]
        slices = [slice(r.start, r.stop) for r in shards]
        out = []
        for path in paths:
            col = self._crc_cols.get(path)
            if col is None:
                continue
            crcs = self._recorded_crcs()[:, col]
            for sl, _ in missing_shard_files(self._array(path), path, fs, root, crcs, slices):
                ids = [t.tile_id for t in self.tiles[sl]]
                file = shard_file(self.url, self._array(path), path, sl.start)
                out.append(f"shard file {file} is missing (tiles {ids})")
        return out

    def _recorded_crcs(self) -> np.ndarray:
        if self._crcs is None:
            try:
                self._crcs = L.read_checksums(self._group, self.schema)
            except Exception as err:  # noqa: BLE001 - any damage to the checksum table
                raise StoreFormatError(
                    f"store {self.url!r}: the checksum table is unreadable "
                    f"({type(err).__name__}: {err}); {self._fix()}"
                ) from err
        return self._crcs

    def _read_tile(self, path: str, i: int) -> np.ndarray:
        """Tile ``i`` of array ``path``, checked against its recorded crc32."""
        arr = self._array(path)
        try:
            data = np.ascontiguousarray(arr[i])
        except Exception as err:  # noqa: BLE001 - a truncated or garbled shard fails in many ways
            raise self._tile_error(path, i, _read_failure(err)) from err
        col = self._crc_cols.get(path)
        if (
            self.verify_reads
            and col is not None
            and _crc32(data) != int(self._recorded_crcs()[i, col])
        ):
            raise self._tile_error(path, i, _CRC_MISMATCH)
        return data

    def _tile_error(self, path: str, i: int, what: str) -> TileDataError:
        tile_id = self.tiles[i].tile_id
        file = shard_file(self.url, self._array(path), path, i)
        return TileDataError(
            f"tile {tile_id!r} (#{i}) of store {self.url!r}: {path} {what}; shard file {file}. "
            f"Fix: {self._fix()}",
            tile_id,
            i,
            path,
            file,
        )

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
        self._done = L.read_done(self._group, self.schema)
        self._bank = None
        self._specs, self._crcs, self._arrays = None, None, {}
        self._crc_cols = {p: c for c, p in enumerate(L.all_checksum_arrays(self.schema))}

    @property
    def has_bank(self) -> bool:
        """Whether the store declares an exact view bank (``schema.bank``)."""
        return self.schema.bank is not None

    @property
    def bank(self) -> BankReader:
        """The exact view bank (``StoreFormatError`` when the store has none)."""
        group = self._group  # first: in a new process it drops the parent's bank reader
        if self._bank is None:
            self._bank = BankReader(self.url, group, self.schema)
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
        return i % len(self)

    def read_encoded(
        self, teacher: str, i: int, level: LevelLike = "s1.00"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored ``(data, aux)`` of tile ``i``, without decoding."""
        paths = self._level_paths(teacher, level)
        i = self._check_done(i)
        return _data_aux([self._read_tile(p, i) for p in paths])

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

    def read_batch_encoded(
        self,
        teacher: str,
        indices: Sequence[int],
        level: LevelLike = "s1.00",
        *,
        pipeline: str | None = None,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored ``(data [n, ...], aux [n, ...] or None)`` of tiles ``indices``, one batched read.

        Row ``k`` equals ``read_encoded(teacher, indices[k], level)``, with the same checks:
        the first tile (in ``indices`` order) that cannot be read or fails its crc32 raises
        the ``TileDataError`` that ``read_encoded`` raises for it. All tiles go to the codec
        pipeline as one selection (the ``zarrs`` pipeline decodes them in parallel); when that
        fails, each tile is read on its own to name the one that failed.

        Args:
            teacher: teacher name.
            indices: tile indices, any order, duplicates allowed (each tile is read once).
            level: cached level.
            pipeline: ``"zarrs"`` or ``"zarr"`` (see ``BATCH_PIPELINES``); default
                ``default_batch_pipeline()``.
            out: C-contiguous ``[n, g, g, stored]`` array of the stored dtype to read the
                data into (reuse it across batches: fresh buffers cost page faults).
        """
        group = self._level_group(teacher, level, indices)
        return _data_aux(self._read_groups([group], self._read_pipeline(pipeline), out)[0])

    def read_batches_encoded(
        self,
        requests: Sequence[tuple[str, LevelLike, Sequence[int]]],
        *,
        pipeline: str | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """``read_batch_encoded`` of several ``(teacher, level, indices)`` requests at once.

        Every chunk of every request is in flight together, in one round trip to zarr's event
        loop (a batch with the scale blend needs 10-15 levels: one round trip each cost more than
        the reads). Results and errors are those of ``read_batch_encoded`` request by request.
        """
        groups = [self._level_group(t, lv, idx) for t, lv, idx in requests]
        return [_data_aux(b) for b in self._read_groups(groups, self._read_pipeline(pipeline))]

    def read_pixels(
        self, indices: Sequence[int], masks: bool = True, *, pipeline: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images ``[n, T, T, 3]`` and masks ``[n, T, T]`` (None unless ``masks``) of tiles
        ``indices``, one batched read; rows equal ``read_image`` / ``read_mask``."""
        self._pixels_array("image")
        rows = [self._check_done(i) for i in indices]
        paths = ["pixels/image"] + (["pixels/mask"] if masks else [])
        groups = [([path], rows) for path in paths]
        bufs = self._read_groups(groups, self._read_pipeline(pipeline))
        return bufs[0][0], (bufs[1][0] if masks else None)

    def _read_pipeline(self, pipeline: str | None) -> str:
        """``_batch_pipeline(pipeline)``, with zarr-python for remote stores: zarrs hangs on an
        fsspec HTTP store (zarrs 0.2.3), so only local and ``memory://`` stores use it."""
        name = _batch_pipeline(pipeline)
        if name != "zarrs" or L.is_local(self.url) or self.url.startswith("memory://"):
            return name
        if pipeline is not None:
            raise ValueError(
                f"read pipeline 'zarrs' reads local stores only, not {self.url!r}; "
                "use pipeline=None or 'zarr'"
            )
        return "zarr"

    def _level_group(
        self, teacher: str, level: LevelLike, indices: Sequence[int]
    ) -> tuple[list[str], list[int]]:
        """The arrays and rows of a level read (``_level_paths``)."""
        return self._level_paths(teacher, level), [self._check_done(i) for i in indices]

    def _level_paths(self, teacher: str, level: LevelLike) -> list[str]:
        """A level's stored arrays: its data, then its codec side data when the codec has any."""
        key = self._level_key(teacher, level)
        paths = [L.feature_path(teacher, key)]
        if self.codec(teacher).aux_shape(self.schema.teacher(teacher).spec.channels) is not None:
            paths.append(L.aux_path(teacher, key))
        return paths

    def read_batch_half(
        self,
        teacher: str,
        indices: Sequence[int],
        level: LevelLike = "s1.00",
        *,
        pipeline: str | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Decoded float16 ``[n, g, g, C]``: row ``k`` equals ``read_half(teacher, indices[k])``.

        One batched, concurrent read of the tiles' chunks (``read_batch_encoded``); fp16 stores
        are read straight into ``out`` (a reusable C-contiguous float16 buffer, optional).
        """
        codec = self.codec(teacher)
        if isinstance(codec, Float16Codec):  # decode_half is the stored array itself
            return self.read_batch_encoded(teacher, indices, level, pipeline=pipeline, out=out)[0]
        data, aux = self.read_batch_encoded(teacher, indices, level, pipeline=pipeline)
        channels = self.schema.teacher(teacher).spec.channels
        res = _out_buffer(out, (len(data), *data.shape[1:3], channels), np.float16)
        for k in range(len(data)):
            # Tile by tile: a batched matmul (PCA) may round differently from read_half's.
            res[k] = codec.decode_half(data[k], None if aux is None else aux[k])
        return res

    def _read_groups(
        self,
        groups: list[tuple[list[str], list[int]]],
        pipeline: str,
        out: np.ndarray | None = None,
    ) -> list[list[np.ndarray]]:
        """Per ``(paths, rows)`` group, an ``[n, ...]`` buffer of ``rows`` of each array in
        ``paths`` (``out`` for the first), every read in flight at once."""
        reads = []  # (path, async array, buffer, each tile's first position)
        for g, (paths, rows) in enumerate(groups):
            first = {i: k for k, i in reversed(list(enumerate(rows)))}
            for p, path in enumerate(paths):
                arr = self._array(path)  # opened here: opening inside the event loop deadlocks
                o = out if g == p == 0 else None
                buf = _out_buffer(o, (len(rows), *arr.shape[1:]), arr.dtype)
                reads.append((path, self._pipeline_array(path, pipeline), buf, first))
        outcomes = iter(zarr_sync(self._read_paths(reads)) if reads else [])
        entries = iter(reads)
        result = []
        for paths, rows in groups:
            group = [(next(entries), next(outcomes)) for _ in paths]
            for i in rows:  # the caller's order, data before aux: the error read_encoded raises
                for (path, *_), outcome in group:
                    self._check_outcome(path, i, outcome[i])
            bufs = [buf for (_, _, buf, _), _ in group]
            first = group[0][0][3]
            for k, i in enumerate(rows):
                if first[i] != k:
                    for buf in bufs:
                        buf[k] = buf[first[i]]
            result.append(bufs)
        return result

    async def _read_paths(self, reads: list[tuple[str, Any, np.ndarray, dict[int, int]]]) -> Any:
        return await asyncio.gather(*(self._read_path(*read) for read in reads))

    async def _read_path(
        self, path: str, handle: Any, buf: np.ndarray, first: dict[int, int]
    ) -> dict[int, BaseException | int | None]:
        """Read tile ``i`` of ``path`` into ``buf[first[i]]`` for every ``i``: per tile its crc32
        (None when not verified) or the exception that stopped its read."""
        crc = self.verify_reads and path in self._crc_cols
        outer = handle.shards or handle.chunks
        if first and tuple(outer[1:]) == tuple(handle.shape[1:]):
            try:  # one selection of all the chunks: zarrs decodes them in parallel, in Rust
                await _read_tiles_at_once(handle, outer[0], first, buf)
            except Exception:  # noqa: BLE001 - some tile failed: find which, one read per tile
                pass
            else:
                return _checksums(buf, first) if crc else dict.fromkeys(first)
        jobs = [(handle, buf[k : k + 1], i, crc) for i, k in first.items()]
        return dict(zip(first, await _read_jobs(jobs) if jobs else [], strict=True))

    def _check_outcome(self, path: str, i: int, res: BaseException | int | None) -> None:
        """Raise ``_read_tile``'s error for a failed read or a crc32 mismatch of tile ``i``."""
        if isinstance(res, BaseException):
            raise self._tile_error(path, i, _read_failure(res)) from res
        if res is not None and res != int(self._recorded_crcs()[i, self._crc_cols[path]]):
            raise self._tile_error(path, i, _CRC_MISMATCH)

    def _pipeline_array(self, path: str, pipeline: str) -> Any:
        """The async array of ``path`` decoding through ``pipeline`` (opened once)."""
        arr = self._array(path)  # checks the array's metadata against the schema
        if pipeline == "zarr":
            return arr.async_array
        _ZARRS_FORK["used"] = True
        key = f"{pipeline}:{path}"  # kept in _arrays so that refresh() drops it too
        if key not in self._arrays:
            # zarr binds the codec pipeline when an array is opened, from the global config
            with zarr.config.set({"codec_pipeline.path": _ZARRS_PIPELINE}):
                self._arrays[key] = self._group[path]
        return self._arrays[key].async_array

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
        self._pixels_array("image")
        return self._read_tile("pixels/image", self._check_done(i))

    def read_mask(self, i: int) -> np.ndarray:
        """uint8 ``[T, T]`` mask of tile ``i`` (``ignore_index`` where unlabeled)."""
        self._pixels_array("mask")
        return self._read_tile("pixels/mask", self._check_done(i))

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


__all__ = ["BATCH_PIPELINES", "FeatureStore", "default_batch_pipeline", "open_store"]
