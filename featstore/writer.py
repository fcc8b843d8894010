"""Create a store and write it shard by shard; a shard's ``done`` chunk is written last."""

from __future__ import annotations

import dataclasses
import errno
import functools
import glob
import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from featstore import layout as L
from featstore import lock
from featstore.bank import create_bank_arrays
from featstore.codecs import FeatureCodec, PCACodec, get_codec
from featstore.errors import (
    CodecError,
    FingerprintMismatchError,
    IncompleteStoreError,
    ShardDataError,
    ShardDoneError,
    StoreError,
    StoreFormatError,
    StoreLockedError,
    StoreWriteError,
)
from featstore.faults import fault_point
from featstore.schema import StoreSchema, TileRecord, dict_differences, fingerprint

MAX_LISTED_SHARDS = 20
MAX_COUNTED = 1000  # files counted when describing what occupies a STORE path
_TMP_RE = re.compile(r"\.tmp-(.+)-(\d+)-[0-9a-f]{8}$")
_LEGACY_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{8}$")
# errno values of a full disk or quota: the message says to free space and resume.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _check_tiles(tiles: Sequence[TileRecord]) -> None:
    if not tiles:
        raise StoreError("create_store needs at least one tile; the tile list is empty")
    ids = [t.tile_id for t in tiles]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise StoreError(f"tile ids must be unique; duplicated: {dup}")


def _differences(
    meta: dict[str, Any], schema: StoreSchema, tiles: Sequence[TileRecord], group: zarr.Group
) -> list[str]:
    stored = dict(meta.get("schema") or {})
    stored.pop("parts", None)  # where added levels are bookkept: layout, not a difference
    diffs = [_padding_hint(d) for d in dict_differences(stored, schema.to_dict())]
    diffs += _teacher_hint(stored, schema)
    old = L.read_tiles(group)
    if len(old) != len(tiles):
        diffs.append(f"tiles: stored {len(old)} tiles != requested {len(tiles)}")
        if len(old) < len(tiles) and _same_ids(old, tiles[: len(old)]):
            diffs.append(
                "SOURCE yields the stored tiles and new ones after them: to append the new "
                "tiles to the finished store, run the same command with --add"
            )
    else:
        for i, (a, b) in enumerate(zip(old, tiles, strict=True)):
            if (a.tile_id, a.pixel_hash) != (b.tile_id, b.pixel_hash):
                diffs.append(
                    f"tiles[{i}]: stored ({a.tile_id!r}, {a.pixel_hash!r}) != "
                    f"requested ({b.tile_id!r}, {b.pixel_hash!r})"
                )
                break
    return diffs or ["fingerprint differs (format version or hashing changed)"]


def _same_ids(a: Sequence[TileRecord], b: Sequence[TileRecord]) -> bool:
    return [(t.tile_id, t.pixel_hash) for t in a] == [(t.tile_id, t.pixel_hash) for t in b]


def _teacher_hint(stored: dict[str, Any], schema: StoreSchema) -> list[str]:
    """Name the teachers when they differ, and the option that adds teachers in place."""
    have = [t["spec"]["name"] for t in stored.get("teachers", [])]
    want = list(schema.teacher_names)
    if have == want:
        return []
    return [
        f"the store holds teachers {have}, this run asks for {want}: to add teachers or levels "
        "to a finished store, run the same command with --add (keeps what it holds)"
    ]


def _padding_hint(diff: str) -> str:
    """Say which extract option resumes a store that differs only in kept/cropped padding."""
    if diff == "schema.padding_tokens: only in the new schema":
        return f"{diff} (the store keeps padding tokens: resume it with --keep-padding)"
    if diff == "schema.padding_tokens: only in the stored schema":
        return f"{diff} (the store crops padding tokens: resume it with --crop-padding)"
    return diff


def _check_writable(url: str) -> None:
    if not L.is_local(url):
        return
    parent = os.path.dirname(L.local_path(url))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    parent = parent or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise StoreWriteError(
            f"cannot create store {url!r}: {parent!r} is not a writable directory; "
            "choose a writable path"
        )


def _exists(url: str, storage_options: dict[str, Any] | None) -> bool:
    fs, root = L.store_fs(url, storage_options)
    return bool(fs.exists(root)) and bool(fs.ls(root))


