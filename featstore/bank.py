"""Exact view bank: K pre-drawn views per tile and each teacher's tokens on every view.

A bank is optional per store and described by ``StoreSchema.bank`` (a ``BankSpec``, part of the
fingerprint). Layout (beside the cached levels, same shard groups)::

    bank/params            int32 [N, K, 4]  (S, oy, ox, flip) per view, chunks (tps, K, 4)
    teachers/<name>/bank   [N, K, g, g, C'] the teacher's own output grid on the view (crop px
                           canvas, g = TeacherSpec.grid_size(crop, base_size)); chunks
                           (1, 1, g, g, C') so one view is one read; shards (tps, K, g, g, C')
    teachers/<name>/bank_aux  codec side data per view (int8: [N, K, 2, C])
    bank/checksum          uint32 [N, n_bank_arrays] crc32 per tile of each bank array
    bank/done              uint8 [N] chunks (tps,), written last per shard group

The bank has its own ``done`` marker, so it can be added to a finished store (``add_bank``) or
written right after a level shard by the extraction, and a crash in either pass leaves the other
intact. The teacher's output grid is stored (not the student grid): the trainer resamples it with
the same function online mode uses, so bank targets equal online targets to codec precision.
The views are drawn outside featstore (``pipelines.viewbank``); ``check_params`` enforces the
rule's ranges on write and in ``verify_store``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import zarr

from featstore import layout as L
from featstore.codecs import FeatureCodec, PCACodec, get_codec
from featstore.errors import (
    FingerprintMismatchError,
    IncompleteStoreError,
    ShardDataError,
    ShardDoneError,
    StoreError,
    StoreFormatError,
    TileNotDoneError,
)
from featstore.schema import BankSpec, StoreSchema, dict_differences, fingerprint

PARAMS = "bank/params"
DONE = "bank/done"
CHECKSUM = "bank/checksum"
MAX_LISTED = 20


def bank_path(teacher: str) -> str:
    """Bank array of a teacher."""
    return f"teachers/{teacher}/bank"


def bank_aux_path(teacher: str) -> str:
    """Per-view codec side data of a teacher's bank."""
    return f"teachers/{teacher}/bank_aux"


def _spec(schema: StoreSchema) -> BankSpec:
    if schema.bank is None:
        raise StoreFormatError(
            "the store has no view bank; add one with pipelines.viewbank.build_view_bank"
        )
    return schema.bank


def bank_grid(schema: StoreSchema, teacher: str) -> int:
    """Tokens per side of the teacher's output on a ``crop`` px view."""
    spec = schema.teacher(teacher).spec
    return spec.grid_size(_spec(schema).crop, schema.base_size)


def bank_checksum_arrays(schema: StoreSchema) -> list[str]:
    """Paths covered by ``bank/checksum``, in column order."""
    names = [PARAMS]
    for name in schema.bank_teachers:
        entry = schema.teacher(name)
        names.append(bank_path(name))
        if get_codec(entry.codec).aux_shape(entry.spec.channels) is not None:
            names.append(bank_aux_path(name))
    return names


def nbytes_per_tile(schema: StoreSchema, teacher: str) -> int:
    """Stored bytes of one tile's bank of ``teacher``: K views x (grid bytes + aux bytes), each
    chunk with its crc32c."""
    entry = schema.teacher(teacher)
    codec = get_codec(entry.codec)
    g = bank_grid(schema, teacher)
    crc = CRC32C_BYTES * len(L.CHUNK_CHECKSUM)
    per_view = g * g * codec.stored_channels(entry.spec.channels)
    per_view *= np.dtype(codec.stored_dtype).itemsize
    per_view += crc
    aux = codec.aux_shape(entry.spec.channels)
    if aux is not None:
        per_view += int(np.prod(aux)) * 4 + crc
    return _spec(schema).k * per_view


CRC32C_BYTES = 4  # what zarr's crc32c codec appends to each chunk


