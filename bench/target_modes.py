"""Benchmark: one short training run per distillation target mode on the real LoveDA tiles.

The three 1024 px LoveDA scenes are tiled at 128 px (192 tiles, split per scene in a checkerboard:
labeled / unlabeled / held-out val). Teachers: the real EfficientNet-Lite0 (ImageNet weights,
``timm:tf_efficientnet_lite0``, stride 16) and a tiny random ViT (``dinov2_vitb14`` tiny); tiny
student; same seed, same iterations for every mode:

* ``online``: the teachers run on every training view (reference);
* ``warp-1s``: cached level ``s1.00`` only, warped to each view;
* ``warp-ms``: cached multi-scale + flip levels, the nearest one warped;
* ``grid_aligned``: views snapped to the cached token grids (exact reads, restricted views);
* ``view_bank``: K exact views per tile (the teacher run on each), ``p_bank = 1``.

Prints a markdown table (last-10-step means of the loss terms, mIoU/OA of the student on the
held-out tiles, wall time and its ratio to online measured in this run), writes
``bench/out/target_modes.json`` and a loss-curve PNG ``bench/out/target_modes.png``.
Usage: ``python bench/target_modes.py [--quick] [--iters N] [--threads N]``.
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

TILE, CROP = 128, 112
VIT = "dinov2_vitb14"
EFF = "timm:tf_efficientnet_lite0:3"  # the name the store records (feature index 3, stride 16)
MODES = ("online", "warp-1s", "warp-ms", "grid_aligned", "view_bank")
SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


def build_store(root: Path, k: int) -> tuple[str, dict[str, float]]:
    """Extract both teachers (multi-scale + flip levels) and add a K-view bank; time each."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction
    from pipelines.teachers import efficientnet_lite0_weights_path
    from pipelines.viewbank import build_view_bank

    weights = {EFF: str(efficientnet_lite0_weights_path())}
    t0 = time.perf_counter()
    url = run_extraction(ExtractConfig(
        source=str(C.LOVEDA), out=str(root / "store.zarr"), layout="loveda-folder",
        teachers=(EFF, VIT), weights=weights, tiny=True, scales=SCALES, flip=True,
        tile_size=TILE, base_size=CROP, tiles_per_shard=32, batch_size=32), progress=False)
    t1 = time.perf_counter()
    build_view_bank(url, weights=weights, tiny=True, k=k, seed=1, batch_size=32)
    return url, {"extract_s": t1 - t0, "bank_s": time.perf_counter() - t1}