def create_store(
    url: str,
    schema: StoreSchema,
    tiles: Sequence[TileRecord],
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    run_id: str | None = None,
    break_lock: bool = False,
) -> StoreWriter:
    """Create a store (or reopen one with the same fingerprint to resume writing it).

    Only a featstore store is ever deleted (``overwrite``); any other non-empty directory is
    refused. With ``run_id`` (local stores), the returned writer holds the store's writer lock
    (``featcache.lock``) until ``StoreWriter.release_lock``; a stale lock of a dead process on
    this host is taken over, a live one refused unless ``break_lock``.

    Raises:
        FingerprintMismatchError: a store with another schema/tile list exists and not overwrite.
        StoreFormatError: something that is not a feature store occupies ``url``.
        StoreLockedError: another writer holds the lock.
        StoreWriteError: ``url`` cannot be written (or the disk is full).
    """
    url = str(url)
    tiles = list(tiles)
    _check_tiles(tiles)
    fp = fingerprint(schema, tiles)
    _check_writable(url)
    local = L.is_local(url)
    if local:
        _remove_orphans(L.local_path(url))
    lock_id = run_id if local else None
    if _exists(url, storage_options):
        _require_store(url, storage_options)
        if lock_id is not None:
            lock.acquire(L.local_path(url), lock_id, break_lock)
        try:
            if not overwrite:
                _check_same(url, schema, tiles, fp, storage_options)
                return StoreWriter.open(url, storage_options, run_id=run_id)
            _create(url, schema, tiles, fp, storage_options, lock_id, replace=True)
        except BaseException:
            if lock_id is not None:
                lock.remove_lock(L.local_path(url), lock_id)
            raise
    else:
        _create(url, schema, tiles, fp, storage_options, lock_id, replace=False)
    return StoreWriter.open(url, storage_options, run_id=run_id)


def _check_same(
    url: str,
    schema: StoreSchema,
    tiles: Sequence[TileRecord],
    fp: str,
    storage_options: dict[str, Any] | None,
) -> None:
    """Resuming needs the same fingerprint (a store that only adds a view bank counts)."""
    group = L.open_root(url, "r", storage_options)
    try:
        meta = L.read_header(group, url)
    except StoreFormatError as err:  # e.g. an older format version: a store, replaceable
        raise StoreFormatError(f"{err}; or re-run with --overwrite to replace it") from err
    if meta.get("fingerprint") != fp and not _same_but_bank(meta, schema, tiles):
        raise FingerprintMismatchError(url, _differences(meta, schema, tiles, group))


def _require_store(url: str, storage_options: dict[str, Any] | None) -> None:
    """Refuse a non-empty location that is not a featstore store: it is never written or deleted.

    A store is recognised by its root group's ``featstore`` header attribute, written by
    ``build_store`` (last) and only there.
    """
    try:
        group = L.open_root(url, "r", storage_options)
        is_store = isinstance(group.attrs.get(L.ATTR_KEY), dict)
    except (StoreFormatError, OSError, ValueError, KeyError):
        is_store = False
    if is_store:
        return
    raise StoreFormatError(
        f"STORE {url!r} {_describe_contents(url, storage_options)} that are not a featcache "
        "store; choose another STORE path (--overwrite only replaces a featcache store)"
    )


def _describe_contents(url: str, storage_options: dict[str, Any] | None) -> str:
    """'holds 12 files ..., e.g. a.txt, b.png' (counting stops at MAX_COUNTED)."""
    fs, root = L.store_fs(url, storage_options)
    if L.is_local(url):
        names = []
        for dirpath, _dirs, files in os.walk(root):
            names += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(files)]
            if len(names) > MAX_COUNTED:
                break
    else:
        names = [str(p).removeprefix(root).lstrip("/") for p in fs.find(root)[: MAX_COUNTED + 1]]
    if not names:
        return "holds folders but no files"
    count = f"more than {MAX_COUNTED}" if len(names) > MAX_COUNTED else str(len(names))
    return f"holds {count} file(s), e.g. {', '.join(names[:3])},"


