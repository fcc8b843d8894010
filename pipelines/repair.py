"""Repair a damaged store: restore its metadata, re-extract exactly the shards that are bad.

A store is rebuilt from the extraction that made it, never from its own (possibly damaged)
contents: the same SOURCE and options give the schema, the tile index and the fingerprint. The
recorded fingerprint must equal it, otherwise the source, teachers, weights or options differ
and repair refuses, naming what differs. Then:

1. every metadata file (each node's ``zarr.json``, the tile index) is compared with a skeleton
   built by ``featstore.layout.build_store`` from that schema and restored where it differs;
2. ``featstore.verify.damaged_shards`` names the shards whose files are unreadable, differ
   from their checksums or statistics, or were never finished;
3. those shards' files are deleted in every per-shard array (so the store reads as if they were
   never written) and ``pipelines.shards.process_shard`` writes them again, ``done`` last;
4. ``finalize`` merges the per-shard statistics into the header, and ``verify_store`` must pass.

Each shard's bytes depend only on the source, the teachers and the options, so the repaired
store is byte-identical to an uninterrupted extraction (tests/pipelines/test_repair.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from featstore import layout as L
from featstore import lock
from featstore.codecs import get_codec
from featstore.errors import FeatcacheError
from featstore.integrity import shard_file
from featstore.schema import StoreSchema, fingerprint
from featstore.verify import damaged_shards, verify_store
from featstore.writer import StoreWriter
from pipelines.config import ExtractConfig
from pipelines.extract import build_schema, open_tiles, pca_samples
from pipelines.shards import ExtractContext, make_context, process_shard

ROOT_META = "zarr.json"
# Header fields that finalize() writes; a damaged store may lack or garble them.
FINALIZED_FIELDS = ("complete", "stats")
VERSION_FIELD = "package_version"


class RepairError(FeatcacheError):
    """The store cannot be repaired from the given SOURCE and options; the message says why."""


@dataclass
class RepairReport:
    """What ``repair_store`` restored and re-extracted."""

    url: str
    metadata: list[str] = field(default_factory=list)
    shards: dict[int, list[str]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One line per repaired item, for the CLI."""
        out = [f"restored {item}" for item in self.metadata]
        out += [
            f"re-extracted shard {k}: {'; '.join(reasons[:3])}"
            for k, reasons in sorted(self.shards.items())
        ]
        return out or [f"{self.url}: nothing to repair (verify passes)"]


def repair_store(cfg: ExtractConfig) -> RepairReport:
    """Repair the store ``cfg.out`` by re-running its extraction where it is damaged.

    Raises:
        RepairError: not a local feature store, another extraction's store (source, teachers,
            weights or options differ), or still damaged after the repair.
    """
    cfg.validate()
    url = _local_store(cfg.out)
    source, records = open_tiles(cfg)  # an unreachable source fails here, before any write
    ctx = make_context(cfg, source, records, cfg.device)  # unreachable/changed weights too
    schema = build_schema(ctx)
    fp = fingerprint(schema, records)
    _require_same_extraction(url, schema, records, fp)
    schema = dataclasses.replace(schema, parts=_recorded_parts(url))
    run_id = uuid.uuid4().hex[:12]
    lock.acquire(url, run_id, cfg.break_lock)
    try:
        report = RepairReport(url)
        report.metadata = _restore_metadata(url, schema, records, fp)
        report.shards = damaged_shards(url)
        if _pca_damaged(ctx, url, schema):
            report.metadata.append("PCA basis (all shards re-extracted with the refitted basis)")
            report.shards = {k: ["PCA basis damaged"] for k in range(_n_shards(url, schema))}
        _uncommit(url, schema, sorted(report.shards))
        writer = StoreWriter.open(url, run_id=run_id)
        _refit_pca(ctx, writer, schema)
        for k in sorted(report.shards):
            process_shard(ctx, writer, k)
        writer.finalize()
    finally:
        lock.remove_lock(url, run_id)
    problems = verify_store(url)
    if problems:
        raise RepairError(
            f"STORE {url!r} still fails verify after repair: {problems[:3]}; re-extract it "
            "(`featcache extract ... --overwrite`)"
        )
    return report


