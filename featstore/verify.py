"""Check a store end to end: header, completeness, fingerprint, files and per-tile checksums."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from featstore import bank as B
from featstore import layout as L
from featstore.codecs import CodecError, PCACodec, get_codec
from featstore.errors import StoreError
from featstore.schema import StoreSchema, fingerprint

MAX_LISTED = 20


def verify_store(
    url: str, storage_options: dict[str, Any] | None = None, check_data: bool = True
) -> list[str]:
    """Return the store's problems as readable strings; an empty list means it is sound.

    Args:
        url: local path or fsspec URL.
        storage_options: fsspec options for remote URLs.
        check_data: also read every done tile and compare its crc32 (the slow part).
    """
    url = str(url)
    try:
        group = L.open_root(url, "r", storage_options)
        meta = L.read_header(group, url)
        schema = StoreSchema.from_dict(meta["schema"])
        tiles = L.read_tiles(group)
        done = np.asarray(group["done"][:]).astype(bool)
    except (StoreError, KeyError, ValueError, OSError) as err:
        return [f"cannot open {url!r} as a feature store: {err}"]
    problems = _header_problems(meta, schema, tiles, done)
    problems += _pca_problems(group, schema)
    problems += _missing_files(group, schema, url, done, storage_options)
    if check_data:
        problems += _checksum_problems(group, schema, done)
    problems += _bank_problems(group, schema, url, storage_options, check_data)
    return problems


def _header_problems(
    meta: dict[str, Any], schema: StoreSchema, tiles: list[Any], done: np.ndarray
) -> list[str]:
    out = []
    if not meta.get("complete"):
        out.append("store is not complete: finalize() was never called")
    elif not meta.get("stats"):
        out.append("store is marked complete but has no statistics")
    if not done.all():
        ids = [tiles[i].tile_id for i in np.flatnonzero(~done)[:MAX_LISTED]]
        out.append(f"{int((~done).sum())} tile(s) not done, e.g. {ids}")
    if fingerprint(schema, tiles) != meta.get("fingerprint"):
        out.append(
            "fingerprint mismatch: the recorded fingerprint does not match the schema and "
            "tile index stored in the store (edited or corrupted header/index)"
        )
    return out


def _pca_problems(group: zarr.Group, schema: StoreSchema) -> list[str]:
    out = []
    for entry in schema.teachers:
        codec = get_codec(entry.codec)
        if isinstance(codec, PCACodec):
            mean_p, basis_p = L.pca_paths(entry.spec.name)
            try:
                codec.set_basis(group[mean_p][:], group[basis_p][:])
            except (CodecError, KeyError) as err:
                out.append(f"teacher {entry.spec.name!r}: PCA basis unusable: {err}")
    return out


def _done_shards(schema: StoreSchema, done: np.ndarray) -> list[tuple[int, slice]]:
    n, out = done.shape[0], []
    for k in range(schema.n_shards(n)):
        r = schema.shard_range(k, n)
        sl = slice(r.start, r.stop)
        if done[sl].all():
            out.append((k, sl))
    return out


def _missing_files(
    group: zarr.Group,
    schema: StoreSchema,
    url: str,
    done: np.ndarray,
    storage_options: dict[str, Any] | None,
) -> list[str]:
    fs, root = L.store_fs(url, storage_options)
    return _missing_for(group, schema, L.checksum_arrays(schema), "checksum", done, fs, root)


def _missing_for(
    group: zarr.Group,
    schema: StoreSchema,
    paths: list[str],
    checksum: str,
    done: np.ndarray,
    fs: Any,
    root: str,
) -> list[str]:
    stored = np.asarray(group[checksum][:])
    out = []
    for col, path in enumerate(paths):
        arr = group[path]
        # Zarr's sharding codec drops a shard whose chunks all equal the fill value (e.g. the
        # masks of unlabeled tiles), so a missing file is only a loss when the recorded
        # checksums say the tiles held something else.
        fill = np.full((1, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
        fill_crc = L.tile_crcs(fill)[0]
        for k, sl in _done_shards(schema, done):
            key = arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
            all_fill = bool((stored[sl, col] == fill_crc).all())
            if not all_fill and not fs.exists(f"{root.rstrip('/')}/{path}/{key}"):
                out.append(
                    f"missing shard file {path}/{key} (tiles {sl.start}..{sl.stop - 1}); "
                    "re-extract that shard"
                )
    return out


def _read_shard(arr: zarr.Array, sl: slice) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.asarray(arr[sl]), None
    except Exception as err:  # noqa: BLE001 - any codec/IO failure means a damaged shard
        return None, f"{type(err).__name__}: {err}"


def _checksum_problems(group: zarr.Group, schema: StoreSchema, done: np.ndarray) -> list[str]:
    out = _crc_problems(group, schema, L.checksum_arrays(schema), "checksum", done)
    out += _decode_problems(group, schema, done)
    return out


def _crc_problems(
    group: zarr.Group, schema: StoreSchema, names: list[str], checksum: str, done: np.ndarray
) -> list[str]:
    stored = np.asarray(group[checksum][:])
    out = []
    for col, path in enumerate(names):
        arr = group[path]
        for _, sl in _done_shards(schema, done):
            data, err = _read_shard(arr, sl)
            if data is None:
                out.append(f"cannot read {path} tiles {sl.start}..{sl.stop - 1}: {err}")
                continue
            bad = np.flatnonzero(L.tile_crcs(data) != stored[sl, col]) + sl.start
            out += [
                f"checksum mismatch in {path} tile {i} (corrupted or lost chunk)"
                for i in bad.tolist()
            ]
    return out


def _decode_problems(group: zarr.Group, schema: StoreSchema, done: np.ndarray) -> list[str]:
    """Decode every done shard once to catch undecodable data (e.g. NaN scales)."""
    out = []
    for entry in schema.teachers:
        name = entry.spec.name
        codec = get_codec(entry.codec)
        has_aux = codec.aux_shape(entry.spec.channels) is not None
        try:
            if isinstance(codec, PCACodec):
                mean_p, basis_p = L.pca_paths(name)
                codec.set_basis(group[mean_p][:], group[basis_p][:])
        except (CodecError, KeyError):
            continue  # reported by _pca_problems
        for level in entry.levels:
            for _, sl in _done_shards(schema, done):
                data, err = _read_shard(group[L.feature_path(name, level.key)], sl)
                aux, err2 = (
                    _read_shard(group[L.aux_path(name, level.key)], sl) if has_aux else (None, None)
                )
                if data is None or err2 is not None:
                    continue  # reported as unreadable above
                if not np.isfinite(codec.decode(data, aux)).all():
                    out.append(
                        f"{name}/{level.key} tiles {sl.start}..{sl.stop - 1} decode to "
                        "non-finite values"
                    )
    return out


def _bank_problems(
    group: zarr.Group,
    schema: StoreSchema,
    url: str,
    storage_options: dict[str, Any] | None,
    check_data: bool,
) -> list[str]:
    """The same checks for the optional view bank (its own done flags and checksums)."""
    if schema.bank is None:
        return []
    try:
        reader = B.BankReader(url, group, schema)
    except (KeyError, StoreError) as err:
        return [f"view bank unreadable ({err}); rebuild it with build_view_bank(overwrite=True)"]
    done, out = reader.done(), []
    if not reader.complete:
        out.append("view bank is not complete: resume build_view_bank (it finalizes the bank)")
    if not done.all():
        out.append(
            f"{int((~done).sum())} tile(s) have no view bank yet, e.g. "
            f"{np.flatnonzero(~done)[:MAX_LISTED].tolist()}"
        )
    names = B.bank_checksum_arrays(schema)
    fs, root = L.store_fs(url, storage_options)
    out += _missing_for(group, schema, names, B.CHECKSUM, done, fs, root)
    if not check_data:
        return out
    out += _crc_problems(group, schema, names, B.CHECKSUM, done)
    params = reader.params()[done]
    out += [f"view bank params: {p}" for p in B.check_params(params, schema.bank, schema.tile_size)]
    for name in reader.teachers:
        try:
            codec = reader.codec(name)
        except (CodecError, KeyError):
            continue  # reported by _pca_problems
        has_aux = codec.aux_shape(schema.teacher(name).spec.channels) is not None
        for _, sl in _done_shards(schema, done):
            data, err = _read_shard(group[B.bank_path(name)], sl)
            aux, err2 = _read_shard(group[B.bank_aux_path(name)], sl) if has_aux else (None, None)
            if data is None or err2 is not None:
                continue  # reported as unreadable by the checksum pass
            if not np.isfinite(codec.decode(data, aux)).all():
                out.append(
                    f"{name}/bank tiles {sl.start}..{sl.stop - 1} decode to non-finite values"
                )
    return out


__all__ = ["verify_store"]
