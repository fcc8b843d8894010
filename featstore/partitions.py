"""Labeled / unlabeled / val partitions of a store's tiles, drawn by whole source image.

A partition is saved inside the store as an attribute-only Zarr group
``partitions/<name>/zarr.json`` (``attributes.partition``), so the store stays a valid Zarr
hierarchy and carries its partitions with it. The file is written whole and renamed into place
(local stores), or put as one object (remote stores): a reader sees the old partition or the new
one, never half of one.

Partitions are made here without torch:

* `draw_partition`: fractions or counts of source images (scenes), seeded. Every tile of one
  scene lands in the same set, so overlapping windows of a scene never straddle labeled and val.
* `partition_from_split_files`: DWL / UniMatch split files (lines ``<image> [<mask>]``), matched
  to tiles by their source path.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from featstore.errors import StoreError
from featstore.layout import is_local, refresh_consolidated, store_fs
from featstore.schema import TileRecord

SETS = ("labeled", "unlabeled", "val")
GROUP = "partitions"
ATTR = "partition"
DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_GROUP_NODE = {"zarr_format": 3, "node_type": "group", "attributes": {}}


class PartitionError(StoreError, ValueError):
    """A partition that cannot be made, read or used; the message says what to change."""


@dataclass(frozen=True)
class Partition:
    """Tile ids per set, and how they were chosen (``recipe``, shown by ``featcache splits``)."""

    name: str
    sets: dict[str, tuple[str, ...]]
    recipe: dict[str, Any] = field(default_factory=dict)
    store_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "name": self.name,
            "sets": {k: list(self.sets.get(k, ())) for k in SETS},
            "recipe": dict(self.recipe),
            "store_fingerprint": self.store_fingerprint,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Partition:
        """Inverse of ``to_dict``."""
        sets = {k: tuple(str(t) for t in d.get("sets", {}).get(k, ())) for k in SETS}
        return cls(str(d["name"]), sets, dict(d.get("recipe", {})), d.get("store_fingerprint"))

    def indices(self, tiles: Sequence[TileRecord], url: str) -> dict[str, list[int]]:
        """Tile-index positions per set; refuse ids the store no longer holds."""
        pos = {t.tile_id: i for i, t in enumerate(tiles)}
        missing = sorted({t for ids in self.sets.values() for t in ids if t not in pos})
        if missing:
            raise PartitionError(
                f"partition {self.name!r} of {url} names {len(missing)} tile ids the store does "
                f"not hold, e.g. {missing[:5]} (the store was re-extracted?); make it again: "
                f"featcache splits {url} ... --name {self.name} --overwrite"
            )
        return {k: sorted(pos[t] for t in self.sets.get(k, ())) for k in SETS}


# ----------------------------------------------------------------------------- amounts


@dataclass(frozen=True)
class Amount:
    """A share of the scenes (``1/8``, ``0.125``) or a number of scenes (``20``)."""

    text: str
    fraction: Fraction | None = None
    count: int | None = None

    def of(self, n: int, option: str) -> int:
        """Scenes this amount takes out of ``n`` (a non-zero share takes at least one)."""
        if self.count is not None:
            if self.count > n:
                raise PartitionError(
                    f"{option} {self.text}: only {n} source images are "
                    f"eligible; ask for at most {n} or a fraction like 1/8"
                )
            return self.count
        assert self.fraction is not None
        k = int(self.fraction * n + Fraction(1, 2))  # round half up: 1/8 of 12 -> 2 (1.5)
        return max(k, 1) if self.fraction > 0 else 0


def parse_amount(text: str, option: str) -> Amount:
    """``"1/8"`` or ``"0.125"``: a share in [0, 1]; ``"20"``: 20 source images."""
    s = str(text).strip()
    try:
        if "/" in s or "." in s:
            frac = Fraction(s)
            if not 0 <= frac <= 1:
                raise ValueError
            return Amount(s, fraction=frac)
        count = int(s)
        if count < 0:
            raise ValueError
        return Amount(s, count=count)
    except (ValueError, ZeroDivisionError):
        raise PartitionError(
            f"{option} {text!r}: write a share of the source images (1/8 or "
            "0.125) or a whole number of images (20)"
        ) from None


# ----------------------------------------------------------------------------- drawing


def scenes_of(tiles: Sequence[TileRecord], indices: Sequence[int]) -> dict[str, list[int]]:
    """Tile positions grouped by source image, in tile-index order."""
    out: dict[str, list[int]] = {}
    for i in indices:
        out.setdefault(tiles[i].source, []).append(i)
    return out


def count_line(tiles: Sequence[TileRecord], indices: Sequence[int]) -> str:
    """``"N tiles (M images)"``: a set's size in tiles and in source images (CLI and train log)."""
    return f"{len(indices)} tiles ({len(scenes_of(tiles, indices))} images)"


