"""Checks run before training: splits, store completeness, teachers/levels, classes, fingerprint.

Every failure raises `DataCheckError` with a message that names what is wrong and how to fix it,
so a bad store or config fails in seconds rather than hours into a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featstore import layout as L
from featstore.codecs import get_codec
from featstore.constants import IGNORE_INDEX
from featstore.errors import FeatcacheError, TileDataError
from featstore.geometry import LevelGeometry
from featstore.schema import LevelSpec, TileRecord, dict_differences

# Called with the error of a tile that failed its checksum, under --skip-bad-tiles.
OnBadTile = Callable[[TileDataError], None]


class DataCheckError(FeatcacheError, ValueError):
    """The store, source or split selection does not fit the training config."""


def select_tiles(tiles: Sequence[TileRecord], spec: str, option: str) -> list[int]:
    """Indices of the tiles named by ``spec``.

    Args:
        tiles: The tile index.
        spec: Comma-separated split names, or a text file with one tile id per line ("" = none).
        option: Config option name for messages (e.g. "data.labeled").
    """
    spec = (spec or "").strip()
    if not spec:
        return []
    path = Path(spec)
    if path.is_file():
        wanted = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        pos = {t.tile_id: i for i, t in enumerate(tiles)}
        missing = [w for w in wanted if w not in pos]
        if missing:
            raise DataCheckError(
                f"{option}: {len(missing)} tile ids of {path} are not in the "
                f"tile index, e.g. {missing[:5]}; regenerate the list"
            )
        return sorted({pos[w] for w in wanted})
    names = {s.strip() for s in spec.split(",") if s.strip()}
    known = sorted({t.split for t in tiles})
    unknown = sorted(names - set(known))
    if unknown:
        raise DataCheckError(
            f"{option}: split(s) {unknown} not in the tile index (it has "
            f"{known}); name existing splits or give a file of tile ids"
        )
    return [i for i, t in enumerate(tiles) if t.split in names]


def select_sets(
    tiles: Sequence[TileRecord], specs: dict[str, str], fix: str = ""
) -> dict[str, list[int]]:
    """Indices per set (``{"labeled": spec, ...}``); every problem of every set in one error.

    Args:
        tiles: The tile index.
        specs: Set name -> split names or tile-id file (see `select_tiles`).
        fix: A line appended to the message (e.g. the `featcache splits` command to run).
    """
    sets: dict[str, list[int]] = {}
    problems: list[str] = []
    failed: set[str] = set()
    for key, spec in specs.items():
        try:
            sets[key] = select_tiles(tiles, spec, f"data.{key} (--{key})")
        except DataCheckError as err:
            problems.append(str(err))
            sets[key] = []
            failed.add(key)
    # an unknown labeled split already says why the labeled set is empty
    problems += split_problems(tiles, sets, skip_empty="labeled" in failed)
    if problems:
        raise DataCheckError(splits_message(problems, fix))
    return sets


def splits_message(problems: Sequence[str], fix: str = "") -> str:
    """One message listing every split problem, then the fix."""
    lines = [f"the labeled / unlabeled / val selection has {len(problems)} problem(s):"]
    lines += [f"  - {p}" for p in problems]
    if fix:
        lines.append(fix)
    return "\n".join(lines)


def split_problems(
    tiles: Sequence[TileRecord], sets: dict[str, list[int]], skip_empty: bool = False
) -> list[str]:
    """Problems of selected sets: an empty labeled set, overlaps, scenes across sets."""
    problems = []
    if not sets.get("labeled") and not skip_empty:
        problems.append(
            "the labeled set is empty: set data.labeled (--labeled) to split names "
            "or a tile-id file that selects at least one labeled tile"
        )
    names = list(sets)
    for a_pos, a in enumerate(names):
        for b in names[a_pos + 1 :]:
            both = sorted(set(sets[a]) & set(sets[b]))
            if both:
                ids = [tiles[i].tile_id for i in both[:5]]
                problems.append(
                    f"{a} and {b} sets overlap in {len(both)} tiles, e.g. {ids}; "
                    f"make the selections (data.{a}, data.{b}) disjoint"
                )
    return problems


def check_splits(tiles: Sequence[TileRecord], sets: dict[str, list[int]], fix: str = "") -> None:
    """Refuse an empty labeled set and any overlap between labeled / unlabeled / val."""
    problems = split_problems(tiles, sets)
    if problems:
        raise DataCheckError(splits_message(problems, fix))


def check_done(store: Any, indices: Sequence[int]) -> None:
    """Refuse tiles whose shard is not committed; list their ids."""
    done = np.asarray(store.done(), dtype=bool)
    missing = [store.tiles[i].tile_id for i in indices if not done[i]]
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise DataCheckError(
            f"store is incomplete: {len(missing)} selected tiles are not written "
            f"yet: {missing[:10]}{more}; resume the extraction (run the same "
            "`featcache extract` again) before training"
        )


def resolve_levels(
    store: Any, teachers: Sequence[str], wanted: Sequence[str] | None
) -> dict[str, tuple[LevelSpec, ...]]:
    """Cached levels per teacher; refuse a teacher or level key the store does not hold."""
    have = list(store.schema.teacher_names)
    out: dict[str, tuple[LevelSpec, ...]] = {}
    for name in teachers:
        if name not in have:
            raise DataCheckError(
                f"teacher {name!r} is not in the store (it holds {have}); "
                "extract it, or drop it from --teacher (model.teachers)"
            )
        levels = tuple(store.schema.teacher(name).levels)
        if wanted:
            keys = {lv.key: lv for lv in levels}
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise DataCheckError(
                    f"teacher {name!r} has no cached level(s) {missing} (it "
                    f"has {sorted(keys)}); extract those scales (--scales, "
                    "--flip) or change distill.levels"
                )
            levels = tuple(keys[k] for k in wanted)
        out[name] = levels
    return out


def check_unmasked_padding(
    store: Any, levels: dict[str, Sequence[LevelSpec]], masked: bool
) -> None:
    """Refuse the unmasked loss on levels whose padding tokens the store did not keep.

    ``--unmasked`` (official) gives padding tokens weight; a store extracted without
    ``--keep-padding`` holds only the tokens the tile reads, so a padding target would be a
    clamped edge token instead of the teacher's token for black canvas.
    """
    if masked or store.schema.padding_tokens != "cropped":
        return
    schema = store.schema
    cropped = []
    for name, lvs in levels.items():
        for lv in lvs:
            full = LevelGeometry.from_specs(
                schema.tile_size, schema.base_size, lv, schema.teacher(name).spec
            ).grid
            if store.level_geometry(name, lv.key).grid < full:
                cropped.append(f"{name}/{lv.key}")
    if cropped:
        raise DataCheckError(
            "--unmasked (distill.masked = false, also set by --preset official) trains on "
            f"padding tokens, but store {store.url} stores no padding tokens for {cropped[:6]}"
            f"{' ...' if len(cropped) > 6 else ''} (extracted with --crop-padding); "
            "re-extract it with `featcache extract SOURCE STORE ... --keep-padding`, or train "
            "with --masked"
        )


def check_fingerprint(store: Any, expected: str | None, expected_schema: dict | None) -> None:
    """Refuse a store whose fingerprint differs from the pinned one; say what changed."""
    if expected is None or store.fingerprint == expected:
        return
    diffs = dict_differences(expected_schema, store.schema.to_dict()) if expected_schema else []
    detail = "; ".join(diffs[:8]) if diffs else "same schema, different tile list or pixels"
    raise DataCheckError(
        f"store fingerprint {store.fingerprint[:12]} != the run's "
        f"{expected[:12]} ({detail}); train from the store the run started "
        "with, or start a new run (new --out) for this store"
    )


def mask_labels(
    reader: Any,
    indices: Sequence[int],
    on_bad: OnBadTile | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[int, int]:
    """Highest label in each tile's mask (-1: no labeled pixel), tile index -> label.

    A tile whose mask fails its checksum raises `TileDataError`, or is left out and passed to
    ``on_bad`` (``--skip-bad-tiles``).
    """
    out = {}
    for i in dict.fromkeys(int(i) for i in indices):
        try:
            m = np.asarray(reader.read_mask(i))
        except TileDataError as err:
            if on_bad is None:
                raise
            on_bad(err)
            continue
        vals = m[m != ignore_index]
        out[i] = int(vals.max()) if vals.size else -1
    return out


def check_classes(
    num_classes: int | None,
    class_names: Sequence[str],
    reader: Any,
    indices: Sequence[int],
    ignore_index: int,
    tops: dict[int, int] | None = None,
) -> int:
    """Class count that config, store and labeled masks agree on; returns it.

    ``tops``: the `mask_labels` of ``indices`` when already read (else the masks are read).
    """
    n_store = len(class_names)
    if num_classes is not None and n_store and num_classes != n_store:
        raise DataCheckError(
            f"--num-classes {num_classes} (model.num_classes) but the data has {n_store} "
            f"classes {list(class_names)}; drop --num-classes (the data's class list decides) "
            "or give the matching count"
        )
    n = num_classes if num_classes is not None else n_store
    if n < 1:
        raise DataCheckError(
            "no class count: the data lists no class names; pass --num-classes N "
            "(model.num_classes)"
        )
    if tops is None:
        tops = mask_labels(reader, indices, ignore_index=ignore_index)
    for i in indices:
        top = tops.get(int(i), -1)
        if top >= n:
            raise DataCheckError(
                f"mask of tile {reader.tiles[i].tile_id!r} has label {top} "
                f">= {n} classes; the masks use {top + 1}+ classes: fix "
                f"model.num_classes or the masks (ignore = {ignore_index})"
            )
    return n


def check_labeled(
    tops: dict[int, int],
    labeled: Sequence[int],
    origin: str,
    store_url: str | None,
    ignore_index: int,
) -> None:
    """Refuse a labeled set in which no tile has a labeled pixel (it would train on nothing)."""
    if not labeled or any(tops.get(int(i), -1) >= 0 for i in labeled):
        return
    info = (
        f"`featcache info {store_url}` shows the store's labeled / unlabeled tile counts"
        if store_url
        else "check the dataset's masks/ folder"
    )
    raise DataCheckError(
        f"the labeled set ({origin}) has {len(labeled)} tile(s) but none has a mask: every "
        f"pixel is ignore ({ignore_index}), so the supervised loss would be 0 at every step. "
        "Fix: put the masks beside the images (masks/ with the images' file names) and "
        f"re-extract, or choose a labeled split or partition that has masks; {info}"
    )


def _read_paths(store: Any, levels: dict[str, Sequence[LevelSpec]]) -> list[str]:
    """The per-tile arrays a run reads: pixels, and each teacher level's features and aux."""
    paths = ["pixels/image", "pixels/mask"] if store.schema.store_pixels else []
    for name, lvs in levels.items():
        entry = store.schema.teacher(name)
        has_aux = get_codec(entry.codec).aux_shape(entry.spec.channels) is not None
        for lv in lvs:
            paths.append(L.feature_path(name, lv.key))
            if has_aux:
                paths.append(L.aux_path(name, lv.key))
    return paths