def create_bank_arrays(group: zarr.Group, schema: StoreSchema, n: int) -> None:
    """Create the bank arrays of ``schema.bank`` (existing ones are replaced)."""
    spec, tps = _spec(schema), schema.tiles_per_shard
    k = spec.k
    common: dict[str, Any] = {"fill_value": 0, "config": L.ARRAY_CONFIG, "overwrite": True}
    group.require_group("bank")
    params = group.create_array(
        PARAMS,
        shape=(n, k, 4),
        chunks=(tps, k, 4),
        dtype="int32",
        **common,
        dimension_names=("tile", "view", "param"),
    )
    params.attrs["layout"] = "per view (S, oy, ox, flip): zoomed size, crop offsets, h-flip flag"
    for name in schema.bank_teachers:
        entry = schema.teacher(name)
        codec = get_codec(entry.codec)
        g, c = bank_grid(schema, name), codec.stored_channels(entry.spec.channels)
        ch_dim = L.stored_channel_dim(codec)
        has_aux = codec.aux_shape(entry.spec.channels) is not None
        arr = group.create_array(
            bank_path(name),
            shape=(n, k, g, g, c),
            dtype=codec.stored_dtype,
            chunks=(1, 1, g, g, c),
            shards=(tps, k, g, g, c),
            compressors=L.CHUNK_CHECKSUM,
            **common,
            dimension_names=("tile", "view", "y_bank", "x_bank", ch_dim),
        )
        # A view axis before y/x: the same formula applies, aux[tile, view, 0/1, channel].
        arr.attrs["decode"] = codec.decode_attrs("bank", "bank_aux" if has_aux else None)
        aux = codec.aux_shape(entry.spec.channels)
        if aux is not None:
            aux_arr = group.create_array(
                bank_aux_path(name),
                shape=(n, k, *aux),
                dtype="float32",
                chunks=(1, k, *aux),
                shards=(tps, k, *aux),
                compressors=L.CHUNK_CHECKSUM,
                **common,
                dimension_names=("tile", "view", "scale_offset", ch_dim),
            )
            aux_arr.attrs["layout"] = L.AUX_LAYOUT.replace("[tile, ", "[tile, view, ")
    cols = bank_checksum_arrays(schema)
    arr = group.create_array(
        CHECKSUM,
        shape=(n, len(cols)),
        chunks=(tps, len(cols)),
        dtype="uint32",
        **common,
        # Not the root checksum's "checksum_column": xarray checks a group against its parent.
        dimension_names=("tile", "bank_checksum_column"),
    )
    arr.attrs.update(arrays=cols, layout=L.CHECKSUM_LAYOUT)
    done = group.create_array(
        DONE, shape=(n,), chunks=(tps,), dtype="uint8", **common, dimension_names=("tile",)
    )
    done.attrs["layout"] = "1 when the tile's bank views were written completely"
    group["bank"].attrs["bank"] = {"spec": spec.to_dict(), "complete": False}


def _has_arrays(group: zarr.Group, schema: StoreSchema) -> bool:
    return all(p in group for p in [DONE, CHECKSUM, *bank_checksum_arrays(schema)])


def check_params(params: np.ndarray, spec: BankSpec, tile_size: int) -> list[str]:
    """Problems of ``[..., 4]`` view params against the bank rule's ranges (empty = ok)."""
    p = np.asarray(params).reshape(-1, 4).astype(np.int64)
    lo, hi = spec.size_range(tile_size)
    size, oy, ox, flip = p.T
    span = np.maximum(size, spec.crop) - spec.crop
    out = []
    bad = (size < lo) | (size > hi)
    if bad.any():
        out.append(f"view sizes outside [{lo}, {hi}], e.g. {sorted(set(size[bad].tolist()))[:5]}")
    if ((oy < 0) | (oy > span) | (ox < 0) | (ox > span)).any():
        out.append("crop offsets outside [0, max(S, crop) - crop]")
    if ((flip != 0) & (flip != 1)).any():
        out.append("flip flags other than 0/1")
    return out


def _codec(group: zarr.Group, schema: StoreSchema, teacher: str) -> FeatureCodec:
    codec = get_codec(schema.teacher(teacher).codec)
    if isinstance(codec, PCACodec):
        mean_p, basis_p = L.pca_paths(teacher)
        codec.set_basis(group[mean_p][:], group[basis_p][:])
    return codec


def add_bank(
    url: str, spec: BankSpec, overwrite: bool = False, storage_options: dict[str, Any] | None = None
) -> BankWriter:
    """Add a view bank to an existing store (or reopen the same bank to resume writing it).

    The bank arrays are created first and the header (schema with ``bank``, new fingerprint) is
    rewritten last, so a crash in between leaves the store as it was.

    Raises:
        FingerprintMismatchError: the store has another bank and not ``overwrite``.
    """
    url = str(url)
    group = L.open_root(url, "r+", storage_options)
    meta = L.read_header(group, url)
    schema = StoreSchema.from_dict(meta["schema"])
    if schema.bank == spec:
        return BankWriter.open(url, storage_options)
    if schema.bank is not None and not overwrite:
        raise FingerprintMismatchError(
            url, dict_differences(schema.bank.to_dict(), spec.to_dict(), "schema.bank")
        )
    new = dataclasses.replace(schema, bank=spec)
    n = int(group["done"].shape[0])
    create_bank_arrays(group, new, n)
    tiles = L.read_tiles(group)
    group.attrs[L.ATTR_KEY] = dict(meta, schema=new.to_dict(), fingerprint=fingerprint(new, tiles))
    return BankWriter.open(url, storage_options)