def _pool(tiles: Sequence[TileRecord], pool: Sequence[str]) -> list[int]:
    have = sorted({t.split for t in tiles})
    unknown = sorted(set(pool) - set(have))
    if unknown:
        raise PartitionError(
            f"--pool {','.join(pool)}: split(s) {unknown} not in the store "
            f"(it has {have}); name the split(s) to draw from, e.g. "
            f"--pool {have[0] if have else 'train'}"
        )
    return [i for i, t in enumerate(tiles) if t.split in set(pool)]


def _split_val(tiles: Sequence[TileRecord], pool: Sequence[str], val_split: str) -> list[int]:
    if val_split in pool:
        return []
    return [i for i, t in enumerate(tiles) if t.split == val_split]


def draw_partition(
    tiles: Sequence[TileRecord],
    labeled: Amount,
    val: Amount | None = None,
    seed: int = 0,
    pool: Sequence[str] = ("train",),
    name: str = DEFAULT_NAME,
    val_split: str = "val",
) -> Partition:
    """Draw labeled / unlabeled (/ val) from the ``pool`` splits by whole source image.

    The pool's scenes are shuffled once by ``seed``; ``val`` takes the first ones, ``labeled``
    the next (its share is of the scenes left after val), the rest are unlabeled. So for one
    seed and val, a smaller labeled share is a subset of a larger one. Without ``val`` the
    store's ``val_split`` tiles (when the pool does not hold that split) are the val set.
    """
    idx = _pool(tiles, pool)
    groups = scenes_of(tiles, idx)
    names = sorted(groups)
    order = [names[k] for k in np.random.default_rng(seed).permutation(len(names))]
    n_val = val.of(len(order), "--val") if val is not None else 0
    val_scenes, rest = order[:n_val], order[n_val:]
    n_lab = labeled.of(len(rest), "--labeled")
    if n_lab < 1:
        raise PartitionError(
            f"--labeled {labeled.text} selects no source image out of "
            f"{len(rest)}: ask for a larger share or a count >= 1"
        )
    picked = {"val": val_scenes, "labeled": rest[:n_lab], "unlabeled": rest[n_lab:]}
    sets = {k: sorted(i for s in picked[k] for i in groups[s]) for k in SETS}
    if val is None:
        sets["val"] = _split_val(tiles, pool, val_split)
    recipe = {
        "method": "fraction",
        "labeled": labeled.text,
        "val": val.text if val is not None else f"split {val_split!r}",
        "seed": seed,
        "pool": list(pool),
    }
    return _finish(tiles, sets, name, recipe)


def _finish(
    tiles: Sequence[TileRecord],
    sets: Mapping[str, Sequence[int]],
    name: str,
    recipe: dict[str, Any],
) -> Partition:
    problems = straddling_scenes(tiles, sets)
    if problems:
        raise PartitionError(
            f"partition {name!r} would split source images across sets: "
            f"{'; '.join(problems[:5])}; the store's own splits cut through "
            "these images: draw val from the pool instead (--val 0.1)"
        )
    ids = {k: tuple(tiles[i].tile_id for i in sorted(sets.get(k, ()))) for k in SETS}
    return Partition(check_name(name), ids, recipe)


