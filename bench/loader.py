"""Benchmark 3: cached-target reads and the full data path vs what the trainer consumes.

A store with a DINOv2-B-sized level (37x37x768 fp16, 2.1 MB per tile, random values written
straight through featstore's writer) and 512 px tiles. Measured:

* random single-tile reads (``FeatureStore.read``: zarr read + decode), one thread and the
  reader's concurrent ``read_many``: tiles/s and MB/s of stored bytes;
* the data path per 8+8 step, stage by stage: ``StoreDataset`` items (image + mask + chosen level)
  and ``collate``; view rendering + strong colour + CutMix (``render_batch``); target sampling
  (the ``warp`` target source: bilinear gather + CutMix mixing), all on this CPU;
* the trainer's consumption: the cached training step at real size measured in the same run
  (``bench/train_step.py --child cached``, batch 1+1, scaled x8 to 8+8 as FLOPs scale);
* the cost of the scale blend: the same data path on a store of the default levels
  (``MULTI_SCALES`` + flip, random DINOv2-B-sized grids), nearest level vs the default blend.

* the item stage alone (items + collate, with the default blend) on stores of the default levels,
  per codec (the default int8 and fp16): item by item (``ds[k]``) vs the DataLoader's batched
  fetch (``__getitems__``), interleaved in one run (``--items-only``);
* the cost of checksum-verified reads (``open_store(verify_reads=...)``, on by default since
  issue 11): ``read_half`` of every tile and the items stage of the data path, verification on vs
  off, interleaved repetitions in one run.

Usage: ``python bench/loader.py [--quick] [--blend-only] [--verify-only] [--items-only]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME, GRID, CH, TILE, CROP = "dinov2_vitb14", 37, 768, 512, 518
BATCH = 8


def build_store(url: str, n: int, tps: int = 16, levels: tuple = (), codec: str = "fp16") -> float:
    """Write ``n`` tiles of random features + random pixels; return the write seconds.

    ``levels``: the cached ``LevelSpec`` set (default: ``s1.00`` only); ``codec``: the store's
    codec (a name `featstore.codecs` knows, e.g. ``fp16`` or the CLI default ``int8``).
    """
    import numpy as np

    from featstore import (
        LevelGeometry,
        LevelSpec,
        StoreSchema,
        TeacherEntry,
        TeacherSpec,
        TileRecord,
        create_store,
    )

    spec = TeacherSpec(
        NAME,
        "timm",
        "vit_base_patch14_dinov2",
        "random",
        None,
        518,
        14,
        CH,
        extra=(("snap_to_stride", "1"),),
    )
    schema = StoreSchema(
        "bench",
        TILE,
        CROP,
        class_names=tuple(f"c{i}" for i in range(7)),
        tiles_per_shard=tps,
        teachers=(TeacherEntry(spec, tuple(levels) or (LevelSpec(1.0),), {"name": codec}),),
    )
    grids = {
        lv.key: LevelGeometry.from_specs(TILE, CROP, lv, spec).grid
        for lv in schema.teachers[0].levels
    }
    tiles = [
        TileRecord(f"t{i:05d}", "bench", (0, 0, TILE, TILE), "train", f"{i:016x}") for i in range(n)
    ]
    w = create_store(url, schema, tiles, overwrite=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for k in range(w.n_shards):
        m = len(w.shard_tiles(k))
        feats = {
            key: rng.standard_normal((m, g, g, CH), dtype=np.float32) for key, g in grids.items()
        }
        images = rng.integers(0, 256, (m, TILE, TILE, 3), dtype=np.uint8)
        masks = rng.integers(0, 7, (m, TILE, TILE), dtype=np.uint8)
        w.write_shard(k, {NAME: feats}, images=images, masks=masks)
    w.finalize()
    return time.perf_counter() - t0


def random_reads(url: str, n_reads: int) -> dict[str, Any]:
    """Random single-tile reads: sequentially, and concurrently through ``read_many``."""
    import numpy as np

    from featstore import open_store

    store = open_store(url)
    n = len(store)
    rng = np.random.default_rng(1)
    stored = GRID * GRID * CH * 2
    idx = rng.integers(0, n, n_reads)
    store.read(NAME, 0)  # open the arrays once
    t0 = time.perf_counter()
    for i in idx:
        store.read(NAME, int(i))
    seq = time.perf_counter() - t0
    idx = rng.integers(0, n, n_reads)
    t0 = time.perf_counter()
    for s in range(0, n_reads, 16):
        store.read_many(NAME, [int(i) for i in idx[s : s + 16]], max_workers=8)
    conc = time.perf_counter() - t0
    enc = rng.integers(0, n, n_reads)
    t0 = time.perf_counter()
    for i in enc:
        store.read_encoded(NAME, int(i))
    raw = time.perf_counter() - t0
    return {
        "n_reads": n_reads,
        "tile_bytes": stored,
        "seq_tiles_per_s": n_reads / seq,
        "seq_mb_per_s": n_reads * stored / seq / 1e6,
        "conc_tiles_per_s": n_reads / conc,
        "conc_mb_per_s": n_reads * stored / conc / 1e6,
        "encoded_only_tiles_per_s": n_reads / raw,
    }


def _datasets(url: str, scale_blend: float) -> tuple[Any, tuple[Any, Any]]:
    """The warp target source of the store's levels and its labeled and unlabeled datasets."""
    from featstore import open_store
    from featviews.sources import SourceContext, ViewSampling, WarpSource
    from trainer.data import StoreDataset

    store = open_store(url)
    levels = {NAME: store.levels(NAME)}
    sampling = ViewSampling(TILE, CROP, CROP, scale_blend=scale_blend)
    geoms = {(NAME, lv.key): store.level_geometry(NAME, lv.key) for lv in store.levels(NAME)}
    source = WarpSource(SourceContext(sampling, levels, geoms, store))
    every = list(range(len(store)))
    return source, tuple(StoreDataset(store, every, source, s == 0, 0, stream=s) for s in (0, 1))