def _local_store(url: str) -> str:
    if not L.is_local(url):
        raise RepairError(
            f"repair works on local stores; copy {url!r} to a local STORE, repair it, copy back"
        )
    path = L.local_path(url)
    if not os.path.isfile(os.path.join(path, ROOT_META)):
        raise RepairError(
            f"STORE {url!r} is not a feature store (no {ROOT_META}); check the path, or "
            "extract it anew with `featcache extract`"
        )
    return path


def _recorded_parts(url: str) -> tuple[Any, ...]:
    """The store's recorded parts (teachers or levels added by `extract --add`), which the
    options do not describe; none when the header cannot tell (it is restored from the options)."""
    try:
        return StoreSchema.from_dict(_recorded_header(url)["schema"]).parts
    except (RepairError, KeyError, TypeError, ValueError):
        return ()


def _recorded_header(url: str) -> dict[str, Any]:
    try:
        meta = json.loads(Path(url, ROOT_META).read_text())
        header = meta["attributes"][L.ATTR_KEY]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RepairError(
            f"STORE {url!r}: its header ({ROOT_META}, attribute {L.ATTR_KEY!r}) is unreadable "
            f"({type(err).__name__}: {err}), so which extraction wrote it is unknown; "
            "re-extract it (`featcache extract ... --overwrite`)"
        ) from None
    if not isinstance(header, dict):
        raise RepairError(f"STORE {url!r}: its header is not a featstore header; re-extract it")
    return header


def _require_same_extraction(url: str, schema: StoreSchema, records: list[Any], fp: str) -> None:
    """The recorded fingerprint must be this extraction's; else name what differs."""
    header = _recorded_header(url)
    if isinstance(header.get("schema"), dict) and header["schema"].get("bank"):
        raise RepairError(
            f"STORE {url!r} holds a view bank, which repair does not rebuild yet; verify names "
            "the damage: re-extract the store, then `featcache bank` again"
        )
    if header.get("fingerprint") == fp or _same_schema_and_tiles(url, header, schema, records):
        return  # the same extraction (at worst its recorded fingerprint field was damaged)
    raise RepairError(
        f"STORE {url!r} was extracted from another source, teachers, weights or options than "
        f"the ones given:\n  - {_what_differs(url, header, schema, records)}\nrepair needs the "
        "SOURCE and options of the original `featcache extract` (same --teacher, --weights, "
        "--scales, --codec, ...), or re-extract the store with --overwrite"
    )


def _same_schema_and_tiles(
    url: str, header: dict[str, Any], schema: StoreSchema, records: list[Any]
) -> bool:
    try:
        tiles = L.read_tiles(L.open_root(url, "r"))
    except Exception:  # noqa: BLE001 - a damaged index: the fingerprint alone decides
        return False
    same_tiles = [(t.tile_id, t.pixel_hash) for t in tiles] == [
        (t.tile_id, t.pixel_hash) for t in records
    ]
    return same_tiles and header.get("schema") == json.loads(json.dumps(schema.to_dict()))


def _what_differs(url: str, header: dict[str, Any], schema: StoreSchema, records: list) -> str:
    from featstore.writer import _differences  # the same wording as extract's refusal

    try:
        return "\n  - ".join(_differences(header, schema, records, L.open_root(url, "r")))
    except Exception as err:  # noqa: BLE001 - a damaged tile index: say that instead
        return f"the recorded fingerprint differs (tile index unreadable: {err})"