def straddling_scenes(tiles: Sequence[TileRecord], sets: Mapping[str, Sequence[int]]) -> list[str]:
    """``"<source> in labeled and val"`` for every source image found in two sets."""
    seen: dict[str, set[str]] = {}
    for key, idx in sets.items():
        for i in idx:
            seen.setdefault(tiles[i].source, set()).add(key)
    return [
        f"{src} in {' and '.join(sorted(keys))}"
        for src, keys in sorted(seen.items())
        if len(keys) > 1
    ]


# ----------------------------------------------------------------------------- split files


def read_split_file(path: str | Path) -> list[str]:
    """Image paths of a DWL / UniMatch split file (``<image> [<mask>]`` per line)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise PartitionError(f"cannot read split file {p}: {err}") from err
    return [ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in PurePosixPath(path.replace("\\", "/")).parts if p not in ("/", "."))


def _suffix_match(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """One path ends with the other, compared whole component by component."""
    n = min(len(a), len(b))
    return n > 0 and a[-n:] == b[-n:]


def match_lines(
    tiles: Sequence[TileRecord], lines: Sequence[str]
) -> tuple[list[int], list[str], list[str]]:
    """(tile positions, unmatched lines, ambiguous lines) for split-file image paths.

    A line names a source image when one path ends with the other (split files are relative to
    the dataset root, the stored source to the extracted folder). Several images matching one
    line is reported, never guessed.
    """
    by_source = scenes_of(tiles, range(len(tiles)))
    parts = {src: _parts(src) for src in by_source}
    by_name: dict[str, list[str]] = {}
    for src, pp in parts.items():
        by_name.setdefault(pp[-1] if pp else "", []).append(src)
    out: list[int] = []
    unmatched, ambiguous = [], []
    for line in lines:
        lp = _parts(line)
        hits = [s for s in by_name.get(lp[-1] if lp else "", []) if _suffix_match(parts[s], lp)]
        if not hits:
            unmatched.append(line)
        elif len(hits) > 1:
            ambiguous.append(f"{line} -> {sorted(hits)[:3]}")
        else:
            out += by_source[hits[0]]
    return sorted(set(out)), unmatched, ambiguous


@dataclass
class SplitFileResult:
    """A partition from split files, with the lines that matched no tile (reported)."""

    partition: Partition
    unmatched: dict[str, list[str]]


def partition_from_split_files(
    tiles: Sequence[TileRecord],
    files: Mapping[str, str | Path],
    name: str = DEFAULT_NAME,
    val_split: str = "val",
) -> SplitFileResult:
    """Sets from split files (``{"labeled": path, ...}``); a set without a file: unlabeled
    empty, val the store's ``val_split`` tiles."""
    sets: dict[str, list[int]] = {}
    unmatched: dict[str, list[str]] = {}
    errors: list[str] = []
    for key, path in files.items():
        lines = read_split_file(path)
        idx, missing, ambiguous = match_lines(tiles, lines)
        if ambiguous:
            errors.append(
                f"--{key}-file {path}: {len(ambiguous)} lines match several images, "
                f"e.g. {ambiguous[:3]}"
            )
        if lines and not idx:
            errors.append(
                f"--{key}-file {path}: none of its {len(lines)} lines matches a tile "
                f"source (e.g. {lines[0]!r} vs {tiles[0].source!r})"
            )
        sets[key], unmatched[key] = idx, missing
    if "labeled" not in files:
        errors.append("--labeled-file is required with split files")
    if errors:
        raise PartitionError("cannot use the split files:\n  - " + "\n  - ".join(errors))
    sets.setdefault("unlabeled", [])
    if "val" not in sets:
        sets["val"] = [i for i, t in enumerate(tiles) if t.split == val_split]
    overlap = _overlaps(tiles, sets)
    if overlap:
        raise PartitionError("the split files overlap: " + "; ".join(overlap))
    recipe = {"method": "split_files", **{k: str(v) for k, v in files.items()}}
    return SplitFileResult(_finish(tiles, sets, name, recipe), unmatched)


