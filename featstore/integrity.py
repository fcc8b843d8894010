"""What every stored array must look like, derived from the schema alone.

Readers and ``verify_store`` compare the arrays' own metadata (``zarr.json``) against this, so
an edited ``data_type``, ``shape`` or ``fill_value`` is caught before its bytes are misread
(float16 bytes read as int16 keep their crc32, so checksums alone cannot see it).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from featstore import layout as L
from featstore.codecs import PCACodec, get_codec
from featstore.schema import StoreSchema


@dataclass(frozen=True)
class ArraySpec:
    """Expected dtype, shape and fill value of one array (``fill`` None: not checked)."""

    dtype: str
    shape: tuple[int, ...]
    fill: float | None = 0


def _teacher_specs(schema: StoreSchema, n: int) -> dict[str, ArraySpec]:
    out = {}
    for entry in schema.teachers:
        name, channels = entry.spec.name, entry.spec.channels
        codec = get_codec(entry.codec)
        stored = codec.stored_channels(channels)
        aux = codec.aux_shape(channels)
        for level in entry.levels:
            g = L.stored_geometry(schema, entry.spec, level).grid
            out[L.feature_path(name, level.key)] = ArraySpec(codec.stored_dtype, (n, g, g, stored))
            if aux is not None:
                out[L.aux_path(name, level.key)] = ArraySpec("float32", (n, *aux))
            out[L.stats_path(name, level.key)] = ArraySpec(
                "float64", (schema.n_shards(n), 3, channels)
            )
        if isinstance(codec, PCACodec):
            mean_p, basis_p = L.pca_paths(name)
            out[mean_p] = ArraySpec("float32", (channels,), None)
            out[basis_p] = ArraySpec("float32", (channels, stored), None)
    return out


def expected_arrays(schema: StoreSchema, n: int) -> dict[str, ArraySpec]:
    """Every array of a store of ``n`` tiles (the view bank's are checked by its own reader)."""
    t = schema.tile_size
    out = {
        "done": ArraySpec("uint8", (n,)),
        "checksum": ArraySpec("uint32", (n, len(L.checksum_arrays(schema)))),
        "tiles/window": ArraySpec("int64", (n, 4)),
        "tiles/transform": ArraySpec("float64", (n, 6), None),
    }
    if schema.store_pixels:
        out["pixels/image"] = ArraySpec("uint8", (n, t, t, 3))
        out["pixels/mask"] = ArraySpec("uint8", (n, t, t), schema.ignore_index)
    out.update(_teacher_specs(schema, n))
    return out


def _fill_differs(arr: zarr.Array, want: float) -> bool:
    fill = arr.fill_value
    try:
        return not bool(np.asarray(fill == want))
    except (TypeError, ValueError):
        return True


def spec_problems(arr: zarr.Array, path: str, spec: ArraySpec) -> list[str]:
    """How ``arr``'s metadata departs from ``spec`` (empty when it matches)."""
    out = []
    if np.dtype(arr.dtype) != np.dtype(spec.dtype):
        out.append(f"data_type is {arr.dtype}, the store's codec writes {spec.dtype}")
    if tuple(arr.shape) != spec.shape:
        out.append(f"shape is {tuple(arr.shape)}, the schema gives {spec.shape}")
    if spec.fill is not None and _fill_differs(arr, spec.fill):
        fill = np.asarray(arr.fill_value).tolist()  # a plain number, not np.float16(1.0)
        out.append(f"fill_value is {fill!r}, the store writes {spec.fill!r}")
    return [f"array {path}: {p} (its zarr.json was edited or damaged)" for p in out]


def open_array(group: zarr.Group, path: str) -> tuple[zarr.Array | None, str | None]:
    """``(array, None)``, or ``(None, problem)`` when the array is gone or its metadata broken."""
    try:
        arr = group[path]
    except KeyError:
        return None, f"array {path} is missing (its directory was deleted)"
    except Exception as err:  # noqa: BLE001 - unreadable zarr.json of any kind
        return None, f"array {path} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(arr, zarr.Array):
        return None, f"{path} is a group, not an array"
    return arr, None


def array_problems(group: zarr.Group, specs: dict[str, ArraySpec]) -> list[str]:
    """Missing, unreadable or mis-typed arrays among ``specs``."""
    out = []
    for path, spec in specs.items():
        arr, err = open_array(group, path)
        out += [err] if err else spec_problems(arr, path, spec)
    return out


def shard_file(url: str, arr: zarr.Array, path: str, tile: int) -> str:
    """The file that holds ``tile`` of ``arr`` (its shard, or its chunk when unsharded)."""
    outer = arr.shards or arr.chunks
    key = arr.metadata.encode_chunk_key((tile // outer[0],) + (0,) * (arr.ndim - 1))
    return f"{str(url).rstrip('/')}/{path}/{key}"


def missing_shard_files(
    arr: zarr.Array, path: str, fs: Any, root: str, crcs: np.ndarray, shards: list[slice]
) -> list[tuple[slice, str]]:
    """``(tiles, file)`` of each shard in ``shards`` whose file is gone though it held data.

    Zarr's sharding codec drops a shard whose chunks all equal the fill value (e.g. the masks
    of unlabeled tiles), so a missing file is only a loss when the recorded checksums
    (``crcs``: the column of ``path``, one per tile) say the tiles held something else.
    """
    fill = np.full((1, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
    fill_crc = zlib.crc32(np.ascontiguousarray(fill[0]))
    out = []
    for sl in shards:
        file = shard_file(root, arr, path, sl.start)
        if not bool((crcs[sl] == fill_crc).all()) and not fs.exists(file):
            out.append((sl, file))
    return out


__all__ = [
    "ArraySpec",
    "array_problems",
    "expected_arrays",
    "missing_shard_files",
    "open_array",
    "shard_file",
    "spec_problems",
]
