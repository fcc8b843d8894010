"""Store layout shared by writer, reader and verify: paths, URLs, header, tile index."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from featstore.codecs import PCA_BASIS, PCA_MEAN, FeatureCodec, PCACodec, get_codec
from featstore.errors import StoreFormatError
from featstore.geometry import LevelGeometry
from featstore.schema import (
    FORMAT_VERSION,
    LevelSpec,
    StorePart,
    StoreSchema,
    TeacherEntry,
    TeacherSpec,
    TileRecord,
    fingerprint_parts,
)

ATTR_KEY = "featstore"
# Root attr: the header hash the consolidated metadata was written for (`consolidated_problem`).
CONSOLIDATED_KEY = "featstore_consolidated"
TILE_STR_FIELDS = ("tile_id", "source", "split", "pixel_hash", "crs")
# Per-shard provenance (see _provenance_array); absent from stores written before it existed.
SHARD_FINGERPRINT = "shard_fingerprint"
# Layout texts written as attrs, for readers without featstore.
AUX_LAYOUT = (
    "codec side data [tile, 2, channel]: index 0 = scale, index 1 = offset of the int8 affine map "
    "(per tile and per stored channel)"
)
STATS_LAYOUT = (
    "per shard [shard, 3, channel]: (token count, sum, sum of squares) of the decoded features"
)
CHECKSUM_LAYOUT = (
    "crc32 (zlib) of each tile's bytes of each array in attrs['arrays'] (columns in that order)"
)
DONE_LAYOUT = "1 when the tile's shard was written completely (written last per shard)"
# How to read the store without featstore (root attrs; the card of issue 16 builds on it).
READING = (
    "Open with xarray.open_datatree(STORE, engine='zarr'). Axis 'tile' is the same in every "
    "group: tiles/ holds each tile's id, source, window and split; done[tile] == 1 marks tiles "
    "written. teachers/<name>/<level> holds one teacher's encoded tokens [tile, y, x, channel or "
    "component]; its attrs['decode'] gives the formula, the numpy expression and the arrays of "
    "the same group it uses (tile axis first), attrs['geometry'] where its tokens sit on the "
    "tile. pixels/ (when kept) holds the tile's RGB image and label mask."
)
# Every chunk is written even when it equals the fill value, so a missing key always means loss.
ARRAY_CONFIG = {"write_empty_chunks": True}
# crc32c of each chunk, the last inner codec of the shard: any zarr reader detects a corrupt chunk
# (stores written before it have none and still read; docs/store-format.md "Checksums").
CHUNK_CHECKSUM = (Crc32cCodec(),)
# pixels: zarr's default compressor (zstd level 0), then the chunk checksum
PIXEL_COMPRESSORS = (ZstdCodec(level=0, checksum=False), *CHUNK_CHECKSUM)


def package_version() -> str:
    """Version of the installed package (``0+unknown`` when run from a plain checkout)."""
    try:
        return metadata.version("featcache")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def is_local(url: str) -> bool:
    """True for a filesystem path or a ``file://`` URL."""
    return "://" not in str(url) or str(url).startswith("file://")


def local_path(url: str) -> str:
    """Absolute filesystem path of a local store URL."""
    url = str(url)
    return os.path.abspath(url[len("file://") :] if url.startswith("file://") else url)


def is_zip_path(url: str) -> bool:
    """True for a local ``.zip`` file (a published store; read through zarr's ``ZipStore``)."""
    return is_local(url) and str(url).lower().endswith(".zip")