def _store_refused(store: Any, problems: Sequence[str], skip_hint: str = "") -> DataCheckError:
    return DataCheckError(
        f"store {store.url} cannot be trained from:\n  - "
        + "\n  - ".join(problems)
        + f"\nFix: check it with `featcache verify {store.url}`, then re-extract it "
        f"(`featcache extract` into a new store, or with --overwrite){skip_hint}"
    )


def check_store_arrays(store: Any, levels: dict[str, Sequence[LevelSpec]]) -> None:
    """Refuse a store whose arrays to be read are missing or differ from its schema.

    Checks the done flags, the checksum table, the pixels and every teacher level the run
    reads (its features and codec side data): present, with the dtype, shape and fill value
    the schema implies (an edited ``data_type`` would be misread, not fail).
    """
    problems = store.array_problems(["done", "checksum", *_read_paths(store, levels)])
    if problems:
        raise _store_refused(store, problems)


def check_store_files(
    store: Any, levels: dict[str, Sequence[LevelSpec]], indices: Sequence[int]
) -> None:
    """Refuse a store that lost a shard file the run would read (one existence check each)."""
    problems = store.missing_files(_read_paths(store, levels), indices)
    if problems:
        hint = "; or leave those tiles out with --skip-bad-tiles"
        raise _store_refused(store, problems[:10], hint)


