"""Check a store end to end: header, arrays, completeness, fingerprint, files, checksums, stats.

Everything a reader relies on is compared with an independent record: array metadata with what
the schema implies, the header with the fingerprint (field by field where the store recorded
per-field hashes), the teacher groups' attrs with the header, every done tile with its crc32,
and the header and per-shard statistics with the decoded features. Problems are returned as
readable strings; verify never raises on a damaged store.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Container
from typing import Any

import numpy as np
import zarr

from featstore import bank as B
from featstore import layout as L
from featstore.codecs import CodecError, FeatureCodec, PCACodec, get_codec
from featstore.errors import StoreError
from featstore.integrity import (
    expected_arrays,
    missing_shard_files,
    open_array,
    spec_problems,
)
from featstore.parts import part_provenance_problems
from featstore.schema import StoreSchema, fingerprint, fingerprint_parts
from featstore.writer import _merge_stats, shard_provenance_problems

MAX_LISTED = 20
REEXTRACT = (
    "repair it (`featcache repair SOURCE STORE` with the options it was extracted with), or "
    "re-extract the store (`featcache extract` into a new store, or with --overwrite)"
)


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
        return _verify(url, storage_options, check_data)
    except Exception as err:  # noqa: BLE001 - a report, never a traceback, on any damage
        return [f"verify stopped on a damaged store ({type(err).__name__}: {err}); {REEXTRACT}"]


def _verify(url: str, storage_options: dict[str, Any] | None, check_data: bool) -> list[str]:
    opened = _open(url, storage_options)
    if isinstance(opened, list):
        return opened
    group, meta, schema, done = opened
    tiles, problems = _read_index(group)
    specs = expected_arrays(schema, done.shape[0])
    broken: set[str] = set()
    for path, spec in specs.items():
        arr, err = open_array(group, path)
        found = [err] if err else spec_problems(arr, path, spec)
        if found:
            broken.add(path)
            problems += [f"{p}; {REEXTRACT}" for p in found]
    problems += _header_problems(meta, schema, tiles, done)
    problems += _teacher_attr_problems(group, schema, broken)
    problems += L.published_attr_problems(group, schema)  # what readers without featstore use
    problems += _checksum_table_problems(group, schema, broken)
    problems += _pca_problems(group, schema, broken)
    if "checksum" not in broken:
        problems += _missing_files(group, schema, url, done, storage_options, broken)
    bad_stats: set[str] = set()
    if check_data:
        if "checksum" not in broken:
            problems += _crc_problems(
                group, schema, L.checksum_arrays(schema), "checksum", done, broken
            )
        found, bad_stats = _decode_problems(group, schema, done, broken)
        problems += found
        problems += _label_stats_problems(group, schema, done, broken)
    problems += _stats_problems(group, meta, schema, broken | bad_stats)
    problems += _bank_problems(group, schema, url, storage_options, check_data)
    problems += _part_problems(group, schema, url, storage_options, check_data, tiles)
    problems += _metadata_problems(group, meta, schema, tiles, broken)
    # after the edit itself is named: a stale consolidated copy follows from most edits
    problems += [
        f"{path}: its consolidated metadata (in the root zarr.json) differs from its own "
        "zarr.json; run `featcache repair STORE` (it rewrites the consolidated copy)"
        for path in L.consolidated_mismatch(url, storage_options)
    ]
    # Every done shard must come from the header's extraction (two writers, issue 11 #4).
    # Not when the header or index was edited: shards then differ from the edit, not each other.
    if not any(p.startswith("fingerprint mismatch") for p in problems):
        problems += shard_provenance_problems(group, schema, tiles, done)
    return problems


def _open(
    url: str, storage_options: dict[str, Any] | None
) -> list[str] | tuple[zarr.Group, dict[str, Any], StoreSchema, np.ndarray]:
    try:
        # every node's own zarr.json: an edit hidden behind the consolidated copy is reported
        group = L.open_root(url, "r", storage_options, consolidated=False)
        meta = L.read_header(group, url)
    except (StoreError, KeyError, ValueError, OSError) as err:
        return [f"cannot open {url!r} as a feature store: {err}"]
    try:
        schema = StoreSchema.from_dict(meta["schema"])
    except (KeyError, TypeError, ValueError) as err:
        return [
            f"the header's schema is unreadable ({type(err).__name__}: {err}): the header "
            f"(zarr.json attributes 'featstore') was edited; {REEXTRACT}"
        ]
    arr, err = open_array(group, "done")
    try:
        done = np.asarray(arr[:]).astype(bool) if arr is not None else None
    except Exception as exc:  # noqa: BLE001 - a damaged chunk of any kind
        err = f"array done is unreadable ({type(exc).__name__}: {exc})"
        done = None
    if done is None:
        return [f"{err}: which tiles were written is unknown; {REEXTRACT}"]
    try:  # levels added later (`extract --add`) count as written only where their part is done
        done &= L.read_done(group, schema)
    except Exception as exc:  # noqa: BLE001 - a missing or damaged part table
        return [f"the done table of added levels is unreadable ({exc}); {REEXTRACT}"]
    return group, meta, schema, done


def _read_index(group: zarr.Group) -> tuple[list[Any] | None, list[str]]:
    """The tile index, or None and the damaged index array named."""
    try:
        return L.read_tiles(group), []
    except Exception:  # noqa: BLE001 - find the array to name below
        pass
    paths = [f"tiles/{f}" for f in L.TILE_STR_FIELDS] + ["tiles/window", "tiles/transform"]
    for path in paths:
        try:
            np.asarray(group[path][:])
        except Exception as err:  # noqa: BLE001 - a damaged chunk fails in many ways
            return None, [
                f"tile index array {path} is unreadable ({type(err).__name__}: "
                f"{err}); the fingerprint cannot be checked; {REEXTRACT}"
            ]
    return None, [f"the tile index (tiles/*) is inconsistent; {REEXTRACT}"]


def _header_problems(
    meta: dict[str, Any], schema: StoreSchema, tiles: list[Any] | None, done: np.ndarray
) -> list[str]:
    out = []
    if not meta.get("complete"):
        out.append("store is not complete: finalize() was never called")
    elif not meta.get("stats"):
        out.append("store is marked complete but has no statistics")
    if not done.all():
        listed = np.flatnonzero(~done)[:MAX_LISTED]
        ids = [tiles[i].tile_id for i in listed] if tiles is not None else listed.tolist()
        out.append(f"{int((~done).sum())} tile(s) not done, e.g. {ids}")
    if tiles is None:
        return out
    if len(tiles) != done.shape[0]:
        out.append(
            f"the tile index has {len(tiles)} tiles but done has {done.shape[0]}; {REEXTRACT}"
        )
    elif fingerprint(schema, tiles) != meta.get("fingerprint"):
        out.append(_fingerprint_message(meta, schema, tiles))
    return out


def _fingerprint_message(meta: dict[str, Any], schema: StoreSchema, tiles: list[Any]) -> str:
    """Name the fields that changed when the store recorded per-field hashes."""
    recorded = meta.get("fingerprint_parts")
    if not isinstance(recorded, dict):  # stores written before the per-field hashes
        return (
            "fingerprint mismatch: the recorded fingerprint does not match the schema and "
            "tile index stored in the store (edited or corrupted header/index)"
        )
    now = fingerprint_parts(schema, tiles)
    # a view bank added after extraction re-fingerprints the store without new parts
    changed = [
        k
        for k in sorted(set(recorded) | set(now))
        if recorded.get(k) != now.get(k) and not (k.startswith("schema.bank") and k not in recorded)
    ]
    what = ", ".join(changed) if changed else "(no single field: hashing changed)"
    return (
        f"fingerprint mismatch: {what} differ(s) from what the store was written with "
        f"(edited header or tile index); restore the field(s) or {REEXTRACT}"
    )


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key in value for k, v in _flat(value[key], f"{path}.{key}").items()}
    return {path.lstrip("."): value}


def _attr_diff(where: str, stored: Any, header: Any) -> list[str]:
    if not isinstance(stored, dict):
        return [f"{where} holds no teacher description ({stored!r}); {REEXTRACT}"]
    a, b = _flat(stored), _flat(header)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [
        f"{where}: {k} is {a.get(k)!r} there but {b.get(k)!r} in the header schema; "
        f"the attrs or the header were edited: {REEXTRACT}"
        for k in keys
    ]


def _teacher_attr_problems(group: zarr.Group, schema: StoreSchema, broken: set[str]) -> list[str]:
    out = []
    for entry in schema.teachers:
        name = entry.spec.name
        try:
            attrs = dict(group[f"teachers/{name}"].attrs)
        except Exception as err:  # noqa: BLE001 - missing or unreadable group metadata
            out.append(
                f"teacher group teachers/{name} is unreadable ({type(err).__name__}: "
                f"{err}); {REEXTRACT}"
            )
            continue
        out += _attr_diff(f"attrs of teachers/{name}", attrs.get("teacher"), entry.to_dict())
        for level in entry.levels:
            path = L.feature_path(name, level.key)
            if path not in broken:
                got = dict(group[path].attrs).get("level")
                out += _attr_diff(f"attrs of {path}", got, level.to_dict())
    return out


def _checksum_table_problems(group: zarr.Group, schema: StoreSchema, broken: set[str]) -> list[str]:
    if "checksum" in broken:
        return []
    names = L.checksum_arrays(schema)
    got = group["checksum"].attrs.get("arrays")
    if got != names:
        return [
            f"attrs of checksum: the columns are {got!r}, the schema gives {names}; {REEXTRACT}"
        ]
    return []


def _pca_problems(group: zarr.Group, schema: StoreSchema, broken: set[str]) -> list[str]:
    out = []
    for entry in schema.teachers:
        if _codec(group, entry, broken) is None and isinstance(get_codec(entry.codec), PCACodec):
            out.append(
                f"teacher {entry.spec.name!r}: PCA basis unusable (missing, damaged or "
                f"never fitted); {REEXTRACT}"
            )
    return out


def _codec(group: zarr.Group, entry: Any, broken: set[str]) -> FeatureCodec | None:
    """The teacher's codec with its PCA basis loaded; None when the basis is unusable."""
    codec = get_codec(entry.codec)
    if isinstance(codec, PCACodec):
        mean_p, basis_p = L.pca_paths(entry.spec.name)
        if {mean_p, basis_p} & broken:
            return None
        try:
            codec.set_basis(group[mean_p][:], group[basis_p][:])
        except Exception:  # noqa: BLE001 - CodecError, or a damaged chunk
            return None
    return codec


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
    broken: set[str],
) -> list[str]:
    fs, root = L.store_fs(url, storage_options)
    return _missing_for(
        group, schema, L.checksum_arrays(schema), "checksum", done, fs, root, broken
    )