def store_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, root path) of a store URL, for raw file checks."""
    if is_zip_path(url):
        return fsspec.filesystem("zip", fo=local_path(url)), ""
    if is_local(url):
        return fsspec.filesystem("file"), local_path(url)
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _zip_store(url: str, mode: str) -> zarr.storage.ZipStore:
    if mode != "r":
        raise StoreFormatError(
            f"{url!r} is a zip file, which featcache opens read-only: extract or append into a "
            "store folder, then make a zip of it with `featcache publish STORE OUT --zip`"
        )
    if not os.path.isfile(local_path(url)):
        raise StoreFormatError(f"no feature store at {url!r}: the zip file does not exist")
    return zarr.storage.ZipStore(local_path(url), mode="r")


def open_root(
    url: str,
    mode: str = "r",
    storage_options: dict[str, Any] | None = None,
    consolidated: bool = True,
) -> zarr.Group:
    """Open the store's root group (``StoreFormatError`` when there is none).

    ``url``: a folder, a ``.zip`` file (read-only) or an fsspec URL (``http://``, ``zip://``,
    ``memory://``, ``s3://``...; remote protocols need their fsspec packages).
    ``consolidated=False``: read every node's own ``zarr.json`` (what ``verify`` checks).
    """
    target: Any = local_path(url) if is_local(url) else url
    if is_zip_path(url):
        target = _zip_store(url, mode)
    # The consolidated copy saves requests to remote stores only: local stores (folders, zips)
    # read every node's own zarr.json, cheap and always the truth. Writers see the real metadata;
    # their first root attrs write drops the consolidated copy.
    # zarr_format=3: featstore writes v3 only; unset, zarr would also probe the v2 files (3 more
    # requests per open over HTTP)
    remote_read = mode == "r" and consolidated and not is_local(url)
    kwargs: dict[str, Any] = {
        "mode": mode,
        "zarr_format": 3,
        "use_consolidated": None if remote_read else False,
    }
    if storage_options and not is_local(url):
        kwargs["storage_options"] = storage_options
    try:
        group = zarr.open_group(target, **kwargs)
        if remote_read and consolidated_problem(group):
            # never trust a stale copy: read the real metadata instead (one request per node)
            group = zarr.open_group(target, **dict(kwargs, use_consolidated=False))
        return group
    except FileNotFoundError as err:
        raise StoreFormatError(
            f"no feature store at {url!r}: check the path, or create one with `featcache extract`"
        ) from err
    except ImportError as err:  # fsspec's protocol packages are optional
        raise StoreFormatError(_missing_protocol_package(url, err)) from err


def header_stamp(meta: dict[str, Any]) -> str:
    """sha256 of the ``featstore`` header, recorded when the metadata is consolidated."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _expected_nodes(schema: StoreSchema) -> list[str]:
    """Nodes whose absence from the consolidated copy makes it stale (a bank added after it)."""
    nodes = ["done", "checksum", "tiles/tile_id", *checksum_arrays(schema)]
    return nodes + (["bank/done", "bank/params"] if schema.bank is not None else [])


def consolidated_problem(group: zarr.Group) -> str | None:
    """Why ``group``'s consolidated metadata cannot be trusted (None: absent, or fresh).

    Fresh = it was written by `consolidate` for the header the root holds now (the root
    ``zarr.json`` is always read itself, so its header is the real one) and lists every array
    that header implies. Writers outside featstore that edit a child's metadata are not seen:
    run `consolidate` (``featcache repair``) after such edits.
    """
    if group.metadata.consolidated_metadata is None:
        return None
    meta, stamp = group.attrs.get(ATTR_KEY), group.attrs.get(CONSOLIDATED_KEY)
    if not isinstance(meta, dict) or not isinstance(stamp, dict):
        return "consolidated metadata not written by featstore"
    if stamp.get("header_sha256") != header_stamp(dict(meta)):
        return "the header changed after the metadata was consolidated"
    try:
        nodes = set(group.metadata.consolidated_metadata.flattened_metadata)
        expected = _expected_nodes(StoreSchema.from_dict(meta["schema"]))
        missing = [p for p in expected if p not in nodes]
    except Exception as err:  # noqa: BLE001 - a header this featstore cannot parse
        return f"unreadable header ({type(err).__name__})"
    return f"consolidated metadata lacks {missing[0]}" if missing else None


def consolidated_mismatch(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Nodes whose consolidated copy differs from their own ``zarr.json`` (empty: none, or the
    store is not consolidated). Reads every node's metadata: for ``verify``, not for opening."""
    target = local_path(url) if is_local(url) and not is_zip_path(url) else None
    group = (
        zarr.open_group(target, mode="r", zarr_format=3)  # local: open_root skips the copy
        if target is not None
        else open_root(url, "r", storage_options)
    )
    cm = group.metadata.consolidated_metadata
    if cm is None:
        return []
    real = open_root(url, "r", storage_options, consolidated=False)
    out = []
    for path, meta in sorted(cm.flattened_metadata.items()):
        try:
            own = real[path].metadata.to_dict()
        except Exception:  # noqa: BLE001 - a node gone or unreadable
            own = None
        copy = meta.to_dict()
        if own is not None:
            own.pop("consolidated_metadata", None)
        copy.pop("consolidated_metadata", None)
        if _json_plain(own) != _json_plain(copy):
            out.append(path)
    return out


def _json_plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def consolidate_group(group: zarr.Group) -> None:
    """Write the consolidated metadata of an open (``r+``) store, stamped with its header."""
    group.attrs[CONSOLIDATED_KEY] = {"header_sha256": header_stamp(dict(group.attrs[ATTR_KEY]))}
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not (yet) part of the v3 spec: known; readers
        # without it read the real metadata, and readers with it check the stamp above
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        # the writer's lock file (featcache.lock) beside the arrays is not a zarr node: skipped
        warnings.filterwarnings(
            "ignore", message="Object at .* is not recognized", category=UserWarning
        )
        zarr.consolidate_metadata(group.store)


def refresh_consolidated(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Re-consolidate a store whose metadata was consolidated before a node was added to it
    (e.g. the text group): a plain zarr reader trusts the copy and would not see the node."""
    if is_zip_path(url):
        return  # read-only
    kwargs: dict[str, Any] = {"mode": "r", "zarr_format": 3, "use_consolidated": None}
    if storage_options and not is_local(url):
        kwargs["storage_options"] = storage_options
    target = local_path(url) if is_local(url) else url
    if zarr.open_group(target, **kwargs).metadata.consolidated_metadata is not None:
        consolidate(url, storage_options)


def consolidate(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Consolidate a store's metadata (all ``zarr.json`` in the root one) so that opening it over
    HTTP takes a few requests. Run after anything edits the metadata (finalize, bank, repair)."""
    if is_zip_path(url):
        raise StoreFormatError(f"{url!r} is a zip file (read-only): consolidate the folder first")
    group = open_root(url, "r+", storage_options)
    read_header(group, url)
    consolidate_group(group)


# The fsspec packages a protocol needs, by the pip extra that declares them (pyproject).
PROTOCOL_EXTRAS = {"http": "http", "https": "http"}


def _missing_protocol_package(url: str, err: ImportError) -> str:
    protocol = str(url).split("://", 1)[0].split("::", 1)[0]
    extra = PROTOCOL_EXTRAS.get(protocol)
    fix = (
        f"pip install 'featcache[{extra}]'"
        if extra
        else f"install the fsspec package for {protocol}:// (e.g. s3fs for s3://, gcsfs for gs://)"
    )
    return f"cannot open {url!r}: {err}; {fix}"


def read_header(group: zarr.Group, url: str) -> dict[str, Any]:
    """The ``featstore`` root attribute, checked for presence and format version."""
    meta = group.attrs.get(ATTR_KEY)
    if not isinstance(meta, dict):
        raise StoreFormatError(
            f"{url!r} is a zarr group without a featstore header (not a feature store, or its "
            "creation was interrupted); choose another STORE path (or delete it yourself if "
            "it is an interrupted store)"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreFormatError(
            f"store {url!r} has format version {version!r}; this featstore reads version "
            f"{FORMAT_VERSION}: re-extract the store or install a matching featstore"
        )
    return dict(meta)


def feature_path(teacher: str, key: str) -> str:
    """Array of a teacher level."""
    return f"teachers/{teacher}/{key}"


def aux_path(teacher: str, key: str) -> str:
    """Per-tile codec side data of a teacher level."""
    return f"teachers/{teacher}/{key}_aux"


def stats_path(teacher: str, key: str) -> str:
    """Per-shard (count, sum, sumsq) of a teacher level."""
    return f"teachers/{teacher}/{key}_stats"


def pca_paths(teacher: str) -> tuple[str, str]:
    """(mean, basis) arrays of a teacher's PCA codec."""
    return f"teachers/{teacher}/{PCA_MEAN}", f"teachers/{teacher}/{PCA_BASIS}"


def stored_channel_dim(codec: FeatureCodec) -> str:
    """Dimension name of a stored array's last axis: PCA stores coefficients, not channels (a
    separate name, so xarray does not see one ``channel`` dimension with two sizes)."""
    return "component" if isinstance(codec, PCACodec) else "channel"


def geometry_attrs(geo: LevelGeometry) -> dict[str, Any]:
    """A level's geometry as store attrs (``LevelGeometry``'s docstring, in numbers)."""
    return {
        "scale": geo.level.scale,
        "flipped": geo.level.flipped,
        "tile_px": geo.tile_size,
        "render_px": geo.render,
        "canvas_px": geo.canvas,
        "input_px": geo.input_px,
        "stride": geo.stride,
        "grid": geo.grid,
        "tokens_per_tile_px": geo.tokens_per_tile_px,
        "convention": (
            "the tile (h-flipped first when flipped) is resized to render_px, padded right/bottom "
            "to canvas_px, resized to input_px and encoded to a grid x grid token map; token j's "
            "centre is at input px (j + 0.5) * stride, i.e. tile px (j + 0.5) / "
            "tokens_per_tile_px (x measured from the right edge when flipped)"
        ),
    }


def _decode_attrs(entry: TeacherEntry, key: str) -> dict[str, Any]:
    codec = get_codec(entry.codec)
    has_aux = codec.aux_shape(entry.spec.channels) is not None
    return codec.decode_attrs(key, f"{key}_aux" if has_aux else None)


def level_array_attrs(schema: StoreSchema, entry: TeacherEntry, level: LevelSpec) -> dict[str, Any]:
    """Attrs of a level array for readers without featstore: its decode recipe and geometry."""
    return {
        "geometry": geometry_attrs(stored_geometry(schema, entry.spec, level)),
        "decode": _decode_attrs(entry, level.key),
    }


def teacher_group_attrs(entry: TeacherEntry) -> dict[str, Any]:
    """Readable summary of a teacher group (beside the full ``teacher`` entry)."""
    spec = entry.spec
    return {
        "decode": _decode_attrs(entry, "<level>"),
        "layer": spec.layer,
        "weights": spec.weights,
        "weights_sha256": spec.weights_sha256,
        "preprocessing": {
            "resize": spec.resize.to_dict(),
            "order": (
                "canvas RGB in [0, 1] resized to input_px with torch.nn.functional.interpolate"
                "(**resize), then (x - mean) / std per channel"
            ),
            "mean": list(spec.mean),
            "std": list(spec.std),
            "input_size_at_base": spec.input_size,
        },
        "channels": spec.channels,
    }


def readable_grid(geo: LevelGeometry) -> int:
    """Token rows (= columns) of ``geo``'s grid that a point of the tile can read.

    A tile point has token coordinate ``u <= valid_tokens - 0.5`` and bilinear sampling reads
    tokens ``floor(u)`` and ``floor(u) + 1``; the rest of the grid lies over canvas padding (for
    flipped levels too: they are computed on the flipped tile, padded right/bottom).
    """
    return min(geo.grid, math.floor(geo.valid_tokens - 0.5) + 2)


def stored_geometry(schema: StoreSchema, spec: TeacherSpec, level: LevelSpec) -> LevelGeometry:
    """Geometry of a level as the schema stores it (``padding_tokens="cropped"``: the grid is the
    top-left ``readable_grid`` corner of the canvas grid, same token coordinates)."""
    geo = LevelGeometry.from_specs(schema.tile_size, schema.base_size, level, spec)
    if schema.padding_tokens == "kept":
        return geo
    return dataclasses.replace(geo, grid=readable_grid(geo))


def checksum_arrays(schema: StoreSchema) -> list[str]:
    """Paths of the per-tile arrays covered by ``checksum``, in column order (levels added to
    the store later have their own table: ``part_checksum_arrays``)."""
    names = _level_checksum_arrays(schema, None)
    if schema.store_pixels:
        names += ["pixels/image", "pixels/mask"]
    return names


def _level_checksum_arrays(schema: StoreSchema, part: StorePart | None) -> list[str]:
    """Feature (and aux) paths of the levels ``part`` added (None: the original extraction's)."""
    names: list[str] = []
    for entry in schema.teachers:
        has_aux = get_codec(entry.codec).aux_shape(entry.spec.channels) is not None
        for level in entry.levels:
            if schema.part_of(entry.spec.name, level.key) != part:
                continue
            names.append(feature_path(entry.spec.name, level.key))
            if has_aux:
                names.append(aux_path(entry.spec.name, level.key))
    return names


# Bookkeeping of the levels added to a finished store (``StorePart``): parts/<name>/<array>.
PARTS_GROUP = "parts"
PART_DONE, PART_CHECKSUM = "done", "checksum"


def part_path(part: StorePart, array: str) -> str:
    """Path of a part's ``done``, ``checksum`` or ``shard_fingerprint`` array."""
    return f"{PARTS_GROUP}/{part.name}/{array}"


def part_checksum_arrays(schema: StoreSchema, part: StorePart) -> list[str]:
    """Paths covered by ``parts/<name>/checksum``, in column order."""
    return _level_checksum_arrays(schema, part)


def part_arrays(group: zarr.Group, schema: StoreSchema, part: StorePart, n: int) -> None:
    """Create (or replace) the ``done``, ``checksum`` and provenance tables of ``part``."""
    tps, cols = schema.tiles_per_shard, part_checksum_arrays(schema, part)
    common: dict[str, Any] = {"config": ARRAY_CONFIG, "overwrite": True}
    checksum = group.create_array(
        part_path(part, PART_CHECKSUM),
        shape=(n, len(cols)),
        chunks=(tps, len(cols)),
        dtype="uint32",
        fill_value=0,
        # not the root's "checksum_column": xarray aligns a group's dimensions with its parents'
        dimension_names=("tile", "part_checksum_column"),
        **common,
    )
    checksum.attrs.update(arrays=cols, layout=CHECKSUM_LAYOUT)
    group.create_array(
        part_path(part, SHARD_FINGERPRINT),
        shape=(schema.n_shards(n),),
        chunks=(1,),
        dtype=str,
        dimension_names=("shard",),
        **common,
    )
    done = group.create_array(
        part_path(part, PART_DONE),
        shape=(n,),
        chunks=(tps,),
        dtype="uint8",
        fill_value=0,
        dimension_names=("tile",),
        **common,
    )
    done.attrs["layout"] = "1 when the tile's shard of the levels in attrs['levels'] was written"
    done.attrs["levels"] = [list(tk) for tk in part.levels]


def all_checksum_arrays(schema: StoreSchema) -> list[str]:
    """Every checksummed per-tile path, in the column order of ``read_checksums``."""
    out = checksum_arrays(schema)
    for part in schema.parts:
        out += part_checksum_arrays(schema, part)
    return out


def read_done(group: zarr.Group, schema: StoreSchema) -> np.ndarray:
    """bool ``[N]``: tiles whose shard is written for every teacher level of the schema (the
    root ``done`` and the ``done`` of every part that added levels later)."""
    done = np.asarray(group["done"][:]).astype(bool)
    for part in schema.parts:
        done &= np.asarray(group[part_path(part, PART_DONE)][:]).astype(bool)
    return done


def read_checksums(group: zarr.Group, schema: StoreSchema) -> np.ndarray:
    """uint32 ``[N, len(all_checksum_arrays(schema))]``: the root table, then each part's."""
    tables = [np.asarray(group["checksum"][:])]
    tables += [np.asarray(group[part_path(p, PART_CHECKSUM)][:]) for p in schema.parts]
    return np.concatenate(tables, axis=1)


def tile_crcs(data: np.ndarray) -> np.ndarray:
    """crc32 of each tile's (first axis) bytes, as uint32 ``[n]``."""
    return np.array([zlib.crc32(np.ascontiguousarray(t).tobytes()) for t in data], np.uint32)


def read_tiles(group: zarr.Group) -> list[TileRecord]:
    """The tile index as records."""
    cols = {f: [str(v) for v in group[f"tiles/{f}"][:].tolist()] for f in TILE_STR_FIELDS}
    windows = np.asarray(group["tiles/window"][:]).tolist()
    transforms = np.asarray(group["tiles/transform"][:])
    out = []
    for i, win in enumerate(windows):
        tr = transforms[i]
        out.append(
            TileRecord(
                tile_id=cols["tile_id"][i],
                source=cols["source"][i],
                window=tuple(win),
                split=cols["split"][i],
                pixel_hash=cols["pixel_hash"][i],
                transform=None if np.isnan(tr).all() else tuple(tr.tolist()),
                crs=cols["crs"][i] or None,
            )
        )
    return out


def write_tiles(group: zarr.Group, tiles: Sequence[TileRecord], overwrite: bool = False) -> None:
    """Create and fill the tile index arrays (by the creator; ``overwrite``: an append of tiles
    replaces them, one chunk each, as a fresh store of all the tiles has them)."""
    n = len(tiles)
    for f in TILE_STR_FIELDS:
        values = np.array([getattr(t, f) or "" for t in tiles], dtype=str)
        arr = group.create_array(
            f"tiles/{f}",
            shape=(n,),
            chunks=(n,),
            dtype=str,
            dimension_names=("tile",),
            overwrite=overwrite,
        )
        arr[:] = values
    window = group.create_array(
        "tiles/window",
        shape=(n, 4),
        chunks=(n, 4),
        dtype="int64",
        dimension_names=("tile", "window_field"),
        overwrite=overwrite,
    )
    window[:] = np.array([t.window for t in tiles], dtype=np.int64)
    transform = group.create_array(
        "tiles/transform",
        shape=(n, 6),
        chunks=(n, 6),
        dtype="float64",
        fill_value=np.nan,
        dimension_names=("tile", "affine"),
        overwrite=overwrite,
    )
    transform[:] = np.array([t.transform or (np.nan,) * 6 for t in tiles], dtype=np.float64)


def _json(value: Any) -> Any:
    """``value`` as it reads back from zarr attrs (tuples become lists)."""
    return json.loads(json.dumps(value))


def published_attr_problems(group: zarr.Group, schema: StoreSchema) -> list[str]:
    """Decode/geometry attrs that disagree with the header schema (a reader without featstore
    would decode wrongly from them). Absent attrs are fine: stores written before them."""
    out = []
    for entry in schema.teachers:
        name = entry.spec.name
        expected = {f"teachers/{name}": teacher_group_attrs(entry)}
        for level in entry.levels:
            expected[feature_path(name, level.key)] = level_array_attrs(schema, entry, level)
        for path, want in expected.items():
            if path not in group:
                continue
            attrs = dict(group[path].attrs)
            out += [
                f"attrs of {path}: {k!r} is {attrs[k]!r}, the header schema gives "
                f"{_json(v)!r}; re-run `featcache extract` or restore the attrs"
                for k, v in want.items()
                if k in attrs and attrs[k] != _json(v)
            ]
    return out


def _feature_arrays(group: zarr.Group, schema: StoreSchema, n: int) -> None:
    for entry in schema.teachers:
        name, channels = entry.spec.name, entry.spec.channels
        codec = get_codec(entry.codec)
        tgroup = group.require_group(f"teachers/{name}")
        tgroup.attrs.update(teacher=entry.to_dict(), **teacher_group_attrs(entry))
        for level in entry.levels:
            level_arrays(group, schema, entry, level, n)
        if isinstance(codec, PCACodec):
            pca_arrays(group, name, channels, codec.stored_channels(channels))


def level_arrays(
    group: zarr.Group,
    schema: StoreSchema,
    entry: TeacherEntry,
    level: LevelSpec,
    n: int,
    overwrite: bool = False,
) -> None:
    """Create one level's feature, codec side data and per-shard stats arrays (``n`` tiles).

    ``overwrite``: replace arrays of the same path (an addition killed before its header).
    """
    tps, n_shards = schema.tiles_per_shard, schema.n_shards(n)
    name, channels = entry.spec.name, entry.spec.channels
    codec = get_codec(entry.codec)
    stored = codec.stored_channels(channels)
    ch_dim = stored_channel_dim(codec)
    geo = stored_geometry(schema, entry.spec, level)
    g, key = geo.grid, level.key
    arr = group.create_array(
        feature_path(name, key),
        shape=(n, g, g, stored),
        dtype=codec.stored_dtype,
        chunks=(1, g, g, stored),
        shards=(tps, g, g, stored),
        fill_value=0,
        # Lossless compression gains ~5% on float features: not worth the read cost.
        compressors=CHUNK_CHECKSUM,
        config=ARRAY_CONFIG,
        # Per-level y/x names: levels' grids differ in size within one group.
        dimension_names=("tile", f"y_{key}", f"x_{key}", ch_dim),
        overwrite=overwrite,
    )
    arr.attrs.update(level=level.to_dict(), **level_array_attrs(schema, entry, level))
    aux = codec.aux_shape(channels)
    if aux is not None:
        aux_arr = group.create_array(
            aux_path(name, key),
            shape=(n, *aux),
            dtype="float32",
            chunks=(1, *aux),
            shards=(tps, *aux),
            fill_value=0,
            compressors=CHUNK_CHECKSUM,
            config=ARRAY_CONFIG,
            dimension_names=("tile", "scale_offset", ch_dim),
            overwrite=overwrite,
        )
        aux_arr.attrs["layout"] = AUX_LAYOUT
    stats = group.create_array(
        stats_path(name, key),
        shape=(n_shards, 3, channels),
        chunks=(1, 3, channels),
        dtype="float64",
        fill_value=0,
        config=ARRAY_CONFIG,
        dimension_names=("shard", "count_sum_sumsq", "channel"),
        overwrite=overwrite,
    )
    stats.attrs["layout"] = STATS_LAYOUT


def pca_arrays(
    group: zarr.Group, name: str, channels: int, k: int, overwrite: bool = False
) -> None:
    """Create the PCA mean and basis arrays of teacher ``name`` (NaN until fitted)."""
    mean_p, basis_p = pca_paths(name)
    mean = group.create_array(
        mean_p,
        shape=(channels,),
        dtype="float32",
        fill_value=np.nan,
        dimension_names=("channel",),
        overwrite=overwrite,
    )
    mean.attrs["layout"] = "PCA mean [channel] of the teacher's features (NaN until fitted)"
    basis = group.create_array(
        basis_p,
        shape=(channels, k),
        dtype="float32",
        fill_value=np.nan,
        dimension_names=("channel", "component"),
        overwrite=overwrite,
    )
    basis.attrs["layout"] = "PCA basis [channel, component], orthonormal columns (NaN until fitted)"


def _provenance_array(group: zarr.Group, n_shards: int) -> None:
    """Per shard: the feature fingerprint of the extraction that wrote it.

    Two writers on one store (a lost lock, a stale process) would leave shards of another
    extraction under this header with valid checksums; verify compares these to the header.
    The run id is not recorded: a resumed store must stay byte-identical to an uninterrupted
    one, and two runs with one fingerprint write the same bytes.
    """
    group.create_array(
        SHARD_FINGERPRINT,
        shape=(n_shards,),
        chunks=(1,),
        dtype=str,
        config=ARRAY_CONFIG,
        dimension_names=("shard",),
    )


def build_store(
    group: zarr.Group, schema: StoreSchema, tiles: Sequence[TileRecord], fp: str
) -> None:
    """Create every array of a fresh store, then write the header (last)."""
    n, tps, t = len(tiles), schema.tiles_per_shard, schema.tile_size
    group.attrs["reading"] = READING
    write_tiles(group, tiles)
    if schema.store_pixels:
        group.create_array(
            "pixels/image",
            shape=(n, t, t, 3),
            chunks=(1, t, t, 3),
            shards=(tps, t, t, 3),
            dtype="uint8",
            fill_value=0,
            compressors=PIXEL_COMPRESSORS,
            config=ARRAY_CONFIG,
            dimension_names=("tile", "py", "px", "rgb"),
        )
        group.create_array(
            "pixels/mask",
            shape=(n, t, t),
            chunks=(1, t, t),
            shards=(tps, t, t),
            dtype="uint8",
            fill_value=schema.ignore_index,
            compressors=PIXEL_COMPRESSORS,
            config=ARRAY_CONFIG,
            dimension_names=("tile", "py", "px"),
        )
    _feature_arrays(group, schema, n)
    names = checksum_arrays(schema)
    checksum = group.create_array(
        "checksum",
        shape=(n, len(names)),
        chunks=(tps, len(names)),
        dtype="uint32",
        fill_value=0,
        config=ARRAY_CONFIG,
        dimension_names=("tile", "checksum_column"),
    )
    checksum.attrs.update(arrays=names, layout=CHECKSUM_LAYOUT)
    done = group.create_array(
        "done",
        shape=(n,),
        chunks=(tps,),
        dtype="uint8",
        fill_value=0,
        config=ARRAY_CONFIG,
        dimension_names=("tile",),
    )
    done.attrs["layout"] = DONE_LAYOUT
    _provenance_array(group, schema.n_shards(n))
    for part in schema.parts:  # a grown store's skeleton (repair) has its parts' tables too
        part_arrays(group, schema, part, n)
    # The header goes last: a crash before this line leaves a group that opens as "not a store".
    group.attrs[ATTR_KEY] = {
        "format_version": FORMAT_VERSION,
        "schema": schema.to_dict(),
        "fingerprint": fp,
        # per-field hashes: verify names the edited field when the fingerprint breaks
        "fingerprint_parts": fingerprint_parts(schema, tiles),
        "package_version": package_version(),
        "complete": False,
        "stats": None,
    }


__all__ = [
    "ATTR_KEY",
    "SHARD_FINGERPRINT",
    "aux_path",
    "build_store",
    "checksum_arrays",
    "consolidate",
    "consolidate_group",
    "consolidated_mismatch",
    "consolidated_problem",
    "geometry_attrs",
    "level_array_attrs",
    "feature_path",
    "open_root",
    "pca_paths",
    "published_attr_problems",
    "read_header",
    "read_tiles",
    "readable_grid",
    "stats_path",
    "store_fs",
    "stored_channel_dim",
    "stored_geometry",
    "teacher_group_attrs",
    "tile_crcs",
    "write_tiles",
]