def _restore_metadata(url: str, schema: StoreSchema, records: list, fp: str) -> list[str]:
    """Copy every metadata file of a freshly built skeleton that the store lacks or differs in.

    The root ``zarr.json`` is always replaced (``complete`` false until ``finalize``), so a
    repair killed half-way leaves a store that ``featcache extract`` resumes.
    """
    restored = []
    version = _recorded_version(url)
    with tempfile.TemporaryDirectory(prefix="featcache-repair-") as tmp:
        skeleton = os.path.join(tmp, "skeleton.zarr")
        group = zarr.open_group(skeleton, mode="w")
        L.build_store(group, schema, records, fp)
        L.consolidate_group(group)  # as finalize leaves every group's zarr.json
        for rel in sorted(_files(skeleton)):
            src, dst = os.path.join(skeleton, rel), os.path.join(url, rel)
            if rel == ROOT_META:
                if _header_differs(src, dst):
                    restored.append("the header (zarr.json attributes)")
            elif _bytes(src) == _bytes(dst):
                continue
            else:
                restored.append(rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
    if version is not None:  # the store says which package wrote it, not which one repaired it
        group = zarr.open_group(url, mode="r+")
        group.attrs[L.ATTR_KEY] = {**group.attrs[L.ATTR_KEY], VERSION_FIELD: version}
    return restored


def _recorded_version(url: str) -> str | None:
    try:
        header = json.loads(Path(url, ROOT_META).read_text())["attributes"][L.ATTR_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    version = header.get(VERSION_FIELD) if isinstance(header, dict) else None
    return version if isinstance(version, str) else None


def _files(root: str) -> list[str]:
    return [
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    ]


def _bytes(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _header_differs(skeleton_meta: str, store_meta: str) -> bool:
    """Whether the store's root attributes differ from the skeleton's, beyond finalize's."""
    try:
        got = json.loads(Path(store_meta).read_text())["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    want = json.loads(Path(skeleton_meta).read_text())["attributes"]
    if not isinstance(got, dict) or not isinstance(got.get(L.ATTR_KEY), dict):
        return True
    ignored = (*FINALIZED_FIELDS, VERSION_FIELD)
    strip = {k: v for k, v in got[L.ATTR_KEY].items() if k not in ignored}
    base = {k: v for k, v in want[L.ATTR_KEY].items() if k not in ignored}
    # the consolidation stamp hashes the finalized header: finalize writes it again
    rest = {L.ATTR_KEY, L.CONSOLIDATED_KEY}
    others = {k: v for k, v in got.items() if k not in rest}
    return strip != base or others != {k: v for k, v in want.items() if k not in rest}


def _n_shards(url: str, schema: StoreSchema) -> int:
    return schema.n_shards(int(L.open_root(url, "r")["done"].shape[0]))


def _per_shard_arrays(schema: StoreSchema) -> tuple[list[str], list[str]]:
    """(arrays indexed by tile, arrays indexed by shard): each holds one file per shard."""
    # every level's data, the added parts' too; the parts' own done and checksum tables stay:
    # the rewrite reproduces their bytes, and verify checks them afterwards
    by_tile = L.all_checksum_arrays(schema) + ["checksum", "done"]
    by_shard = [L.SHARD_FINGERPRINT] + [
        L.stats_path(e.spec.name, lv.key) for e in schema.teachers for lv in e.levels
    ]
    return by_tile, by_shard


def _uncommit(url: str, schema: StoreSchema, shards: list[int]) -> None:
    """Delete the shards' files in every per-shard array: they read as never written."""
    group = L.open_root(url, "r")
    n = int(group["done"].shape[0])
    by_tile, by_shard = _per_shard_arrays(schema)
    for k in shards:
        first = schema.shard_range(k, n).start
        files = [shard_file(url, group[p], p, first) for p in by_tile]
        files += [shard_file(url, group[p], p, k) for p in by_shard]
        for file in files:
            if os.path.exists(file):
                os.remove(file)


def _pca_damaged(ctx: ExtractContext, url: str, schema: StoreSchema) -> bool:
    """Whether a PCA teacher's stored basis differs from the one this extraction fits."""
    group = L.open_root(url, "r")
    for entry in schema.teachers:
        if not get_codec(entry.codec).needs_fit:
            continue
        mean, basis = get_codec(entry.codec).fit(pca_samples(ctx, entry.spec.name))
        mean_p, basis_p = L.pca_paths(entry.spec.name)
        try:
            same = _same_bytes(group[mean_p][:], mean) and _same_bytes(group[basis_p][:], basis)
        except Exception:  # noqa: BLE001 - a damaged chunk of any kind
            same = False
        if not same:
            return True
    return False


def _same_bytes(stored: np.ndarray, fitted: np.ndarray) -> bool:
    return np.asarray(stored, np.float32).tobytes() == np.asarray(fitted, np.float32).tobytes()


def _refit_pca(ctx: ExtractContext, writer: StoreWriter, schema: StoreSchema) -> None:
    """Write the basis again when every shard was uncommitted (set_pca refuses otherwise)."""
    if writer.done().any():
        return
    for entry in schema.teachers:
        codec = get_codec(entry.codec)
        if codec.needs_fit:
            writer.set_pca(entry.spec.name, *codec.fit(pca_samples(ctx, entry.spec.name)))


__all__ = ["RepairError", "RepairReport", "repair_store"]