def _part_problems(
    group: zarr.Group,
    schema: StoreSchema,
    url: str,
    storage_options: dict[str, Any] | None,
    check_data: bool,
    tiles: list[Any] | None,
) -> list[str]:
    """Files, checksums and provenance of the levels added by `extract --add` (each part has
    its own done and checksum tables; not-done tiles are reported with the others)."""
    fs, root = L.store_fs(url, storage_options)
    out = []
    for index, part in enumerate(schema.parts):
        done = np.asarray(group[L.part_path(part, L.PART_DONE)][:]).astype(bool)
        names = L.part_checksum_arrays(schema, part)
        table = L.part_path(part, L.PART_CHECKSUM)
        out += _missing_for(group, schema, names, table, done, fs, root)
        if check_data:
            out += _crc_problems(group, schema, names, table, done)
        out += part_provenance_problems(group, schema, index, tiles, done)
    return out


def _missing_for(
    group: zarr.Group,
    schema: StoreSchema,
    paths: list[str],
    checksum: str,
    done: np.ndarray,
    fs: Any,
    root: str,
    broken: Container[str] = (),
) -> list[str]:
    stored = np.asarray(group[checksum][:])
    shards = [sl for _, sl in _done_shards(schema, done)]
    base = len(root.rstrip("/")) + 1
    out = []
    for col, path in enumerate(paths):
        if path in broken:
            continue
        lost = missing_shard_files(group[path], path, fs, root, stored[:, col], shards)
        out += [
            f"missing shard file {file[base:]} (tiles {sl.start}..{sl.stop - 1}); {REEXTRACT}"
            for sl, file in lost
        ]
    return out