def _overlaps(tiles: Sequence[TileRecord], sets: Mapping[str, Sequence[int]]) -> list[str]:
    out = []
    for a_pos, a in enumerate(SETS):
        for b in SETS[a_pos + 1 :]:
            both = sorted(set(sets.get(a, ())) & set(sets.get(b, ())))
            if both:
                out.append(
                    f"{a} and {b} share {len(both)} tiles, e.g. "
                    f"{[tiles[i].tile_id for i in both[:3]]}"
                )
    return out


# ----------------------------------------------------------------------------- storage


def check_name(name: str) -> str:
    """A partition name usable as a folder name; returns it."""
    if not _NAME.match(name or ""):
        raise PartitionError(
            f"partition name {name!r}: use letters, digits, '_', '-', '.' "
            "(not first), e.g. --name default"
        )
    return name


def _write_whole(fs: Any, path: str, data: bytes, local: bool) -> None:
    if not local:  # an object store puts one object whole
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_partition(
    url: str,
    partition: Partition,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Save ``partition`` in the store at ``url`` (refuse to replace one unless ``overwrite``)."""
    fs, root = store_fs(url, storage_options)
    name = check_name(partition.name)
    node = f"{root}/{GROUP}/{name}/zarr.json"
    if fs.exists(node) and not overwrite:
        raise PartitionError(
            f"store {url} already has a partition {name!r}; pass --overwrite "
            "to replace it, or choose another --name"
        )
    local = is_local(url)
    group_node = f"{root}/{GROUP}/zarr.json"
    if not fs.exists(group_node):
        _write_whole(fs, group_node, json.dumps(_GROUP_NODE).encode(), local)
    doc = dict(_GROUP_NODE, attributes={ATTR: partition.to_dict()})
    _write_whole(fs, node, json.dumps(doc, indent=1).encode(), local)
    # a plain zarr reader trusts a consolidated copy: it must list the new partition too
    refresh_consolidated(url, storage_options)


def read_partition(url: str, name: str, storage_options: dict[str, Any] | None = None) -> Partition:
    """The partition ``name`` saved in the store at ``url``."""
    fs, root = store_fs(url, storage_options)
    path = f"{root}/{GROUP}/{check_name(name)}/zarr.json"
    if not fs.exists(path):
        have = list_partitions(url, storage_options)
        raise PartitionError(
            f"store {url} has no partition {name!r} (it has {have or 'none'}); "
            f"make one: featcache splits {url} --labeled 1/8 --val 0.1 "
            f"--name {name}"
        )
    try:
        doc = json.loads(fs.cat_file(path))
        return Partition.from_dict(doc["attributes"][ATTR])
    except (ValueError, KeyError, TypeError) as err:
        raise PartitionError(
            f"partition {name!r} of {url} is unreadable ({err}); write it again "
            f"with featcache splits ... --name {name} --overwrite"
        ) from err


def list_partitions(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the partitions saved in the store, sorted."""
    fs, root = store_fs(url, storage_options)
    base = f"{root}/{GROUP}"
    if not fs.exists(base):
        return []
    names = [PurePosixPath(str(p)).name for p in fs.ls(base, detail=False)]
    return sorted(n for n in names if _NAME.match(n) and fs.exists(f"{base}/{n}/zarr.json"))


__all__ = [
    "DEFAULT_NAME",
    "SETS",
    "Amount",
    "Partition",
    "PartitionError",
    "SplitFileResult",
    "check_name",
    "count_line",
    "draw_partition",
    "list_partitions",
    "match_lines",
    "parse_amount",
    "partition_from_split_files",
    "read_partition",
    "read_split_file",
    "scenes_of",
    "straddling_scenes",
    "write_partition",
]
