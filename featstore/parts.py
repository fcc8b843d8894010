"""Grow a finished store: add a teacher, or new levels of a stored teacher, in place.

An addition is a ``StorePart`` of the schema. The arrays of the levels it adds get their own
bookkeeping, ``parts/<name>/done``, ``parts/<name>/checksum`` and
``parts/<name>/shard_fingerprint``, so no chunk the store already holds is written again: only
the header (the union schema, its fingerprint, stats merged over the union), the teacher group
attrs of a teacher that gains levels, and the consolidated metadata change. The order follows
``create_store``: the part's arrays first, the header last, so a kill before the header leaves
the store as it was (the next attempt replaces the half-made arrays); after it, the addition
resumes shard by shard like an extraction, each part shard's ``done`` chunk written last.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from featstore import layout as L
from featstore import lock
from featstore.codecs import PCACodec, get_codec
from featstore.errors import (
    CodecError,
    IncompleteStoreError,
    ShardDataError,
    StoreError,
)
from featstore.faults import fault_point
from featstore.schema import (
    StorePart,
    StoreSchema,
    TeacherEntry,
    TileRecord,
    dict_differences,
    fingerprint,
    fingerprint_parts,
)
from featstore.writer import StoreWriter

PART_PROVENANCE = L.SHARD_FINGERPRINT  # parts/<name>/shard_fingerprint
# Schema fields an addition must agree on: everything but the teachers (and what the
# fingerprint leaves out: recorded statistics and the parts themselves).
_FREE_FIELDS = ("teachers", "parts", "label_stats", "eval_protocol", "edge_rule")
OVERWRITE_HINT = (
    "to replace the store instead, run `featcache extract` with --overwrite (recomputes it all)"
)


class AdditionError(StoreError):
    """What was asked cannot be added to the store; the message names the field and the fix."""


def _structure(schema: StoreSchema) -> dict[str, Any]:
    d = schema.to_dict()
    for key in _FREE_FIELDS:
        d.pop(key, None)
    return d


def plan_addition(
    stored: StoreSchema, requested: StoreSchema
) -> tuple[StoreSchema, StorePart | None]:
    """The union of ``stored`` and ``requested``, and the part that adds what ``stored`` lacks
    (None: it holds every requested teacher level already).

    New teachers are appended in the requested order; new levels of a stored teacher after its
    stored levels. A stored teacher must be asked for with the same spec and codec.

    Raises:
        AdditionError: the dataset settings, a stored teacher's spec or codec differ, or the
            store has a view bank.
    """
    diffs = dict_differences(_structure(stored), _structure(requested))
    if diffs:
        raise AdditionError(
            "the store was extracted with other settings than this addition:\n  - "
            + "\n  - ".join(diffs)
            + "\ngive the options the store was extracted with (`featcache info STORE` shows "
            f"them), or {OVERWRITE_HINT}"
        )
    entries, added = list(stored.teachers), []
    for entry in requested.teachers:
        name = entry.spec.name
        if name not in stored.teacher_names:
            entries.append(entry)
            added += [(name, lv.key) for lv in entry.levels]
            continue
        old = stored.teacher(name)
        _check_same_teacher(old, entry)
        have = {lv.key for lv in old.levels}
        new_levels = tuple(lv for lv in entry.levels if lv.key not in have)
        if new_levels:
            entries[entries.index(old)] = dataclasses.replace(old, levels=old.levels + new_levels)
            added += [(name, lv.key) for lv in new_levels]
    if not added:
        return stored, None
    if stored.bank is not None:
        raise AdditionError(
            "the store has a view bank, which covers its teachers as they were; adding levels "
            "to it is not supported: add them to a copy of the store extracted without "
            f"`featcache bank`, or {OVERWRITE_HINT}"
        )
    part = StorePart(str(len(stored.parts) + 1), tuple(added))
    union = dataclasses.replace(stored, teachers=tuple(entries), parts=(*stored.parts, part))
    return union, part


def _check_same_teacher(old: TeacherEntry, new: TeacherEntry) -> None:
    name = old.spec.name
    diffs = dict_differences(old.spec.to_dict(), new.spec.to_dict(), f"teacher {name}")
    diffs += dict_differences(old.codec, new.codec, f"teacher {name} codec")
    if diffs:
        raise AdditionError(
            f"teacher {name!r} is already in the store with other settings:\n  - "
            + "\n  - ".join(diffs)
            + "\na store holds one version of a teacher: give its stored settings (weights, "
            f"--codec, ...) to add levels to it, or {OVERWRITE_HINT}"
        )


def part_index(schema: StoreSchema, part: StorePart) -> int:
    """Position of ``part`` in ``schema.parts``."""
    return [p.name for p in schema.parts].index(part.name)


def create_part_arrays(group: zarr.Group, union: StoreSchema, part: StorePart, n: int) -> None:
    """Create the arrays of ``part`` (replacing half-made ones of a killed attempt)."""
    new_teachers = {t for t, _ in part.levels} - set(_stored_before(union, part).teacher_names)
    for entry in union.teachers:
        name = entry.spec.name
        keys = [k for t, k in part.levels if t == name]
        if not keys:
            continue
        tgroup = group.require_group(f"teachers/{name}")
        # the union entry (all its levels): what verify compares with the header
        tgroup.attrs.update(teacher=entry.to_dict(), **L.teacher_group_attrs(entry))
        for key in keys:
            L.level_arrays(group, union, entry, entry.level(key), n, overwrite=True)
        codec = get_codec(entry.codec)
        if name in new_teachers and isinstance(codec, PCACodec):
            channels = entry.spec.channels
            L.pca_arrays(group, name, channels, codec.stored_channels(channels), overwrite=True)
    L.part_arrays(group, union, part, n)


def _stored_before(union: StoreSchema, part: StorePart) -> StoreSchema:
    return union.up_to_part(part_index(union, part))


def finished_header(group: zarr.Group, url: str, then: str) -> dict[str, Any]:
    """The header of a finished store (``IncompleteStoreError`` naming the fix otherwise);
    ``then``: what the user does after finishing it (the message's end)."""
    meta = L.read_header(group, url)
    if not meta.get("complete"):
        raise IncompleteStoreError(
            f"store {url!r} is not complete: finish it first (re-run the `featcache extract` "
            f"that made it, without --add), then {then}"
        )
    return meta


def begin_part(
    url: str,
    union: StoreSchema,
    part: StorePart,
    tiles: Sequence[TileRecord],
    run_id: str,
) -> PartWriter:
    """Create ``part``'s arrays in the (locked, complete) store, then write the union header.

    The caller holds the writer lock (``featstore.lock``) of a local store.
    """
    group = L.open_root(url, "r+")
    meta = finished_header(group, url, "add to it")
    create_part_arrays(group, union, part, len(tiles))
    fault_point("add.before_header")  # kill tests: arrays made, the header still the old one
    group.attrs[L.ATTR_KEY] = dict(
        meta,
        schema=union.to_dict(),
        fingerprint=fingerprint(union, tiles),
        fingerprint_parts=fingerprint_parts(union, tiles),
        complete=False,
        stats=None,
    )
    return PartWriter.open_part(url, part.name, run_id)


def take_lock(url: str, run_id: str, break_lock: bool) -> None:
    """Hold the store's writer lock for an addition (local stores; remote ones have none)."""
    if L.is_local(url):
        lock.acquire(L.local_path(url), run_id, break_lock)


class PartWriter(StoreWriter):
    """Writes the shards of one part: its levels' arrays, its checksum, provenance, ``done``."""

    def __init__(
        self,
        url: str,
        group: zarr.Group,
        meta: dict[str, Any],
        part: StorePart,
        run_id: str | None = None,
    ) -> None:
        super().__init__(url, group, meta, run_id)
        self.part = part
        self._checksum_names = L.part_checksum_arrays(self.schema, part)
        self._done_path = L.part_path(part, L.PART_DONE)
        self._checksum_path = L.part_path(part, L.PART_CHECKSUM)
        self._provenance_path = L.part_path(part, PART_PROVENANCE)

    @classmethod
    def open_part(cls, url: str, name: str, run_id: str | None = None) -> PartWriter:
        """Open part ``name`` of an existing store for writing (resume)."""
        group = L.open_root(str(url), "r+")
        meta = L.read_header(group, str(url))
        schema = StoreSchema.from_dict(meta["schema"])
        part = next((p for p in schema.parts if p.name == name), None)
        if part is None:
            raise StoreError(f"store {url!r} has no added part {name!r}")
        return cls(str(url), group, meta, part, run_id)

    @property
    def levels(self) -> dict[str, list[str]]:
        """``{teacher: [level keys]}`` this part writes, in schema order."""
        out: dict[str, list[str]] = {}
        for name, key in self.part.levels:
            out.setdefault(name, []).append(key)
        return out

    @property
    def feature_fingerprint(self) -> str:  # type: ignore[override]
        """Fingerprint of the store as this part made it (its shards' provenance)."""
        upto = self.schema.up_to_part(part_index(self.schema, self.part) + 1)
        return fingerprint(dataclasses.replace(upto, bank=None), self.tiles)

    def set_pca(self, teacher: str, mean: np.ndarray, basis: np.ndarray) -> None:
        """Store the PCA basis of a teacher this part adds (a stored teacher keeps its own)."""
        if teacher in _stored_before(self.schema, self.part).teacher_names:
            raise CodecError(
                f"teacher {teacher!r} already has its PCA basis in {self.url!r}; the levels "
                "added to it are encoded with that basis"
            )
        super().set_pca(teacher, mean, basis)

    def _encode_all(
        self, features: Mapping[str, Mapping[str, np.ndarray]], n: int
    ) -> dict[str, np.ndarray]:
        want = self.levels
        if set(features) != set(want):
            raise ShardDataError(
                f"features of this addition must hold exactly the teachers {sorted(want)}, "
                f"got {sorted(features)}"
            )
        out: dict[str, np.ndarray] = {}
        for name, keys in want.items():
            if set(features[name]) != set(keys):
                raise ShardDataError(
                    f"teacher {name!r} of this addition needs levels {keys}, "
                    f"got {sorted(features[name])}"
                )
            codec = self.codec(name)
            for key in keys:
                out.update(self._encode_level(codec, name, key, features[name][key], n))
        return out

    def _pixels(
        self, images: np.ndarray | None, masks: np.ndarray | None, n: int
    ) -> dict[str, np.ndarray]:
        if images is not None or masks is not None:
            raise ShardDataError("an addition writes no pixels (the store holds them already)")
        return {}


def part_provenance_problems(
    group: zarr.Group,
    schema: StoreSchema,
    index: int,
    tiles: Sequence[TileRecord] | None,
    done: np.ndarray,
) -> list[str]:
    """Done shards of part ``index`` written by another addition than the header's."""
    part = schema.parts[index]
    path = L.part_path(part, PART_PROVENANCE)
    if tiles is None or path not in group:
        return []
    want = fingerprint(dataclasses.replace(schema.up_to_part(index + 1), bank=None), tiles)
    out = []
    for k, fp in enumerate(str(v) for v in group[path][:].tolist()):
        r = schema.shard_range(k, len(done))
        if fp != want and done[r.start : r.stop].all():
            out.append(
                f"shard {k} of added levels {part.name} was written by another addition "
                f"(fingerprint {fp[:16] or 'not recorded'}) than the header's ({want[:16]}); "
                "re-extract the store with --overwrite"
            )
    return out


def pending_part(schema: StoreSchema, group: zarr.Group) -> StorePart | None:
    """The part whose shards are not all written (an addition that was interrupted), if any."""
    for part in schema.parts:
        if not np.asarray(group[L.part_path(part, L.PART_DONE)][:]).all():
            return part
    return None


__all__ = [
    "AdditionError",
    "PartWriter",
    "begin_part",
    "create_part_arrays",
    "part_provenance_problems",
    "pending_part",
    "plan_addition",
    "take_lock",
]