def _read_shard(arr: zarr.Array, sl: slice) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.asarray(arr[sl]), None
    except Exception as err:  # noqa: BLE001 - any codec/IO failure means a damaged shard
        return None, f"{type(err).__name__}: {err}"


def _unreadable_tiles(arr: zarr.Array, path: str, sl: slice, err: str | None) -> list[str]:
    """A shard that cannot be read whole, read tile by tile: with each chunk's crc32c (issue 16)
    the damaged tiles are named and the others still read."""
    bad = [i for i in range(sl.start, sl.stop) if _read_shard(arr, slice(i, i + 1))[0] is None]
    if not bad:  # only the whole-shard read fails (e.g. its index): the shard is named
        return [f"cannot read {path} tiles {sl.start}..{sl.stop - 1}: {err}"]
    return [_tile_read_problem(path, i, sl, _read_shard(arr, slice(i, i + 1))[1]) for i in bad]


def _tile_read_problem(path: str, i: int, sl: slice, err: str | None) -> str:
    if "checksum" in str(err).lower():  # the chunk's own crc32c: the same damage as a crc32 one
        return f"checksum mismatch in {path} tile {i} (corrupted or lost chunk)"
    return f"cannot read {path} tile {i} (shard of tiles {sl.start}..{sl.stop - 1}): {err}"