def splits(url: str, root: Path, quick: bool) -> dict[str, str]:
    """Per scene checkerboard of 8x8 tiles: half val, the rest split labeled / unlabeled."""
    from featstore import open_store

    ids = [t.tile_id for t in open_store(url).tiles]
    sets: dict[str, list[str]] = {"labeled": [], "unlabeled": [], "val": []}
    for k, tid in enumerate(ids):
        r, c = (k % 64) // 8, k % 8
        if (r + c) % 2:
            if not quick or (r + c) % 4 == 1:  # quick: half the val tiles
                sets["val"].append(tid)
        else:
            sets["labeled" if (r // 2 + c // 2) % 2 == 0 else "unlabeled"].append(tid)
    out = {}
    for name, lst in sets.items():
        path = root / f"{name}.txt"
        path.write_text("\n".join(lst) + "\n")
        out[name] = str(path)
    return out


def config(mode: str, url: str, lists: dict[str, str], out: Path, iters: int) -> Any:
    """The run config of one mode (everything else equal)."""
    from pipelines.teachers import efficientnet_lite0_weights_path
    from trainer.config import TeacherConfig, TrainConfig

    cfg = TrainConfig(mode="online" if mode == "online" else "cached", crop_size=CROP)
    cfg.data.store = url
    cfg.data.labeled, cfg.data.unlabeled, cfg.data.val = (
        lists["labeled"], lists["unlabeled"], lists["val"])
    cfg.data.num_workers = 0
    cfg.model.teachers = [TeacherConfig(EFF, weights=str(efficientnet_lite0_weights_path())),
                          TeacherConfig(VIT)]
    cfg.model.tiny = True
    cfg.optim.lr, cfg.optim.lr_multi = 1e-3, 1.0  # random-init tiny student
    cfg.schedule.batch_labeled, cfg.schedule.batch_unlabeled = 8, 4
    cfg.schedule.iters = iters
    cfg.schedule.log_interval = 1
    cfg.schedule.eval_interval = iters
    cfg.runtime.out_dir = str(out / mode)
    cfg.runtime.device = "cpu"
    cfg.runtime.progress = False
    cfg.runtime.tensorboard = False
    if mode == "warp-1s":
        cfg.distill.levels = ["s1.00"]
    elif mode == "grid_aligned":
        cfg.distill.target_mode = "grid_aligned"
    elif mode == "view_bank":
        cfg.distill.target_mode = "view_bank"
        cfg.distill.p_bank = 1.0
    return cfg


def run_mode(cfg: Any) -> dict[str, Any]:
    """Train; return wall time, per-step loss terms (metrics.csv) and held-out metrics."""
    import csv

    from trainer.engine import train

    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    with (Path(cfg.runtime.out_dir) / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    curves = {k: [float(r[k]) for r in rows] for k in rows[0] if k not in ("step", "lr")}
    m = result.metrics["student"]
    return {"wall_s": wall, "curves": curves, "miou": float(m["miou"]), "oa": float(m["oa"])}


def constant_predictor(url: str, val_list: str) -> tuple[float, float]:
    """mIoU and OA of predicting the val set's majority class everywhere."""
    import numpy as np

    from featstore import open_store

    store = open_store(url)
    pos = {t.tile_id: i for i, t in enumerate(store.tiles)}
    ids = [ln for ln in Path(val_list).read_text().split() if ln]
    masks = np.stack([store.read_mask(pos[t]) for t in ids])
    counts = np.bincount(masks[masks != 255].ravel(), minlength=7)
    oa = counts.max() / counts.sum()
    return float(oa / np.count_nonzero(counts)), float(oa)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Total and distillation loss per step (moving average over 10 steps) per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, r in results.items():
        for ax, key in zip(axes, ("loss", "distill"), strict=True):
            y = np.asarray(r["curves"][key])
            w = min(10, len(y))
            ax.plot(np.convolve(y, np.ones(w) / w, mode="valid"), label=mode)
    for ax, title in zip(axes, ("total loss", "distillation loss (mean over teachers)"),
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    """Parse arguments, run every mode, print the table, write JSON and the PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 iterations, half the val tiles")
    ap.add_argument("--iters", type=int, default=None, help="iterations per mode (default 200)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: tiny models gain nothing from more on a CPU)")
    ap.add_argument("--k", type=int, default=4, help="view bank: views per tile")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    iters = args.iters or (30 if args.quick else 200)
    with tempfile.TemporaryDirectory(prefix="target_modes_") as tmp:
        root = Path(tmp)
        url, prep = build_store(root, args.k)
        lists = splits(url, root, args.quick)
        results = {m: run_mode(config(m, url, lists, root / "runs", iters)) for m in MODES}
        const = constant_predictor(url, lists["val"])
    ref = results["online"]["wall_s"]
    rows = []
    for mode, r in results.items():
        last = {k: sum(v[-10:]) / len(v[-10:]) for k, v in r["curves"].items()}
        rows.append([mode, f"{last['loss']:.3f}", f"{last['loss_x']:.3f}", f"{last['loss_u']:.3f}",
                     f"{last['distill']:.4f}", f"{r['miou'] * 100:.2f}", f"{r['oa'] * 100:.2f}",
                     f"{r['wall_s']:.1f}", f"{r['wall_s'] / ref:.2f}"])
    rows.append(["constant (val majority)", "", "", "", "", f"{const[0] * 100:.2f}",
                 f"{const[1] * 100:.2f}", "", ""])
    print(f"{iters} iterations per mode, batch 8 labeled + 4 unlabeled, crop {CROP}, "
          f"tiles {TILE} px; extraction {prep['extract_s']:.1f} s, bank K={args.k} "
          f"{prep['bank_s']:.1f} s (once, not in the wall times)\n")
    print(C.markdown_table(["mode", "loss", "loss_x", "loss_u", "distill", "val mIoU", "val OA",
                            "wall s", "x online"], rows))
    png = C.OUT_DIR / "target_modes.png"
    plot(results, png)
    C.write_json("target_modes", {"iters": iters,
                                  "prep": prep, "constant": const, "results": results})
    print(f"\nloss curves: {png}")


if __name__ == "__main__":
    main()
