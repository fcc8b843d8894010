"""Benchmark: short training runs per distillation target mode on the real LoveDA tiles.

The three 1024 px LoveDA scenes are tiled at 64 px and trained at a 70 px crop: the official
geometry (tile ~ crop, rescale 0.5-2.0, whole-tile eval at the tile's own size) at 1/8 linear
size. Splits are per 128 px block in a checkerboard (half held-out val, the rest labeled /
unlabeled), so every scene is in every set. Teachers: the real EfficientNet-Lite0 (ImageNet
weights, ``timm:tf_efficientnet_lite0``, stride 16) and a tiny random ViT (``dinov2_vitb14``
tiny). Student: a random-init ViT (width 32, depth 4, LayerScale 1.0 as in
tests/trainer/test_engine_loveda.py). Same seed, same iterations for every mode:

* ``online``: the teachers run on every training view (reference);
* ``warp-1s``: cached level ``s1.00`` only, warped to each view;
* ``warp-ms``: cached ``pipelines.config.MULTI_SCALES`` (the CLI default) + flip levels;
* ``grid_aligned``: views snapped to the cached token grids (exact reads, restricted views);
* ``view_bank``: K exact views per tile (the teacher run on each), ``p_bank = 1``.

Each (mode, seed) run is its own spawned process on one torch thread, ``--jobs`` at a time; wall
and process CPU time of the training loop are recorded (CPU time is the fairer cost under load).
In cached modes a probe runs the online teachers on the very views every ``--probe``-th step and
records the cosine of the mode's target to the online target, labeled and strong views apart
(its cost is excluded from the times). Prints a markdown table, writes
``bench/out/target_modes.json`` and a loss-curve PNG ``bench/out/target_modes.png``.
Usage: ``python bench/target_modes.py [--quick] [--iters N] [--seeds 0,1] [--jobs 2]
[--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from featstore.constants import SCALE_RANGE  # official rescale range (zoom of the tile)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TILE, CROP, BLOCK = 64, 70, 128
VIT = "dinov2_vitb14"
EFF = "timm:tf_efficientnet_lite0:3"  # the name the store records (feature index 3, stride 16)
MODES = ("online", "warp-1s", "warp-ms", "grid_aligned", "view_bank")
# Tiny random-init student; LayerScale 1.0 (timm's 1e-5 leaves a random ViT near the identity).
STUDENT = {"model_kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2, "init_values": 1.0}}
LAST = 20  # steps averaged for the final loss terms


def build_store(
    root: Path, k: int, scales: tuple[float, ...], limit: int | None
) -> tuple[str, dict[str, float]]:
    """Extract both teachers at ``scales`` + flip and add a K-view bank; time each.

    A store already complete under ``root`` (same scales, K and tile limit: they name its
    folder) is reused with its recorded build times, so ``--workdir`` reruns skip the
    extraction.
    """
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction
    from pipelines.teachers import efficientnet_lite0_weights_path
    from pipelines.viewbank import build_view_bank

    tag = "_".join(f"{s:g}" for s in scales) + f"-k{k}-n{limit or 'all'}-t{TILE}"
    out = root / f"store-{tag}.zarr"
    done = root / f"store-{tag}.done"
    if done.is_file():  # the build times recorded when it was made
        return str(out), {**json.loads(done.read_text()), "reused": True}
    weights = {EFF: str(efficientnet_lite0_weights_path())}
    t0 = time.perf_counter()
    url = run_extraction(
        ExtractConfig(
            source=str(C.LOVEDA),
            out=str(out),
            layout="loveda-folder",
            overwrite=True,
            teachers=(EFF, VIT),
            weights=weights,
            tiny=True,
            scales=scales,
            flip=True,
            tile_size=TILE,
            base_size=CROP,
            tiles_per_shard=64,
            batch_size=64,
            threads=2,
            limit=limit,
        ),
        progress=False,
    )
    t1 = time.perf_counter()
    build_view_bank(
        url,
        weights=weights,
        tiny=True,
        k=k,
        seed=1,
        batch_size=64,
        scale_range=SCALE_RANGE,
        threads=2,
    )
    prep = {"extract_s": t1 - t0, "bank_s": time.perf_counter() - t1}
    done.write_text(json.dumps(prep))
    return url, {**prep, "reused": False}


def splits(url: str, root: Path, quick: bool) -> dict[str, str]:
    """Checkerboard of 128 px blocks per scene: half val, the rest labeled / unlabeled."""
    from featstore import open_store

    sets: dict[str, list[str]] = {"labeled": [], "unlabeled": [], "val": []}
    for t in open_store(url).tiles:
        r, c = t.window[0] // BLOCK, t.window[1] // BLOCK
        if (r + c) % 2:
            if not quick or (r + c) % 4 == 1:  # quick: half the val tiles
                sets["val"].append(t.tile_id)
        else:
            sets["labeled" if (r // 2 + c // 2) % 2 == 0 else "unlabeled"].append(t.tile_id)
    out = {}
    for name, lst in sets.items():
        path = root / f"{name}.txt"
        path.write_text("\n".join(lst) + "\n")
        out[name] = str(path)
    return out


def config(mode: str, url: str, lists: dict[str, str], out: Path, iters: int, seed: int) -> Any:
    """The run config of one mode (everything else equal)."""
    from pipelines.teachers import efficientnet_lite0_weights_path
    from trainer.config import TeacherConfig, TrainConfig

    cfg = TrainConfig(mode="online" if mode == "online" else "cached", crop_size=CROP)
    cfg.data.store = url
    cfg.data.labeled, cfg.data.unlabeled, cfg.data.val = (
        lists["labeled"],
        lists["unlabeled"],
        lists["val"],
    )
    cfg.data.num_workers = 0
    cfg.data.scale_range = SCALE_RANGE
    cfg.model.teachers = [
        TeacherConfig(EFF, weights=str(efficientnet_lite0_weights_path())),
        TeacherConfig(VIT),
    ]
    cfg.model.tiny = True
    cfg.model.student = STUDENT
    cfg.optim.lr, cfg.optim.lr_multi = 2e-3, 1.0  # random init: far above the fine-tune lr
    cfg.schedule.batch_labeled, cfg.schedule.batch_unlabeled = 8, 4
    cfg.schedule.iters = iters
    cfg.schedule.log_interval = 1
    cfg.schedule.eval_interval = iters
    cfg.runtime.seed = seed
    cfg.runtime.out_dir = str(out / f"{mode}-seed{seed}")
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


class CosineProbe:
    """Wraps a target provider; every ``every``-th call per teacher also runs the online teacher
    on the same views and accumulates the token cosine (valid in both), labeled / strong apart.

    Args:
        inner: The run's own target provider (what the student is fed, unchanged).
        online: the ``online`` target source with the same teachers.
        every: Probe period in steps.
    """

    def __init__(self, inner: Any, online: Any, every: int) -> None:
        self.inner, self.online, self.every = inner, online, every
        self.calls: dict[str, int] = {}
        self.sums: dict[str, list[float]] = {}  # name -> [cos_l, n_l, cos_u, n_u]
        self.wall = self.cpu = 0.0

    def __call__(self, name: str, n: int, views: Any, batch_l: Any, batch_u: Any) -> Any:
        target, valid = self.inner(name, n, views, batch_l, batch_u)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] % self.every == 0:
            w0, c0 = time.perf_counter(), time.process_time()
            self._probe(name, n, views, batch_l, batch_u, target, valid)
            self.wall += time.perf_counter() - w0
            self.cpu += time.process_time() - c0
        return target, valid

    def _probe(
        self, name: str, n: int, views: Any, batch_l: Any, batch_u: Any, target: Any, valid: Any
    ) -> None:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            ref, ref_valid = self.online(name, n, views, batch_l, batch_u)
            cos = F.cosine_similarity(target.float(), ref.float(), dim=-1, eps=1e-8)
            w = (valid > 0) & (ref_valid > 0)
        b_l = views.x_l.shape[0]
        acc = self.sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
        for j, part in enumerate((slice(0, b_l), slice(b_l, None))):
            acc[2 * j] += float(cos[part][w[part]].sum())
            acc[2 * j + 1] += float(w[part].sum())

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean cosine per teacher: labeled views, strong views, all."""
        return {
            name: {
                "labeled": a[0] / max(a[1], 1),
                "strong": a[2] / max(a[3], 1),
                "all": (a[0] + a[2]) / max(a[1] + a[3], 1),
                "probes": self.calls[name] // self.every,
            }
            for name, a in self.sums.items()
        }