def _crc_problems(
    group: zarr.Group,
    schema: StoreSchema,
    names: list[str],
    checksum: str,
    done: np.ndarray,
    broken: Container[str] = (),
) -> list[str]:
    stored = np.asarray(group[checksum][:])
    out = []
    for col, path in enumerate(names):
        if path in broken:
            continue
        arr = group[path]
        for _, sl in _done_shards(schema, done):
            data, err = _read_shard(arr, sl)
            if data is None:
                out += _unreadable_tiles(arr, path, sl, err)
                continue
            bad = np.flatnonzero(L.tile_crcs(data) != stored[sl, col]) + sl.start
            out += [
                f"checksum mismatch in {path} tile {i} (corrupted or lost chunk)"
                for i in bad.tolist()
            ]
    return out


def _shard_stats(decoded: np.ndarray) -> np.ndarray:
    """(count, sum, sum of squares) per channel, as ``StoreWriter.write_shard`` records them."""
    x = np.asarray(decoded, dtype=np.float64)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    return np.stack(
        [
            np.full(x.shape[-1], n, np.float64),
            x.sum(axis=(0, 1, 2)),
            np.square(x).sum(axis=(0, 1, 2)),
        ]
    )


def _stats_match(stored: np.ndarray, recomputed: np.ndarray, codec: FeatureCodec) -> bool:
    """Whether a shard's recorded statistics are those of its decoded features.

    Exact where decoding is elementwise (fp16, int8): the writer's float64 sums of the same
    bytes in the same order give the same bits on any machine, so even a flip of a statistic's
    lowest bit is caught (bench/corruption.py). PCA decodes with a matmul whose rounding depends
    on the BLAS build, so there the sums are compared to a relative 1e-9.
    """
    if isinstance(codec, PCACodec):
        return bool(np.allclose(stored, recomputed, rtol=1e-9, atol=0.0))
    return bool(np.array_equal(stored, recomputed))


def _decode_problems(
    group: zarr.Group, schema: StoreSchema, done: np.ndarray, broken: set[str]
) -> tuple[list[str], set[str]]:
    """Decode every done shard once: undecodable data (e.g. NaN scales), and per-shard stats.

    Returns the problems and the per-shard stats arrays found wrong.
    """
    out, bad_stats = [], set()
    for entry in schema.teachers:
        codec = _codec(group, entry, broken)
        if codec is None:
            continue  # reported by _pca_problems
        for level in entry.levels:
            found = _level_decode_problems(group, schema, entry, level.key, codec, done, broken)
            out += found
            stats_p = L.stats_path(entry.spec.name, level.key)
            if any(stats_p in p for p in found):  # reported here: no second line for the header
                bad_stats.add(stats_p)
    return out, bad_stats


