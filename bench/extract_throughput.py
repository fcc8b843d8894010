"""Benchmark 2: extraction pipeline throughput vs a bare teacher forward loop on the same tiles.

Pipeline = the real extraction code (read tiles from the source, render the level, teacher
forward, encode, write shards, mark done). Bare = the same teacher, the same canvases already
in memory, the same batch size and thread count, forward only. Tiles: the 12 real LoveDA 512
tiles (repeated ``--repeat`` times as synthetic copies so a run lasts long enough to time).
Teachers: EfficientNet-Lite0 with its real weights and a ViT-S/14 DINOv2 with random init.
Also: single process (2 threads) vs a dask LocalCluster of 2 worker processes x 1 thread.

Usage: ``python bench/extract_throughput.py [--quick]``.
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

BATCH = 4


def _source_dir(tmp: str, repeat: int) -> str:
    """The LoveDA images (and masks) copied ``repeat`` times into a generic folder layout."""
    import shutil

    root = Path(tmp) / "src"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for f in sorted((C.LOVEDA / sub).glob("*.png")):
            for r in range(repeat):
                shutil.copy(f, root / sub / f"{f.stem}_{r}.png")
    return str(root)


def bare(name: str, weights: str | None, source: str, threads: int) -> dict[str, Any]:
    """Teacher forward only over the tiles' canvases (pre-rendered in memory)."""
    import numpy as np
    import torch

    from featstore import LevelSpec
    from featviews.render import render_level
    from pipelines.sources import open_source
    from pipelines.teachers import create_teacher

    src = open_source(source, tile_size=512)
    images = np.stack([src.load(i)[0] for i in range(len(src.records))])
    torch.set_num_threads(threads)
    # Throughput does not depend on the weights: the ViT-S row runs random init on purpose.
    teacher = create_teacher(name, weights=weights, base_size=518, random_weights=True)
    canvases = [
        render_level(torch.from_numpy(images[s : s + BATCH]), LevelSpec(1.0), 518)
        for s in range(0, len(images), BATCH)
    ]
    with torch.inference_mode():
        teacher(canvases[0])  # warm-up (one-off kernel selection)
        t0 = time.perf_counter()
        for c in canvases:
            teacher(c)
        dt = time.perf_counter() - t0
    return {"tiles": len(images), "seconds": dt, "tiles_per_s": len(images) / dt}


class _TileCounter:
    """Stands in for the progress bar: counts finished tiles."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


def pipeline(
    name: str, weights: str | None, source: str, out: str, scheduler: str, threads: int
) -> dict[str, Any]:
    """The real ``run_extraction``: end-to-end wall time and the shard loop alone."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import (
        _run_local,
        build_schema,
        create_store,
        make_context,
        open_tiles,
        process_shard,
        run_extraction,
    )

    cfg = ExtractConfig(
        source=source,
        out=out,
        teachers=(name,),
        weights={name: weights} if weights else {},
        batch_size=BATCH,
        threads=threads,
        tiles_per_shard=BATCH,
        scheduler=scheduler,
        overwrite=True,
        random_weights=True,
        scales=(1.0,),
        flip=False,
    )
    t0 = time.perf_counter()
    run_extraction(cfg, progress=False)
    e2e = time.perf_counter() - t0
    res: dict[str, Any] = {"end_to_end_s": e2e}
    if scheduler == "local":
        # Steady state: the same code path minus setup (source scan, teacher build, store create).
        src, records = open_tiles(cfg)
        ctx = make_context(cfg, src, records, "cpu")
        writer = create_store(out + "-2", build_schema(ctx), records, overwrite=True)
        shards = writer.pending_shards()
        process_shard(ctx, writer, shards[0])  # warm-up shard, not timed
        # The loop run_extraction uses locally: loading, compute and writing overlap.
        counter = _TileCounter()
        t0 = time.perf_counter()
        _run_local(ctx, writer, list(shards[1:]), counter)
        dt = time.perf_counter() - t0
        n = counter.n
        res.update(shard_loop_s=dt, shard_loop_tiles=n, tiles_per_s=n / dt)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="EfficientNet-Lite0 only, 12 tiles")
    ap.add_argument("--repeat", type=int, default=None, help="copies of the LoveDA images")
    ap.add_argument("--out", default="extract_throughput", help="JSON name under bench/out/")
    args = ap.parse_args()
    from pipelines.teachers import efficientnet_lite0_weights_path

    lite0 = efficientnet_lite0_weights_path()
    teachers = [
        (
            "timm:tf_efficientnet_lite0",
            str(lite0) if lite0 else None,
            "EfficientNet-Lite0 (real weights)",
        )
    ]
    if not args.quick:
        teachers.append(("timm:vit_small_patch14_dinov2", None, "DINOv2 ViT-S/14 (random init)"))
    repeat = args.repeat or (1 if args.quick else 2)
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        source = _source_dir(tmp, repeat)
        for name, weights, label in teachers:
            # Bare before and after the pipeline: the mean cancels slow drifts of machine load.
            b0 = bare(name, weights, source, 2)
            p = pipeline(name, weights, source, f"{tmp}/a.zarr", "local", 2)
            b1 = bare(name, weights, source, 2)
            b = {
                "tiles": b0["tiles"],
                "runs": [b0, b1],
                "tiles_per_s": 0.5 * (b0["tiles_per_s"] + b1["tiles_per_s"]),
            }
            d = pipeline(name, weights, source, f"{tmp}/b.zarr", "local:2", 1)
            n = b["tiles"]
            e2e_local = n / p["end_to_end_s"]
            e2e_dask = n / d["end_to_end_s"]
            raw.append({"teacher": label, "bare": b, "local": p, "dask": d})
            rows.append(
                [
                    label,
                    n,
                    f"{b['tiles_per_s']:.2f}",
                    f"{p['tiles_per_s']:.2f}",
                    C.fmt(p["tiles_per_s"] / b["tiles_per_s"]),
                    C.goal(p["tiles_per_s"] / b["tiles_per_s"], 0.90, False),
                    C.fmt(e2e_local / b["tiles_per_s"]),
                    C.fmt(e2e_dask / b["tiles_per_s"]),
                    C.fmt(e2e_dask / e2e_local),
                ]
            )
            print(f"{label}: {raw[-1]}", file=sys.stderr, flush=True)
    text = (
        C.markdown_table(
            [
                "teacher",
                "tiles",
                "bare forward tiles/s",
                "pipeline tiles/s (shard loop)",
                "pipeline / bare",
                "goal >= 0.90",
                "end-to-end local / bare",
                "end-to-end dask 2x1 / bare",
                "dask 2x1 / local 1x2 (end-to-end)",
            ],
            rows,
        )
        + "\n"
    )
    print(text)
    C.write_json(args.out, {"runs": raw, "batch": BATCH, "markdown": text})


if __name__ == "__main__":
    main()