def run_mode(
    mode: str, seed: int, url: str, lists: dict[str, str], out: str, iters: int, probe: int
) -> dict[str, Any]:
    """Train one (mode, seed) on one thread; return times, loss curves and held-out metrics."""
    import csv

    import torch

    torch.set_num_threads(1)  # tiny models: one thread each, two runs share the two cores
    from featviews.sources import OnlineSource, SourceContext
    from trainer.engine import Trainer
    from trainer.online import load_teachers

    cfg = config(mode, url, lists, Path(out), iters, seed)
    trainer = Trainer(cfg, overwrite=True)  # re-running the benchmark replaces its runs
    probe_obj = None
    if mode != "online" and probe > 0:
        teachers = load_teachers(cfg.model.teachers, True, trainer.device, trainer.data.base_size)
        online = OnlineSource(SourceContext(trainer.source.ctx.sampling, teachers=teachers))
        probe_obj = CosineProbe(trainer.method.source, online, probe)
        trainer.method.source = probe_obj
    load0 = os.getloadavg()
    w0, c0 = time.perf_counter(), time.process_time()
    result = trainer.run()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if probe_obj is not None:
        wall, cpu = wall - probe_obj.wall, cpu - probe_obj.cpu
    with (Path(cfg.runtime.out_dir) / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    curves = {k: [float(r[k]) for r in rows] for k in rows[0] if k not in ("step", "lr")}
    metrics = {
        m: {"miou": float(v["miou"]), "oa": float(v["oa"])} for m, v in result.metrics.items()
    }
    return {
        "mode": mode,
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "curves": curves,
        "metrics": metrics,
        "cosine": probe_obj.summary() if probe_obj else None,
        "loadavg": [load0, os.getloadavg()],
    }


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


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Total, supervised and distillation loss per step (20-step moving average), every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = (
        ("loss", "total loss"),
        ("loss_x", "supervised CE (labeled)"),
        ("distill", "distillation loss (mean over teachers)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {m: f"C{i}" for i, m in enumerate(MODES)}
    seeds = sorted({r["seed"] for r in runs})
    for r in runs:
        style = ("-", "--", ":")[seeds.index(r["seed"]) % 3]
        for ax, (key, _) in zip(axes, keys, strict=True):
            y = np.asarray(r["curves"][key])
            w = min(LAST, len(y))
            ax.plot(
                np.arange(w, len(y) + 1),
                np.convolve(y, np.ones(w) / w, mode="valid"),
                style,
                color=colors[r["mode"]],
                label=f"{r['mode']} s{r['seed']}",
            )
    for ax, (_, title) in zip(axes, keys, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _mean_sd(values: list[float]) -> str:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return f"{v.mean():.2f}" if len(v) < 2 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _ratio(rs: list[dict[str, Any]], ref: dict[int, dict[str, Any]], key: str) -> str:
    """Mean over seeds of a run's time over the same seed's online time ("" without one)."""
    ratios = [r[key] / ref[r["seed"]][key] for r in rs if r["seed"] in ref]
    return f"{sum(ratios) / len(ratios):.2f}" if ratios else ""


def _cosine(rs: list[dict[str, Any]], part: str) -> str:
    """Mean over seeds of the probed target cosine on ``part`` views, per teacher ("" when not
    probed)."""
    if any(r["cosine"] is None for r in rs):
        return ""
    return " / ".join(f"{sum(r['cosine'][t][part] for r in rs) / len(rs):.3f}" for t in (EFF, VIT))


def table(runs: list[dict[str, Any]], const: tuple[float, float]) -> str:
    """Per mode: seed means (± sd over seeds) of last-N loss terms, metrics, time ratios."""
    import numpy as np

    ref = {r["seed"]: r for r in runs if r["mode"] == "online"}
    rows = []
    for mode in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        if not rs:
            continue
        last = {
            k: np.mean([np.mean(r["curves"][k][-LAST:]) for r in rs])
            for k in ("loss", "loss_x", "loss_u", "distill")
        }
        cell = {
            m: {k: _mean_sd([100 * r["metrics"][m][k] for r in rs]) for k in ("miou", "oa")}
            for m in ("student", "ema")
        }
        wall, cpu = (_ratio(rs, ref, key) for key in ("wall_s", "cpu_s"))
        cos = (
            ["1 (ref)"] * 2 if mode == "online" else [_cosine(rs, p) for p in ("labeled", "strong")]
        )
        rows.append(
            [
                mode,
                f"{last['loss']:.3f}",
                f"{last['loss_x']:.3f}",
                f"{last['loss_u']:.3f}",
                f"{last['distill']:.3f}",
                cell["student"]["miou"],
                cell["student"]["oa"],
                cell["ema"]["miou"],
                cell["ema"]["oa"],
                wall,
                cpu,
                *cos,
            ]
        )
    rows.append(
        [
            "constant (val majority)",
            "",
            "",
            "",
            "",
            f"{const[0] * 100:.2f}",
            f"{const[1] * 100:.2f}",
            "",
            "",
            "",
            "",
            "",
            "",
        ]
    )
    return C.markdown_table(
        [
            "mode",
            "loss",
            "loss_x",
            "loss_u",
            "distill",
            "mIoU",
            "OA",
            "EMA mIoU",
            "EMA OA",
            "wall x online",
            "CPU x online",
            "cos labeled (Lite0 / ViT)",
            "cos strong (Lite0 / ViT)",
        ],
        rows,
    )


def main() -> None:
    """Parse arguments, run every (mode, seed), print the table, write JSON and the PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one scene, 60 iterations, one seed, half the val tiles, K = 2",
    )
    ap.add_argument("--iters", type=int, default=None, help="iterations per run (default 300)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--k", type=int, default=None, help="view bank: views per tile (default 4)")
    ap.add_argument(
        "--probe", type=int, default=5, help="cosine probe every N steps in cached modes (0: off)"
    )
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    ap.add_argument(
        "--workdir",
        default=None,
        help="keep the store and runs here and reuse a matching store (default: a "
        "temporary folder)",
    )
    args = ap.parse_args()
    from pipelines.config import MULTI_SCALES  # read at run time: the CLI default scale set

    iters = args.iters or (60 if args.quick else 300)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    k = args.k or (2 if args.quick else 4)
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {list(MODES)}")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="target_modes_") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        # quick: the first scene only (16 x 16 tiles of 64 px) keeps the extraction short
        url, prep = build_store(root, k, tuple(MULTI_SCALES), 256 if args.quick else None)
        lists = splits(url, root, args.quick)
        jobs = [(m, s) for s in seeds for m in modes]
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futs = [
                pool.submit(run_mode, m, s, url, lists, str(root / "runs"), iters, args.probe)
                for m, s in jobs
            ]
            runs = [f.result() for f in futs]
        const = constant_predictor(url, lists["val"])
        n_tiles = {name: len(Path(p).read_text().split()) for name, p in lists.items()}
    total = time.perf_counter() - t0
    reused = "; store reused from --workdir" if prep["reused"] else ""
    print(
        f"{iters} iterations per run, seeds {seeds}, {args.jobs} runs at a time (1 thread "
        f"each); batch 8 labeled + 4 unlabeled, crop {CROP}, tiles {TILE} px {n_tiles}; "
        f"scales {MULTI_SCALES} + flip; extraction {prep['extract_s']:.1f} s, bank K={k} "
        f"{prep['bank_s']:.1f} s (once, not in the times{reused}); total {total:.0f} s; "
        f"load {load_start} -> {os.getloadavg()}\n"
    )
    print(table(runs, const))
    png = C.OUT_DIR / "target_modes.png"
    plot(runs, png)
    C.write_json(
        "target_modes",
        {
            "iters": iters,
            "seeds": seeds,
            "jobs": args.jobs,
            "tile": TILE,
            "crop": CROP,
            "scale_range": SCALE_RANGE,
            "scales": MULTI_SCALES,
            "k": k,
            "tiles": n_tiles,
            "student": STUDENT,
            "prep": prep,
            "constant": const,
            "total_s": total,
            "loadavg": {"start": load_start, "end": os.getloadavg()},
            "runs": runs,
        },
    )
    print(f"\nloss curves: {png}")


if __name__ == "__main__":
    main()