def _level_decode_problems(
    group: zarr.Group,
    schema: StoreSchema,
    entry: Any,
    key: str,
    codec: FeatureCodec,
    done: np.ndarray,
    broken: set[str],
) -> list[str]:
    name = entry.spec.name
    paths = [L.feature_path(name, key)]
    if codec.aux_shape(entry.spec.channels) is not None:
        paths.append(L.aux_path(name, key))
    stats_p = L.stats_path(name, key)
    if set(paths) & broken:
        return []
    stats, err = (None, None) if stats_p in broken else _read_shard(group[stats_p], slice(None))
    out = [f"cannot read {stats_p}: {err}; {REEXTRACT}"] if err else []
    for k, sl in _done_shards(schema, done):
        read = [_read_shard(group[p], sl) for p in paths]
        if any(e is not None for _, e in read):
            continue  # reported as unreadable by the checksum pass
        decoded = codec.decode(read[0][0], read[1][0] if len(read) > 1 else None)
        where = f"{name}/{key} tiles {sl.start}..{sl.stop - 1}"
        if not np.isfinite(decoded).all():
            out.append(f"{where} decode to non-finite values")
        elif stats is not None and not _stats_match(stats[k], _shard_stats(decoded), codec):
            out.append(
                f"per-shard statistics {stats_p}[{k}] do not match the features of "
                f"{where} (the array is damaged); {REEXTRACT}"
            )
    return out


def _stats_equal(header: Any, merged: dict[str, Any]) -> bool:
    if not isinstance(header, dict) or header.get("count") != merged["count"]:
        return False
    try:
        return all(
            np.allclose(
                np.asarray(header[f], np.float64), np.asarray(merged[f]), rtol=1e-9, atol=0.0
            )
            for f in ("mean", "std")
        )
    except (KeyError, TypeError, ValueError):
        return False


def _stats_problems(
    group: zarr.Group, meta: dict[str, Any], schema: StoreSchema, skip: set[str]
) -> list[str]:
    """The header statistics must be the merge of the per-shard ones (as finalize wrote them)."""
    header = meta.get("stats")
    if not meta.get("complete") or not isinstance(header, dict):
        return []
    out = []
    for entry in schema.teachers:
        name = entry.spec.name
        for level in entry.levels:
            path = L.stats_path(name, level.key)
            if path in skip:
                continue
            try:
                merged = _merge_stats(np.asarray(group[path][:]))
            except Exception as err:  # noqa: BLE001 - damaged chunk or a lost shard's count
                out.append(f"cannot merge {path} ({type(err).__name__}: {err}); {REEXTRACT}")
                continue
            got = (header.get(name) or {}).get(level.key)
            if not _stats_equal(got, merged):
                out.append(
                    f"header stats of {name}/{level.key} differ from the merged "
                    f"per-shard statistics ({path}): the header was edited; {REEXTRACT}"
                )
    return out