def data_path(url: str, n_steps: int, scale_blend: float = 0.0) -> dict[str, Any]:
    """Per-stage seconds of the 8+8 data path (items+collate, render, targets), on the CPU."""
    import numpy as np
    import torch

    from trainer.data import collate
    from trainer.step import render_batch

    targets, (ds_l, ds_u) = _datasets(url, scale_blend)
    n = len(ds_l)
    rng = np.random.default_rng(2)
    dev = torch.device("cpu")
    t = {"items": 0.0, "render": 0.0, "targets": 0.0}
    for step in range(n_steps + 1):
        t0 = time.perf_counter()
        # the DataLoader's batched fetch: one store read per (teacher, level) of the batch
        bl = collate(ds_l.__getitems__([int(k) for k in rng.integers(0, n, BATCH)]))
        bu = collate(ds_u.__getitems__([int(k) for k in rng.integers(0, n, BATCH)]))
        t1 = time.perf_counter()
        gen = torch.Generator().manual_seed(step)
        views = render_batch(bl, bu, dev, gen, 0.5)
        t2 = time.perf_counter()
        tg, valid = targets(NAME, GRID, views, bl, bu)
        t3 = time.perf_counter()
        if step:  # step 0 warms up
            t["items"] += t1 - t0
            t["render"] += t2 - t1
            t["targets"] += t3 - t2
    per = {k: v / n_steps for k, v in t.items()}
    per["total"] = sum(per.values())
    return per


def blend_cost(url: str, n_tiles: int, n_steps: int) -> dict[str, Any]:
    """The data path on a store of the default levels, nearest level vs the default blend."""
    from featstore import LevelSpec
    from pipelines.config import MULTI_SCALES
    from trainer.config import DistillConfig

    levels = [LevelSpec(s, f) for f in (False, True) for s in MULTI_SCALES]
    write_s = build_store(url, n_tiles, tps=4, levels=tuple(levels))
    width = DistillConfig().scale_blend
    return {
        "tiles": n_tiles,
        "levels": len(levels),
        "write_s": write_s,
        "width": width,
        "nearest": data_path(url, n_steps, 0.0),
        "blend": data_path(url, n_steps, width),
    }


def item_stage(url: str, n_steps: int, scale_blend: float) -> dict[str, Any]:
    """Seconds per 8+8 step of the item stage (items + collate), two ways interleaved in one
    run: item by item (``ds[k]``: one read per tile, level and array) and the DataLoader's
    batched fetch (``__getitems__``: every chunk of the batch in one round trip)."""
    import numpy as np

    from trainer.data import collate

    _, sets = _datasets(url, scale_blend)
    n = len(sets[0])
    ways = {
        "item by item": lambda ds, ks: collate([ds[k] for k in ks]),
        "batched": lambda ds, ks: collate(ds.__getitems__(ks)),
    }
    rng = np.random.default_rng(3)
    t = dict.fromkeys(ways, 0.0)
    for step in range(n_steps + 1):
        ks = [[int(k) for k in rng.integers(0, n, BATCH)] for _ in sets]
        for way, fetch in ways.items():
            t0 = time.perf_counter()
            for ds, pos in zip(sets, ks, strict=True):
                fetch(ds, pos)
            if step:  # step 0 warms up
                t[way] += time.perf_counter() - t0
    return {way: v / n_steps for way, v in t.items()}