class _BankBase:
    """Shared state of bank readers and writers."""

    def __init__(self, url: str, group: zarr.Group, schema: StoreSchema) -> None:
        self.url = url
        self._group = group
        self.schema = schema
        self.spec = _spec(schema)
        self.n_tiles = int(group["done"].shape[0])
        self.n_shards = schema.n_shards(self.n_tiles)
        self._codecs: dict[str, FeatureCodec] = {}

    @property
    def k(self) -> int:
        """Views per tile."""
        return self.spec.k

    @property
    def teachers(self) -> tuple[str, ...]:
        """Teachers with a bank."""
        return self.schema.bank_teachers

    @property
    def complete(self) -> bool:
        """Whether every bank shard is written and the bank was finalized."""
        return bool(dict(self._group["bank"].attrs.get("bank", {})).get("complete"))

    def shard_tiles(self, k: int) -> range:
        """Tile indices of shard group ``k``."""
        if not 0 <= k < self.n_shards:
            raise StoreError(f"shard {k} out of range: {self.url!r} has {self.n_shards} shards")
        return self.schema.shard_range(k, self.n_tiles)

    def done(self) -> np.ndarray:
        """bool ``[N]``: tiles whose bank shard is committed."""
        return np.asarray(self._group[DONE][:]).astype(bool)

    def codec(self, teacher: str) -> FeatureCodec:
        """The teacher's codec (the levels' codec, PCA basis from the store)."""
        if teacher not in self._codecs:
            self._codecs[teacher] = _codec(self._group, self.schema, teacher)
        return self._codecs[teacher]

    def grid(self, teacher: str) -> int:
        """Tokens per side of the teacher's bank grids."""
        self._check_teacher(teacher)
        return int(self._group[bank_path(teacher)].shape[2])

    def nbytes_per_tile(self, teacher: str) -> int:
        """Stored bytes of one tile's K views of ``teacher``."""
        self._check_teacher(teacher)
        return nbytes_per_tile(self.schema, teacher)

    def _check_teacher(self, teacher: str) -> None:
        if teacher not in self.teachers:
            raise StoreFormatError(
                f"teacher {teacher!r} has no view bank in {self.url!r} (banked: "
                f"{list(self.teachers)}); rebuild the bank with that teacher"
            )


class BankWriter(_BankBase):
    """Writes whole bank shard groups; one writer per shard, ``bank/done`` chunk last."""

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> BankWriter:
        """Open the bank of an existing store for writing (creates missing arrays: resume)."""
        group = L.open_root(str(url), "r+", storage_options)
        schema = StoreSchema.from_dict(L.read_header(group, str(url))["schema"])
        _spec(schema)
        if not _has_arrays(group, schema):  # header written but arrays lost (remote crash)
            create_bank_arrays(group, schema, int(group["done"].shape[0]))
        return cls(str(url), group, schema)

    def pending_shards(self) -> list[int]:
        """Bank shards not yet committed, ascending."""
        done = self.done()
        return [
            k
            for k in range(self.n_shards)
            if not done[self.shard_tiles(k).start : self.shard_tiles(k).stop].all()
        ]

    def write_bank_shard(self, k: int, params: np.ndarray, features: dict[str, np.ndarray]) -> None:
        """Write shard ``k``'s views and tokens, then checksums, then ``bank/done``.

        Args:
            k: shard group index.
            params: int ``[n, K, 4]`` (S, oy, ox, flip) of every view.
            features: ``{teacher: float32 [n, K, g, g, C]}`` for every banked teacher.
        """
        tiles = self.shard_tiles(k)
        n = len(tiles)
        if self.done()[tiles.start : tiles.stop].all():
            raise ShardDoneError(
                f"bank shard {k} of {self.url!r} is already done; write only pending_shards()"
            )
        arrays = {PARAMS: self._params(params, n)}
        if set(features) != set(self.teachers):
            raise ShardDataError(
                f"bank features must hold exactly the teachers "
                f"{list(self.teachers)}, got {sorted(features)}"
            )
        for name in self.teachers:
            arrays.update(self._encode(name, features[name], n))
        sl = slice(tiles.start, tiles.stop)
        for path, data in arrays.items():
            self._group[path][sl] = data
        cols = bank_checksum_arrays(self.schema)
        self._group[CHECKSUM][sl] = np.stack([L.tile_crcs(arrays[p]) for p in cols], axis=1)
        self._group[DONE][sl] = 1

    def _params(self, params: np.ndarray, n: int) -> np.ndarray:
        p = np.asarray(params)
        if p.shape != (n, self.k, 4) or not np.issubdtype(p.dtype, np.integer):
            raise ShardDataError(
                f"bank params must be int [{n}, {self.k}, 4], got {p.dtype} {p.shape}"
            )
        problems = check_params(p, self.spec, self.schema.tile_size)
        if problems:
            raise ShardDataError(f"bank params break the bank rule: {'; '.join(problems)}")
        return p.astype(np.int32)

    def _encode(self, name: str, x: np.ndarray, n: int) -> dict[str, np.ndarray]:
        g, c = self.grid(name), self.schema.teacher(name).spec.channels
        want = (n, self.k, g, g, c)
        if tuple(np.shape(x)) != want:
            raise ShardDataError(
                f"{name}/bank: expected features {want}, got "
                f"{tuple(np.shape(x))}; run the teacher on the crop px views"
            )
        data, aux = self.codec(name).encode(np.asarray(x, np.float32).reshape(n * self.k, g, g, c))
        out = {bank_path(name): data.reshape(n, self.k, *data.shape[1:])}
        if aux is not None:
            out[bank_aux_path(name)] = aux.reshape(n, self.k, *aux.shape[1:])
        return out

    def finalize(self) -> None:
        """Mark the bank complete (every shard must be done)."""
        pending = self.pending_shards()
        if pending:
            raise IncompleteStoreError(
                f"cannot finalize the bank of {self.url!r}: "
                f"{len(pending)} bank shard(s) pending, e.g. {pending[:10]}"
            )
        self._group["bank"].attrs["bank"] = {"spec": self.spec.to_dict(), "complete": True}
        L.consolidate_group(self._group)  # the bank's arrays and attrs, for remote readers