def _label_stats_problems(
    group: zarr.Group, schema: StoreSchema, done: np.ndarray, broken: set[str]
) -> list[str]:
    """The recorded label counts (``info``, ``train``) must be those of the stored masks.

    ``class_pixels`` is exact: unlabeled tiles store all-ignore masks, which add nothing.
    """
    stats = schema.label_stats
    if not stats or not schema.store_pixels or "pixels/mask" in broken or not done.all():
        return []
    n, k = done.shape[0], len(schema.class_names)
    out = []
    if stats.get("labeled_tiles", 0) + stats.get("unlabeled_tiles", 0) != n:
        out.append(
            f"header schema.label_stats counts {stats.get('labeled_tiles')} labeled + "
            f"{stats.get('unlabeled_tiles')} unlabeled tiles, the store has {n}: the "
            f"header was edited; {REEXTRACT}"
        )
    counts = np.zeros(k, np.int64)
    for _, sl in _done_shards(schema, done):
        masks, err = _read_shard(group["pixels/mask"], sl)
        if masks is None:
            return out  # reported by the checksum pass
        counts += np.bincount(masks.ravel(), minlength=256)[:k]
    if counts.tolist() != list(stats.get("class_pixels", [])):
        out.append(
            f"header schema.label_stats.class_pixels {stats.get('class_pixels')} differ "
            f"from the stored masks' counts {counts.tolist()}: the header was edited; "
            f"{REEXTRACT}"
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


# Metadata checked field by field above (spec_problems, _teacher_attr_problems,
# published_attr_problems, _checksum_table_problems): not reported twice.
_CHECKED_FIELDS = {"data_type", "shape", "fill_value"}
_CHECKED_ATTRS = {"teacher", "level", "arrays"}
# Not compared with the skeleton: attributes (key by key below); consolidated_metadata (a copy of
# the children's, checked on open by layout.consolidated_problem).
_UNCOMPARED_FIELDS = {"attributes", "consolidated_metadata"}


def _metadata_problems(
    group: zarr.Group,
    meta: dict[str, Any],
    schema: StoreSchema,
    tiles: list[Any] | None,
    broken: set[str],
) -> list[str]:
    """Every node's zarr.json must be what ``build_store`` writes for the header's schema.

    Catches what no field check names: an edited attribute (``layout``, ``reading``, ...), chunk
    grid, codecs or dimension names. Built in memory from the header and the tile index, so it
    costs no data read.
    """
    if tiles is None or schema.bank is not None:  # an unreadable index is reported already
        return []
    skeleton = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    L.build_store(skeleton, schema, tiles, str(meta.get("fingerprint", "")))
    checked = _CHECKED_ATTRS | _published_keys(schema)
    # the consolidation stamp is checked whenever the store is opened (L.consolidated_problem)
    root_skip = checked | {L.ATTR_KEY, L.CONSOLIDATED_KEY}
    out = _node_problems("the root group", group, skeleton, root_skip)
    for path, want in skeleton.members(max_depth=None):
        if path in broken:
            continue
        try:
            got = group[path]
        except Exception:  # noqa: BLE001 - missing/unreadable: reported by the array checks
            continue
        out += _node_problems(path, got, want, checked)
    return out


def _node_problems(where: str, got: Any, want: Any, skip_attrs: set[str]) -> list[str]:
    a, b = _plain(got.metadata.to_dict()), _plain(want.metadata.to_dict())
    out = []
    # Only what the store has: stores written before dimension names and descriptive attrs
    # lack them, and are sound (tests/featstore/test_open_without_featcache.py).
    for key in sorted(set(a) - _CHECKED_FIELDS - _UNCOMPARED_FIELDS):
        if key == "codecs" and a[key] == _without_chunk_crc(b.get(key)):
            continue  # written before the chunks' crc32c: sound, only without that check
        if a[key] is not None and a[key] != b.get(key) and where != "the root group":
            out.append(
                f"{where}: zarr.json {key} is {a.get(key)!r}, the schema gives {b.get(key)!r}"
            )
    got_attrs, want_attrs = a.get("attributes", {}), b.get("attributes", {})
    for key in sorted(set(got_attrs) - skip_attrs):
        if got_attrs.get(key) == want_attrs.get(key):
            continue
        out.append(f"{where}: attribute {key!r} differs from what the store writes")
    return [f"{p} (its zarr.json was edited or damaged); {REEXTRACT}" for p in out]


def _without_chunk_crc(codecs: Any) -> Any:
    """``codecs`` without the crc32c that shards' inner codecs end with (issue 16)."""
    out = _plain(codecs)
    for codec in out if isinstance(out, list) else []:
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            conf = codec["configuration"]
            conf["codecs"] = [c for c in conf["codecs"] if c.get("name") != "crc32c"]
    return out


def _plain(value: Any) -> Any:
    """Metadata as JSON reads it back (tuples as lists, numpy scalars as text)."""
    return json.loads(json.dumps(value, default=str))


def _published_keys(schema: StoreSchema) -> set[str]:
    """Attribute keys that ``published_attr_problems`` compares itself (absent ones are fine:
    stores written before them)."""
    keys: set[str] = set()
    for entry in schema.teachers:
        keys |= set(L.teacher_group_attrs(entry))
        for level in entry.levels:
            keys |= set(L.level_array_attrs(schema, entry, level))
    return keys


def damaged_shards(url: str, storage_options: dict[str, Any] | None = None) -> dict[int, list[str]]:
    """The structured variant of ``verify_store`` for repair: shard -> why it must be rewritten.

    A shard is named when it is not done, or any of its per-shard files (features, aux, pixels,
    per-shard stats, checksums, done, provenance) is unreadable, differs from its checksum or
    from the statistics of its decoded features (exactly, as the writer computed them), or was
    written by another extraction. The store's metadata (zarr.json, header) must be sound: a
    repair restores it first. Raises ``StoreError`` when the store cannot be opened at all.
    """
    group = L.open_root(str(url), "r", storage_options, consolidated=False)
    schema = StoreSchema.from_dict(L.read_header(group, str(url))["schema"])
    n = int(group["done"].shape[0])
    # root shards carry the original extraction's fingerprint (levels added later: parts)
    base = dataclasses.replace(schema.up_to_part(0), bank=None)
    want_fp = fingerprint(base, L.read_tiles(group))
    out: dict[int, list[str]] = {}
    for k in range(schema.n_shards(n)):
        r = schema.shard_range(k, n)
        reasons = _shard_reasons(group, schema, k, slice(r.start, r.stop), want_fp)
        if reasons:
            out[k] = reasons
    return out


def _shard_reasons(
    group: zarr.Group, schema: StoreSchema, k: int, sl: slice, want_fp: str
) -> list[str]:
    done, err = _read_shard(group["done"], sl)
    if err:
        return [f"done unreadable: {err}"]
    if not done.astype(bool).all():
        return ["not done"]
    crcs, err = _read_shard(group["checksum"], sl)
    if err:
        return [f"checksum unreadable: {err}"]
    fps, err = _read_shard(group[L.SHARD_FINGERPRINT], slice(k, k + 1))
    out = [] if err is None and str(fps[0]) == want_fp else ["provenance fingerprint differs"]
    for col, path in enumerate(L.checksum_arrays(schema)):
        data, err = _read_shard(group[path], sl)
        if err or not np.array_equal(L.tile_crcs(data), crcs[:, col]):
            out.append(f"{path}: {err or 'checksum mismatch'}")
    for part in schema.parts:
        out += _part_shard_reasons(group, schema, part, sl)
    if not out:
        out += _shard_stats_reasons(group, schema, k, sl)
    return out


def _part_shard_reasons(group: zarr.Group, schema: StoreSchema, part: Any, sl: slice) -> list[str]:
    """Damage to the levels an `extract --add` wrote in this shard (an unfinished addition is
    not damage: re-running it resumes)."""
    done, err = _read_shard(group[L.part_path(part, L.PART_DONE)], sl)
    if err:
        return [f"done of added levels {part.name} unreadable: {err}"]
    if not done.astype(bool).all():
        return []
    crcs, err = _read_shard(group[L.part_path(part, L.PART_CHECKSUM)], sl)
    if err:
        return [f"checksum of added levels {part.name} unreadable: {err}"]
    out = []
    for col, path in enumerate(L.part_checksum_arrays(schema, part)):
        data, err = _read_shard(group[path], sl)
        if err or not np.array_equal(L.tile_crcs(data), crcs[:, col]):
            out.append(f"{path}: {err or 'checksum mismatch'}")
    return out


def _shard_stats_reasons(group: zarr.Group, schema: StoreSchema, k: int, sl: slice) -> list[str]:
    out = []
    for entry in schema.teachers:
        codec = _codec(group, entry, set())
        if codec is None:
            return [f"teacher {entry.spec.name!r}: PCA basis unusable"]
        has_aux = codec.aux_shape(entry.spec.channels) is not None
        for level in entry.levels:
            name, key = entry.spec.name, level.key
            data = np.asarray(group[L.feature_path(name, key)][sl])
            aux = np.asarray(group[L.aux_path(name, key)][sl]) if has_aux else None
            stats, err = _read_shard(group[L.stats_path(name, key)], slice(k, k + 1))
            decoded = codec.decode(data, aux)
            if err or not np.isfinite(decoded).all():
                out.append(f"{L.stats_path(name, key)}[{k}]: {err or 'non-finite features'}")
            elif not _stats_match(stats[0], _shard_stats(decoded), codec):
                out.append(f"{L.stats_path(name, key)}[{k}] differs from the features")
    return out


__all__ = ["damaged_shards", "verify_store"]