def check_stats(url: str, teacher: str, level: str, mean: np.ndarray, std: np.ndarray) -> None:
    """Refuse statistics that would blow up standardised targets (non-finite, or std 0)."""
    bad_mean = np.flatnonzero(~np.isfinite(mean))
    bad_std = np.flatnonzero(~(np.isfinite(std) & (std > 0)))
    if bad_mean.size or bad_std.size:
        raise DataCheckError(
            f"store {url}: the statistics of teacher {teacher!r} level {level} have "
            f"{bad_mean.size} non-finite mean(s) and {bad_std.size} std(s) that are 0 or "
            f"non-finite (e.g. channels {(bad_std.tolist() or bad_mean.tolist())[:5]}); "
            "--standardize would divide the targets by them. Fix: check the store with "
            f"`featcache verify {url}` and re-extract it, or train with --no-standardize"
        )


def recorded_val(
    tiles: Sequence[TileRecord], data: dict[str, Any], store_url: str | None
) -> list[int]:
    """The val tiles a run used, from its config's ``data`` section (a checkpoint's).

    Its saved partition's val set when it named one, else its val selection (unset: the split
    named ``val``), so `evaluate` scores what training scored.
    """
    from featstore.partitions import read_partition

    if data.get("partition"):
        if not store_url:
            raise DataCheckError(
                f"the run used the partition {data['partition']!r} of its "
                "store: pass --store URL (or choose tiles with --split)"
            )
        return read_partition(store_url, data["partition"]).indices(tiles, store_url)["val"]
    return select_tiles(tiles, data.get("val") or "val", "the run's data.val")