def item_stage_codecs(tmp: str, n_tiles: int, n_steps: int) -> dict[str, Any]:
    """``item_stage`` with the default blend on stores of the default levels, per codec."""
    from featstore import LevelSpec
    from featstore.constants import DEFAULT_CODEC
    from pipelines.config import MULTI_SCALES
    from trainer.config import DistillConfig

    levels = tuple(LevelSpec(s, f) for f in (False, True) for s in MULTI_SCALES)
    width = DistillConfig().scale_blend
    out: dict[str, Any] = {"tiles": n_tiles, "levels": len(levels), "width": width}
    for codec in dict.fromkeys((DEFAULT_CODEC, "fp16")):
        url = f"{tmp}/{codec}.zarr"
        build_store(url, n_tiles, tps=4, levels=levels, codec=codec)
        out[codec] = item_stage(url, n_steps, width)
    return out


def item_stage_table(res: dict[str, Any]) -> str:
    """Per codec: ms per 8+8 step and steps/s of one process, item by item vs batched."""
    rows = []
    for codec, per in res.items():
        if not isinstance(per, dict):
            continue
        one, batched = per["item by item"], per["batched"]
        rows.append(
            [
                codec,
                f"{1000 * one:.0f} ms ({1 / one:.1f}/s)",
                f"{1000 * batched:.0f} ms ({1 / batched:.1f}/s)",
                f"{one / batched:.2f}",
            ]
        )
    head = ["codec", "item by item", "batched fetch", "speed-up"]
    return C.markdown_table(head, rows)


def blend_table(blend: dict[str, Any]) -> str:
    """Nearest level vs scale blend, stage by stage, with the ratio."""
    rows = [
        [
            k,
            f"{1000 * blend['nearest'][k]:.0f} ms",
            f"{1000 * blend['blend'][k]:.0f} ms",
            f"{blend['blend'][k] / blend['nearest'][k]:.2f}",
        ]
        for k in ("items", "render", "targets", "total")
    ]
    return C.markdown_table(
        [
            f"stage per 8+8 step, store of {blend['levels']} levels",
            "nearest level",
            f"scale blend {blend['width']}",
            "ratio",
        ],
        rows,
    )


def trainer_step(quick: bool) -> dict[str, Any]:
    """Cached training step at real size (1+1, fresh process), same run; or bench 1's JSON."""
    import json

    if quick:
        path = C.OUT_DIR / "train_step.json"
        if path.is_file():
            runs = json.loads(path.read_text())["runs"]
            r = next((x for x in runs if x["config"] == "cached" and x["batch"] == 1), None)
            if r:
                return {"source": "bench/out/train_step.json", **r}
    r = C.run_child(
        Path(__file__).with_name("train_step.py"),
        ["--child", "cached", "--batch", "1", "--steps", "1"],
    )
    return {"source": "measured in this run", **r}