def _remove_orphans(path: str) -> None:
    """Delete ``PATH.tmp-*`` folders left by a creation that was killed (its process is gone)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        if not os.path.isdir(tmp) or not _is_orphan(tmp):
            continue
        # Only folders we built: empty (killed before zarr wrote) or a zarr group.
        if not os.listdir(tmp) or os.path.exists(os.path.join(tmp, "zarr.json")):
            shutil.rmtree(tmp, ignore_errors=True)


def _is_orphan(tmp: str) -> bool:
    match = _TMP_RE.search(tmp)
    if match is None:
        return bool(_LEGACY_TMP_RE.search(tmp))  # named before tmp names carried a PID
    host, pid = match.group(1), int(match.group(2))
    if host != socket.gethostname():
        return False  # another host's creator: cannot tell whether it still runs
    return lock.is_stale(lock.LockInfo("", pid, host, "", ""))


def _create(
    url: str,
    schema: StoreSchema,
    tiles: Sequence[TileRecord],
    fp: str,
    storage_options: dict[str, Any] | None,
    lock_id: str | None,
    replace: bool,
) -> None:
    try:
        _create_fresh(url, schema, tiles, fp, storage_options, lock_id, replace)
    except OSError as err:  # permissions, read-only filesystems, bad remote buckets, disk full
        if err.errno in _NO_SPACE:
            raise StoreWriteError(
                f"no space left on the device of STORE {url!r} while creating it; free space "
                "(or choose a STORE on a larger disk), then re-run the same command"
            ) from err
        raise StoreWriteError(f"cannot write STORE {url!r}: {err}; choose a writable path") from err


def _same_but_bank(meta: dict[str, Any], schema: StoreSchema, tiles: Sequence[TileRecord]) -> bool:
    """A bank-less request matches a store that only adds a view bank (added after extraction)."""
    stored = StoreSchema.from_dict(meta["schema"])
    if schema.bank is not None or stored.bank is None:
        return False
    return fingerprint(dataclasses.replace(stored, bank=None), tiles) == fingerprint(schema, tiles)


def _build(group: zarr.Group, schema: StoreSchema, tiles: Sequence[TileRecord], fp: str) -> None:
    L.build_store(group, schema, tiles, fp)
    if schema.bank is not None:
        create_bank_arrays(group, schema, len(tiles))


def _create_fresh(
    url: str,
    schema: StoreSchema,
    tiles: Sequence[TileRecord],
    fp: str,
    storage_options: dict[str, Any] | None,
    lock_id: str | None = None,
    replace: bool = False,
) -> None:
    if not L.is_local(url):
        _build(L.open_root(url, "w", storage_options), schema, tiles, fp)
        return
    # Local: build beside the target, then rename, so the path is either absent or whole. The
    # name carries host and PID, so a later run can tell a killed creation from a live one.
    path = L.local_path(url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build(zarr.open_group(tmp, mode="w"), schema, tiles, fp)
        if lock_id is not None:  # the store appears already locked: no window for a second writer
            lock.write_lock(tmp, lock.current(lock_id))
        if replace and os.path.exists(path):
            shutil.rmtree(path)  # a featstore store whose lock we hold (_require_store, acquire)
        fault_point("create.before_rename")  # kill tests: a whole store built beside the target
        _rename(tmp, path, url)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _rename(tmp: str, path: str, url: str) -> None:
    """Move the built store into place; refuse when another writer created it meanwhile."""
    try:
        os.rename(tmp, path)  # fails on a non-empty directory: never replaces another's store
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        holder = lock.read_lock(path)
        who = holder.describe() if holder else "another process"
        raise StoreLockedError(
            f"STORE {url!r} was created by {who} while this run was creating it; two "
            "extractions write the same STORE: wait for the other one, or choose another STORE"
        ) from None


class StoreWriter:
    """Writes whole shard groups of an existing store; safe with one writer per shard."""

    def __init__(
        self, url: str, group: zarr.Group, meta: dict[str, Any], run_id: str | None = None
    ) -> None:
        self.url = url
        # The run this writer belongs to: (local stores) checked against the writer lock
        # before each shard, so a run whose lock was broken stops writing.
        self.run_id = run_id
        self._group = group
        self._meta = meta
        self.schema = StoreSchema.from_dict(meta["schema"])
        self.fingerprint: str = meta["fingerprint"]
        self.n_tiles: int = int(group["done"].shape[0])
        self.n_shards = self.schema.n_shards(self.n_tiles)
        self._codecs: dict[str, FeatureCodec] = {}
        self._checksum_names = L.checksum_arrays(self.schema)
        # Bookkeeping arrays this writer commits shards to (a PartWriter uses its part's).
        self._done_path, self._checksum_path = "done", "checksum"
        self._provenance_path = L.SHARD_FINGERPRINT

    @classmethod
    def open(
        cls, url: str, storage_options: dict[str, Any] | None = None, run_id: str | None = None
    ) -> StoreWriter:
        """Open an existing store for writing (e.g. inside a dask worker, with the run's id)."""
        group = L.open_root(str(url), "r+", storage_options)
        return cls(str(url), group, L.read_header(group, str(url)), run_id)

    @functools.cached_property
    def feature_fingerprint(self) -> str:
        """Fingerprint of the extraction without a view bank (a bank added later changes the
        header's fingerprint but not the shards written before it)."""
        if self.schema.bank is None and not self.schema.parts:
            return self.fingerprint
        # levels added later (parts) are written under their own provenance (featstore.parts)
        base = dataclasses.replace(self.schema.up_to_part(0), bank=None)
        return fingerprint(base, self.tiles)

    def release_lock(self) -> None:
        """Give up the writer lock this run holds (no-op without one)."""
        if self.run_id is not None and L.is_local(self.url):
            lock.remove_lock(L.local_path(self.url), self.run_id)

    def _check_lock(self, k: int) -> None:
        """Refuse to write when another writer took the store's lock (e.g. --break-lock)."""
        if self.run_id is None or not L.is_local(self.url):
            return
        path = L.local_path(self.url)
        holder = lock.read_lock(path)
        if holder is not None and holder.run_id != self.run_id:
            raise StoreLockedError(
                f"shard {k} of STORE {self.url!r} not written: the writer lock is now held by "
                f"{holder.describe()} (broken with --break-lock?); this run stops"
            )

    @property
    def complete(self) -> bool:
        """Whether the header says the store was finalized."""
        return bool(self._meta.get("complete"))

    @property
    def tiles(self) -> list[TileRecord]:
        """The tile index."""
        return L.read_tiles(self._group)

    def shard_tiles(self, k: int) -> range:
        """Tile indices of shard group ``k``."""
        if not 0 <= k < self.n_shards:
            raise StoreError(f"shard {k} out of range: {self.url!r} has {self.n_shards} shards")
        return self.schema.shard_range(k, self.n_tiles)

    def done(self) -> np.ndarray:
        """bool ``[N]``: tiles whose shard is committed."""
        return np.asarray(self._group[self._done_path][:]).astype(bool)

    def shard_done(self, k: int) -> bool:
        """Whether shard ``k`` is committed."""
        r = self.shard_tiles(k)
        return bool(np.asarray(self._group[self._done_path][r.start : r.stop]).all())

    def shard_intact(self, k: int) -> bool:
        """Whether every per-tile array of shard ``k`` still matches its recorded checksums
        (unreadable data counts as not intact)."""
        sl = slice(self.shard_tiles(k).start, self.shard_tiles(k).stop)
        try:
            stored = np.asarray(self._group[self._checksum_path][sl])
            for col, path in enumerate(self._checksum_names):
                if not np.array_equal(L.tile_crcs(self._group[path][sl]), stored[:, col]):
                    return False
        except (OSError, ValueError, RuntimeError):  # truncated or undecodable chunk files
            return False
        return True

    def uncommit_shard(self, k: int) -> None:
        """Clear shard ``k``'s done marker, so that it is rewritten whole (a damaged shard)."""
        r = self.shard_tiles(k)
        self._group[self._done_path][r.start : r.stop] = 0

    def pending_shards(self) -> list[int]:
        """Shards not yet committed, ascending."""
        done = self.done()
        return [
            k
            for k in range(self.n_shards)
            if not done[self.shard_tiles(k).start : self.shard_tiles(k).stop].all()
        ]

    def codec(self, teacher: str) -> FeatureCodec:
        """The teacher's codec (PCA loaded from the store; CodecError if not yet set)."""
        if teacher not in self._codecs:
            codec = get_codec(self.schema.teacher(teacher).codec)
            if isinstance(codec, PCACodec):
                mean_p, basis_p = L.pca_paths(teacher)
                codec.set_basis(self._group[mean_p][:], self._group[basis_p][:])
            self._codecs[teacher] = codec
        return self._codecs[teacher]

    def set_pca(self, teacher: str, mean: np.ndarray, basis: np.ndarray) -> None:
        """Store the fitted PCA basis of ``teacher`` (before any shard is written)."""
        codec = get_codec(self.schema.teacher(teacher).codec)
        if not isinstance(codec, PCACodec):
            raise CodecError(
                f"teacher {teacher!r} uses codec {codec.name!r}, which has no PCA basis to set"
            )
        if self.done().any():
            raise StoreError(
                f"{self.url!r}: set_pca after shards were written would corrupt "
                "them; re-extract the store with --overwrite (overwrite=True)"
            )
        codec.set_basis(mean, basis)
        mean_p, basis_p = L.pca_paths(teacher)
        self._group[mean_p][:] = codec.mean
        self._group[basis_p][:] = codec.basis
        self._codecs[teacher] = codec

    def write_shard(
        self,
        k: int,
        features: Mapping[str, Mapping[str, np.ndarray]],
        images: np.ndarray | None = None,
        masks: np.ndarray | None = None,
    ) -> None:
        """Write every array of shard ``k`` whole, then its stats and checksums, ``done`` last.

        Args:
            k: shard group index (one writer per shard).
            features: ``{teacher: {level_key: float32 [n, g, g, C]}}`` for every teacher/level.
            images: uint8 ``[n, T, T, 3]`` (required when the store keeps pixels).
            masks: uint8 ``[n, T, T]`` or None (filled with ``ignore_index``).
        """
        tiles = self.shard_tiles(k)
        if self._meta.get("complete") or self.shard_done(k):
            raise ShardDoneError(
                f"shard {k} of {self.url!r} is already done; only pending "
                "shards are written (see pending_shards())"
            )
        arrays = self._encode_all(features, len(tiles))
        arrays.update(self._pixels(images, masks, len(tiles)))
        self._check_lock(k)
        try:
            self._write_arrays(k, tiles, arrays)
        except OSError as err:
            if err.errno in _NO_SPACE:
                raise StoreWriteError(
                    f"no space left on the device of STORE {self.url!r} while writing shard {k}; "
                    "free space, then re-run the same command: finished shards are kept and the "
                    "run resumes"
                ) from err
            raise

    def _write_arrays(self, k: int, tiles: range, arrays: dict[str, np.ndarray]) -> None:
        sl = slice(tiles.start, tiles.stop)
        for path, data in arrays.items():
            if not path.endswith("_stats"):
                fault_point("write.array")  # kill tests: between the arrays of a shard
                self._group[path][sl] = data
        for path, data in arrays.items():
            if path.endswith("_stats"):
                self._group[path][k] = data
        fault_point("write.before_checksum")
        crcs = np.stack([L.tile_crcs(arrays[p]) for p in self._checksum_names], axis=1)
        self._group[self._checksum_path][sl] = crcs
        if self._provenance_path in self._group:  # stores written before provenance lack it
            self._group[self._provenance_path][k] = self.feature_fingerprint
        fault_point("write.before_done")  # all data written, the done marker not yet
        self._group[self._done_path][sl] = 1
        fault_point("write.after_done")

    def _encode_all(
        self, features: Mapping[str, Mapping[str, np.ndarray]], n: int
    ) -> dict[str, np.ndarray]:
        if set(features) != set(self.schema.teacher_names):
            raise ShardDataError(
                f"features must hold exactly the teachers "
                f"{list(self.schema.teacher_names)}, got {sorted(features)}"
            )
        out: dict[str, np.ndarray] = {}
        for entry in self.schema.teachers:
            name, levels = entry.spec.name, features[entry.spec.name]
            keys = [lv.key for lv in entry.levels]
            if set(levels) != set(keys):
                raise ShardDataError(f"teacher {name!r} needs levels {keys}, got {sorted(levels)}")
            codec = self.codec(name)
            for key in keys:
                out.update(self._encode_level(codec, name, key, levels[key], n))
        return out

    def _encode_level(
        self, codec: FeatureCodec, name: str, key: str, x: np.ndarray, n: int
    ) -> dict[str, np.ndarray]:
        shape = self._group[L.feature_path(name, key)].shape
        want = (n, shape[1], shape[2], self.schema.teacher(name).spec.channels)
        if tuple(np.shape(x)) != want:
            raise ShardDataError(
                f"{name}/{key}: expected features of shape {want}, got {tuple(np.shape(x))}; "
                "check the teacher's grid rule (TeacherSpec.extra grid_rounding) and the level"
            )
        data, aux = codec.encode(np.asarray(x, dtype=np.float32))
        decoded = np.asarray(codec.decode(data, aux), dtype=np.float64)
        stats = np.stack(
            [
                np.full(want[3], n * want[1] * want[2], np.float64),
                decoded.sum(axis=(0, 1, 2)),
                np.square(decoded).sum(axis=(0, 1, 2)),
            ]
        )
        out = {L.feature_path(name, key): data, L.stats_path(name, key): stats}
        if aux is not None:
            out[L.aux_path(name, key)] = aux
        return out

    def _pixels(
        self, images: np.ndarray | None, masks: np.ndarray | None, n: int
    ) -> dict[str, np.ndarray]:
        if not self.schema.store_pixels:
            if images is not None or masks is not None:
                raise ShardDataError(
                    "this store does not keep pixels (store_pixels=False); "
                    "pass images=None, masks=None"
                )
            return {}
        t = self.schema.tile_size
        if images is None:
            raise ShardDataError(f"store {self.url!r} keeps pixels: write_shard needs images")
        images = np.asarray(images)
        if images.shape != (n, t, t, 3) or images.dtype != np.uint8:
            raise ShardDataError(
                f"images must be uint8 {(n, t, t, 3)}, got {images.dtype} {images.shape}"
            )
        if masks is None:
            masks = np.full((n, t, t), self.schema.ignore_index, np.uint8)
        masks = np.asarray(masks)
        if masks.shape != (n, t, t) or masks.dtype != np.uint8:
            raise ShardDataError(
                f"masks must be uint8 {(n, t, t)}, got {masks.dtype} {masks.shape}"
            )
        return {"pixels/image": images, "pixels/mask": masks}

    def finalize(self) -> dict[str, Any]:
        """Merge per-shard stats in shard order into the header and mark the store complete."""
        pending = self.pending_shards()
        if pending:
            raise IncompleteStoreError(
                f"cannot finalize {self.url!r}: {len(pending)} shard(s) pending, e.g. "
                f"{pending[:10]}; write them (resume) before finalize()"
            )
        if not L.read_done(self._group, self.schema).all():
            raise IncompleteStoreError(
                f"cannot finalize {self.url!r}: the levels added by `featcache extract --add` "
                "are not all written; re-run that command to finish the addition"
            )
        stats: dict[str, dict[str, Any]] = {}
        for entry in self.schema.teachers:
            name = entry.spec.name
            stats[name] = {}
            for lv in entry.levels:
                fault_point("finalize.merge")  # kill tests: during the stats merge
                stats[name][lv.key] = _merge_stats(self._group[L.stats_path(name, lv.key)][:])
        fault_point("finalize.before_header")
        meta = dict(self._meta, complete=True, stats=stats)
        self._group.attrs[L.ATTR_KEY] = meta
        self._meta = meta
        # last: a store killed before this line is complete, only slower to open remotely
        fault_point("finalize.before_consolidate")
        L.consolidate_group(self._group)
        return stats


def _merge_stats(per_shard: np.ndarray) -> dict[str, Any]:
    total = np.zeros(per_shard.shape[1:], np.float64)
    for row in per_shard:  # shard order: the float sums are reproducible
        total += row
    count = total[0]
    if not (count > 0).all():
        raise StoreFormatError("a stats array has a shard with no count: was a shard lost?")
    mean = total[1] / count
    var = np.maximum(total[2] / count - mean**2, 0.0)
    return {"count": int(count[0]), "mean": mean.tolist(), "std": np.sqrt(var).tolist()}


def shard_provenance_problems(
    group: zarr.Group, schema: StoreSchema, tiles: Sequence[TileRecord] | None, done: np.ndarray
) -> list[str]:
    """Done shards that another extraction wrote than the one in the header (two writers).

    Stores written before per-shard provenance existed have no record to check: none reported.
    """
    if tiles is None or L.SHARD_FINGERPRINT not in group:
        return []
    # the root table's shards hold the original extraction's levels (parts: featstore.parts)
    want = fingerprint(dataclasses.replace(schema.up_to_part(0), bank=None), tiles)
    fps = [str(v) for v in group[L.SHARD_FINGERPRINT][:].tolist()]
    out = []
    for k, fp in enumerate(fps):
        r = schema.shard_range(k, len(done))
        if fp == want or not done[r.start : r.stop].all():
            continue
        out.append(
            f"shard {k} (tiles {r.start}..{r.stop - 1}) was written by another extraction "
            f"(fingerprint {fp[:16] or 'not recorded'}) than the header's ({want[:16]}): two "
            "writers wrote this store; re-extract it with --overwrite"
        )
    if len(out) > MAX_LISTED_SHARDS:
        out = out[:MAX_LISTED_SHARDS] + [f"... and {len(out) - MAX_LISTED_SHARDS} more such shards"]
    return out


__all__ = ["StoreWriter", "create_store", "shard_provenance_problems"]