def batch_fit_message(per_rank: dict[str, int], batch: dict[str, int], world: int) -> str:
    """Why no batch fills, and the largest per-process batch that does.

    Args:
        per_rank: Items per process and epoch of each stream (the labeled stream is repeated to
            the unlabeled length); incomplete batches are dropped (``drop_last``).
        batch: The configured batch of each stream.
        world: Processes.
    """
    parts = [f"{k} {per_rank[k]} tile(s) per process, batch {batch[k]}" for k in per_rank]
    fit = {k: min(batch[k], per_rank[k]) for k in per_rank}
    suggestion = f"{fit['labeled']}+{fit.get('unlabeled', 0)}"
    return (
        f"the data cannot fill one batch over {world} process(es) (an epoch drops its last "
        f"incomplete batch): {'; '.join(parts)}; the largest batch that fills is "
        f"--batch {suggestion} (or add tiles)"
    )


__all__ = [
    "DataCheckError",
    "OnBadTile",
    "check_classes",
    "check_done",
    "check_fingerprint",
    "check_labeled",
    "check_splits",
    "check_stats",
    "check_store_arrays",
    "check_store_files",
    "mask_labels",
    "recorded_val",
    "resolve_levels",
    "select_sets",
    "select_tiles",
    "batch_fit_message",
    "split_problems",
    "splits_message",
]