def verify_cost(url: str, reps: int) -> dict[str, Any]:
    """``read_half`` of every tile with checksum verification off and on, interleaved ``reps``
    times (so load changes hit both alike); minimum and median seconds per tile of each."""
    from featstore import open_store

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for verify in (False, True):
            store = open_store(url, verify_reads=verify)
            n = len(store)
            store.read_half(NAME, 0)  # open the arrays once
            t0 = time.perf_counter()
            for i in range(n):
                store.read_half(NAME, i)
            times[verify].append((time.perf_counter() - t0) / n)
    out: dict[str, Any] = {"reps": reps, "tile_bytes": GRID * GRID * CH * 2}
    for verify, ts in times.items():
        key = "on" if verify else "off"
        out[f"{key}_min_ms"] = 1000 * min(ts)
        out[f"{key}_median_ms"] = 1000 * sorted(ts)[len(ts) // 2]
    out["ratio_min"] = out["on_min_ms"] / out["off_min_ms"]
    out["ratio_median"] = out["on_median_ms"] / out["off_median_ms"]
    return out


def verify_table(v: dict[str, Any]) -> str:
    mb = v["tile_bytes"] / 1e6
    return C.markdown_table(
        [f"read_half of a {mb:.2f} MB tile", "verify off", "verify on (default)", "on / off"],
        [
            [
                "best of " + str(v["reps"]),
                f"{v['off_min_ms']:.2f} ms",
                f"{v['on_min_ms']:.2f} ms",
                f"{v['ratio_min']:.2f}x",
            ],
            [
                "median",
                f"{v['off_median_ms']:.2f} ms",
                f"{v['on_median_ms']:.2f} ms",
                f"{v['ratio_median']:.2f}x",
            ],
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="32 tiles, fewer reads/steps, trainer step from train_step.json",
    )
    ap.add_argument(
        "--blend-only",
        action="store_true",
        help="only the scale-blend cost (nearest level vs blend, default levels)",
    )
    ap.add_argument(
        "--verify-only",
        action="store_true",
        help="only the cost of checksum-verified reads (verify on vs off)",
    )
    ap.add_argument(
        "--items-only",
        action="store_true",
        help="only the item stage with the blend, per codec, item by item vs batched",
    )
    args = ap.parse_args()
    if args.items_only:
        with tempfile.TemporaryDirectory() as tmp:
            res = item_stage_codecs(tmp, 8 if args.quick else 16, 3 if args.quick else 10)
        print(item_stage_table(res))
        C.write_json("loader_items", res)
        return
    if args.verify_only:
        with tempfile.TemporaryDirectory() as tmp:
            build_store(f"{tmp}/store.zarr", 32 if args.quick else 64)
            cost = verify_cost(f"{tmp}/store.zarr", 3 if args.quick else 9)
        print(verify_table(cost))
        C.write_json("loader_verify", cost)
        return
    if args.blend_only:
        with tempfile.TemporaryDirectory() as tmp:
            blend = blend_cost(
                f"{tmp}/levels.zarr", 8 if args.quick else 16, 2 if args.quick else 6
            )
        print(blend_table(blend))
        C.write_json("loader_blend", blend)
        return
    n_tiles = 32 if args.quick else 128
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/store.zarr"
        write_s = build_store(url, n_tiles)
        reads = random_reads(url, 64 if args.quick else 256)
        path = data_path(url, 2 if args.quick else 6)
        blend = blend_cost(f"{tmp}/levels.zarr", 8 if args.quick else 16, 2 if args.quick else 6)
        verify = verify_cost(url, 3 if args.quick else 9)
    step = trainer_step(args.quick)
    # A 1+1 step scaled to 8+8: FLOPs and time are linear in the batch at this size.
    step_88_s = step["median_s"] * BATCH
    data_steps = 1.0 / path["total"]
    loader_steps = 1.0 / path["items"]
    rows = [
        [
            "random reads, 1 thread",
            f"{reads['seq_tiles_per_s']:.0f} tiles/s",
            f"{reads['seq_mb_per_s']:.0f} MB/s",
        ],
        [
            "random reads, read_many (8 threads)",
            f"{reads['conc_tiles_per_s']:.0f} tiles/s",
            f"{reads['conc_mb_per_s']:.0f} MB/s",
        ],
        [
            "encoded reads (zarr only, no decode)",
            f"{reads['encoded_only_tiles_per_s']:.0f} tiles/s",
            "",
        ],
    ]
    t1 = C.markdown_table(["read", "rate", "throughput"], rows)
    stages = [
        [k, f"{1000 * v:.0f} ms", f"{100 * v / path['total']:.0f} %"]
        for k, v in path.items()
        if k != "total"
    ]
    stages.append(["total", f"{1000 * path['total']:.0f} ms", "100 %"])
    t2 = C.markdown_table(
        ["data-path stage per 8+8 step (1 process, CPU)", "time", "share"], stages
    )
    headroom_full = data_steps * step_88_s
    headroom_loader = loader_steps * step_88_s
    t3 = C.markdown_table(
        ["figure", "value", "goal", "status"],
        [
            [
                "cached train step 8+8@518 on this CPU (1+1 measured x8)",
                f"{step_88_s:.0f} s/step ({step['source']})",
                "",
                "",
            ],
            [
                "full data path (items + render + targets) / trainer consumption",
                f"{headroom_full:.0f}x",
                ">= 3x",
                C.goal(headroom_full, 3.0, False),
            ],
            [
                "loader stage alone (items + collate) / trainer consumption",
                f"{headroom_loader:.0f}x",
                ">= 3x",
                C.goal(headroom_loader, 3.0, False),
            ],
        ],
    )
    text = f"{t1}\n\n{t2}\n\n{t3}\n\n{blend_table(blend)}\n\n{verify_table(verify)}\n"
    print(text)
    C.write_json(
        "loader",
        {
            "tiles": n_tiles,
            "write_s": write_s,
            "reads": reads,
            "data_path_s": path,
            "trainer_step": step,
            "step_8p8_s": step_88_s,
            "headroom_full": headroom_full,
            "headroom_loader": headroom_loader,
            "scale_blend": blend,
            "verify_reads": verify,
            "markdown": text,
        },
    )


if __name__ == "__main__":
    main()