class BankReader(_BankBase):
    """Read access to a store's view bank; trusts only tiles whose bank shard is done."""

    def __init__(self, url: str, group: zarr.Group, schema: StoreSchema) -> None:
        super().__init__(url, group, schema)
        self._done = super().done()
        self._params: np.ndarray | None = None

    def done(self) -> np.ndarray:
        """bool ``[N]`` as of open / ``refresh``."""
        return self._done.copy()

    def refresh(self) -> None:
        """Re-read the done flags and params (a writer may have progressed)."""
        self._done, self._params = super().done(), None

    def _check_done(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n_tiles:
            raise IndexError(f"tile {i} out of range: {self.url!r} has {self.n_tiles} tiles")
        if not self._done[i]:
            raise TileNotDoneError(
                f"the view bank of tile {i} in {self.url!r} is not written; resume build_view_bank"
            )
        return i

    def params(self, i: int | None = None) -> np.ndarray:
        """int32 ``[K, 4]`` (S, oy, ox, flip) of tile ``i``, or ``[N, K, 4]`` when ``i`` is None.

        The whole (small) array is read once and kept; rows of tiles not done are zeros.
        """
        if self._params is None:
            self._params = np.asarray(self._group[PARAMS][:])
        return self._params if i is None else self._params[self._check_done(i)]

    def read(self, teacher: str, i: int, slot: int) -> np.ndarray:
        """Decoded float32 ``[g, g, C]`` teacher tokens of view ``slot`` of tile ``i``."""
        self._check_teacher(teacher)
        i, slot = self._check_done(i), int(slot)
        if not 0 <= slot < self.k:
            raise IndexError(f"bank slot {slot} out of range: the bank has K={self.k} views")
        data = self._group[bank_path(teacher)][i, slot]
        aux = self._aux(teacher, (i, slot))
        return np.asarray(self.codec(teacher).decode(data, aux), np.float32)

    def read_views(self, teacher: str, i: int) -> np.ndarray:
        """Decoded float32 ``[K, g, g, C]`` of every view of tile ``i``."""
        self._check_teacher(teacher)
        i = self._check_done(i)
        data = self._group[bank_path(teacher)][i]
        return np.asarray(self.codec(teacher).decode(data, self._aux(teacher, i)), np.float32)

    def _aux(self, teacher: str, index: Any) -> np.ndarray | None:
        if self.codec(teacher).aux_shape(self.schema.teacher(teacher).spec.channels) is None:
            return None
        return np.asarray(self._group[bank_aux_path(teacher)][index])


__all__ = [
    "BankReader",
    "BankSpec",
    "BankWriter",
    "add_bank",
    "bank_aux_path",
    "bank_checksum_arrays",
    "bank_grid",
    "bank_path",
    "check_params",
    "create_bank_arrays",
    "nbytes_per_tile",
]
