"""Break-even model: when does reading cached targets beat recomputing the teachers?

The paper's setup (student DINOv2-S/14 + DPT; teachers DINOv2-B/14 @518 and CLIP ViT-L/14 @224;
crop 518; 8 labeled + 8 unlabeled items per step), per training step:

* student step  = student FLOPs / GPU throughput;
* online step   = (student + teacher FLOPs) / GPU throughput;
* cached step   = max(student step, bytes read / storage bandwidth). Loader workers read ahead,
  so reads overlap compute and the slower of the two sets the pace. The no-overlap bound
  (student step + read time) is reported next to it.

Recomputing is faster once the GPU throughput exceeds ``P* = online FLOPs * W / bytes`` (overlap;
no-overlap bound: ``P* = teacher FLOPs * W / bytes``).

Measured inputs, no hand-typed figures besides the GPU and storage classes:

* FLOPs: ``bench/out/train_step.json`` (``cached`` = student only, ``online`` = student +
  teachers, counted at real size). FLOPs are linear in batch: an 8+8 step is 8x a 1+1 step.
* Bytes: the store layout of the real teachers' specs (``create_teacher(..., tiny=False,
  random_weights=True).spec``, no weights needed): tokens of a level = grid^2 of its canvas (the
  whole canvas is stored, padding included), times the codec's stored channels and bytes per
  value, plus its per-tile aux (int8: float32 scale and offset per channel). The PCA basis is
  read once per run, not per step, and is left out. Which levels an item reads comes from the
  trainer's own draw and blend (``featviews.sources.WarpSource.draw``), simulated over
  ``--draws`` views: each distinct level (nearest + blended) is one read of its whole grid.

Usage: ``python bench/break_even.py [--draws 5000] [--gpu NAME=TFLOPS ...]
[--storage NAME=GBPS ...]``; writes ``bench/out/break_even.json`` and ``bench/out/break_even.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from featstore.codecs import FeatureCodec, get_codec  # noqa: E402
from featstore.constants import DEFAULT_CROP, MULTI_SCALES  # noqa: E402
from featstore.errors import CodecError  # noqa: E402
from featstore.geometry import LevelGeometry  # noqa: E402
from featstore.schema import LevelSpec, TeacherSpec  # noqa: E402

TILE = 512  # LoveDA / Potsdam tile side of the paper's setup
TEACHERS = ("dinov2_vitb14", "clip_vitl14")
BATCH = 8  # per stream: 8 labeled + 8 unlabeled items per step, each reading its own targets
ITEMS_PER_STEP = 2 * BATCH
TRAIN_STEP_JSON = C.OUT_DIR / "train_step.json"
TRAIN_STEP_CMD = "python bench/train_step.py --configs cached,online --batches 1 --steps 0"

# Effective dense bf16 throughput of a training step, an ASSUMPTION (the model is linear in it;
# the plot spans the axis). Vendor peak dense tensor figures for reference (datasheets / NVIDIA
# architecture whitepapers; GeForce cards: fp16/bf16 with fp32 accumulate): T4 65, RTX 3090 71,
# RTX 4090 165, A100 312, H100 SXM 989 TFLOP/s.
GPU_CLASSES: tuple[tuple[str, float], ...] = (
    ("T4", 25.0),
    ("RTX 3090", 70.0),
    ("RTX 4090", 150.0),
    ("A100", 250.0),
    ("H100", 600.0),
)
# Sequential-read bandwidth classes, GB/s (1e9 bytes), an ASSUMPTION per class.
STORAGE_CLASSES: tuple[tuple[str, float], ...] = (
    ("SATA SSD", 0.5),
    ("NVMe PCIe3", 3.0),
    ("NVMe PCIe4", 7.0),
    ("page cache", 20.0),
)


@dataclass(frozen=True)
class CacheConfig:
    """A cache layout: cached scales (each with its flipped copy when ``flip``), codec, blend."""

    name: str
    scales: tuple[float, ...]
    flip: bool = True
    blend: float = 0.25
    codec: str = "fp16"

    def levels(self) -> tuple[LevelSpec, ...]:
        flips = (False, True) if self.flip else (False,)
        return tuple(LevelSpec(s, f) for s in self.scales for f in flips)


HALF_OCTAVE = (0.5, 0.71, 1.0, 1.41, 2.0)  # the 5-scale layout before issue 12's quarter octave
LAYOUTS = (
    ("default", MULTI_SCALES, 0.25),
    ("blend 0", MULTI_SCALES, 0.0),
    ("5 scales", HALF_OCTAVE, 0.25),
    ("scale 1 only", (1.0,), 0.25),
)
CODECS = ("fp16", "int8", "pca-64", "pca-int8-64")


def default_configs(codecs: Sequence[str] = CODECS) -> list[CacheConfig]:
    """Every layout of ``LAYOUTS`` (all with flipped copies) with every codec."""
    return [
        CacheConfig(f"{name}, {codec}", scales, True, blend, codec)
        for codec in codecs
        for name, scales, blend in LAYOUTS
    ]


# ---------------------------------------------------------------------------- the model


def step_times_s(
    student_flops: float, online_flops: float, step_bytes: float, tflops: float, gbps: float
) -> dict[str, float]:
    """Seconds per step: ``online``, ``cached`` (reads overlap compute), ``cached_sum`` (bound)."""
    student = student_flops / (tflops * 1e12)
    read = step_bytes / (gbps * 1e9)
    return {
        "student": student,
        "read": read,
        "online": online_flops / (tflops * 1e12),
        "cached": max(student, read),
        "cached_sum": student + read,
    }


def break_even_tflops(
    student_flops: float, online_flops: float, step_bytes: float, gbps: float
) -> dict[str, float]:
    """GPU TFLOP/s above which recomputing the teachers is faster than reading the cache.

    Overlap: online < max(student, read) holds only when online < read (online > student
    always), i.e. P > online FLOPs * W / bytes. No overlap: online < student + read, i.e.
    P > teacher FLOPs * W / bytes.
    """
    per_s = gbps * 1e9 / step_bytes  # steps/s the storage alone can feed
    return {
        "overlap": online_flops * per_s / 1e12,
        "no_overlap": (online_flops - student_flops) * per_s / 1e12,
    }


def first_class_above(tflops: float, gpus: Sequence[tuple[str, float]]) -> str:
    """The slowest listed GPU class on which recomputing wins (``none listed`` when none)."""
    faster = [name for name, p in sorted(gpus, key=lambda g: g[1]) if p > tflops]
    return faster[0] if faster else "none listed"


# ---------------------------------------------------------------------------- FLOPs (measured)


def step_flops(path: Path = TRAIN_STEP_JSON, batch: int = BATCH) -> dict[str, float]:
    """Student-only and online FLOPs of a ``batch + batch`` step from ``bench/train_step.py``.

    Takes the smallest measured batch of ``cached`` and ``online`` and scales by
    ``batch / measured`` (FLOPs are linear in batch).

    Raises:
        FileNotFoundError / ValueError: no file, or no ``cached`` / ``online`` run in it.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; measure the FLOPs first: {TRAIN_STEP_CMD}")
    runs = json.loads(path.read_text()).get("runs", [])
    out: dict[str, float] = {}
    for config in ("cached", "online"):
        found = [r for r in runs if r.get("config") == config and r.get("flops")]
        if not found:
            raise ValueError(f"{path} has no '{config}' run with FLOPs; rerun: {TRAIN_STEP_CMD}")
        run = min(found, key=lambda r: r["batch"])
        out[config] = run["flops"] * batch / run["batch"]
        out[f"{config}_measured_batch"] = run["batch"]
    out["teachers"] = out["online"] - out["cached"]
    return out


# ---------------------------------------------------------------------------- bytes (layout)


def parse_codec(text: str) -> FeatureCodec:
    """``fp16``, ``int8``, ``pca-K``, ``pca-int8-K`` or another registered name (no parameters).

    Raises:
        ValueError: not one of those (the message names ``--codecs``).
    """
    try:
        for prefix in ("pca-int8-", "pca-"):  # longest first: "pca-int8-64" is not pca k="int8-64"
            if text.startswith(prefix):
                return get_codec({"name": prefix[:-1], "k": int(text[len(prefix) :])})
        return get_codec(text)
    except (ValueError, CodecError) as err:
        raise ValueError(
            f"--codecs: bad codec {text!r} ({err}); use fp16, int8, pca-K or pca-int8-K"
        ) from err


def level_read_bytes(
    spec: TeacherSpec, level: LevelSpec, codec: FeatureCodec, tile: int = TILE
) -> int:
    """Bytes of one read of one level of one tile: grid^2 tokens x stored values + aux."""
    geom = LevelGeometry.from_specs(tile, DEFAULT_CROP, level, spec)
    values = geom.grid**2 * codec.stored_channels(spec.channels)
    aux = codec.aux_shape(spec.channels)
    aux_bytes = int(np.prod(aux)) * 4 if aux is not None else 0  # aux arrays are float32
    return values * np.dtype(codec.stored_dtype).itemsize + aux_bytes


def tile_bytes(specs: Mapping[str, TeacherSpec], cfg: CacheConfig, tile: int = TILE) -> int:
    """Stored bytes per tile over all teachers and levels (before any compression)."""
    codec = parse_codec(cfg.codec)
    return sum(level_read_bytes(s, lv, codec, tile) for s in specs.values() for lv in cfg.levels())


def simulate_reads(
    teachers: Sequence[str], cfg: CacheConfig, draws: int, seed: int = 0, tile: int = TILE
) -> list[tuple[Any, dict[str, tuple[LevelSpec, ...]]]]:
    """Per drawn view: ``(view, {teacher: distinct levels read})``, nearest first, then blended.

    Uses the trainer's own draw: ``WarpSource(...).draw`` with the official view rule and the
    scale blend of ``cfg``.
    """
    from featviews.sources import SourceContext, ViewSampling, WarpSource

    sampling = ViewSampling(tile, DEFAULT_CROP, DEFAULT_CROP, scale_blend=cfg.blend)
    source = WarpSource(SourceContext(sampling, levels={t: cfg.levels() for t in teachers}))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        view = source.draw(rng)
        reads = {}
        for t in teachers:
            mixed = [lv for lv, _ in view.blend.get(t, ())]
            reads[t] = tuple(dict.fromkeys([view.levels[t], *mixed]))  # distinct, order kept
        out.append((view, reads))
    return out


def read_stats(
    specs: Mapping[str, TeacherSpec],
    cfg: CacheConfig,
    draws: int,
    seed: int = 0,
    tile: int = TILE,
) -> dict[str, Any]:
    """Levels per item and bytes per item / per step of ``cfg``, from simulated draws."""
    codec = parse_codec(cfg.codec)
    sizes = {
        (t, lv): level_read_bytes(s, lv, codec, tile)
        for t, s in specs.items()
        for lv in cfg.levels()
    }
    reads = [r for _, r in simulate_reads(list(specs), cfg, draws, seed, tile)]
    per_item = np.array([sum(sizes[(t, lv)] for t, lvs in r.items() for lv in lvs) for r in reads])
    n_steps = draws // ITEMS_PER_STEP
    per_step = per_item[: n_steps * ITEMS_PER_STEP].reshape(n_steps, ITEMS_PER_STEP).sum(1)
    levels = {t: np.array([len(r[t]) for r in reads]) for t in specs}
    return {
        "levels_per_item": {t: float(v.mean()) for t, v in levels.items()},
        "levels_hist": {t: np.bincount(v).tolist() for t, v in levels.items()},
        "bytes_per_item": float(per_item.mean()),
        "bytes_per_step": float(per_item.mean() * ITEMS_PER_STEP),
        "bytes_per_step_p5_p95": np.percentile(per_step, [5, 95]).tolist() if n_steps else None,
        "tile_bytes": tile_bytes(specs, cfg, tile),
    }


# ---------------------------------------------------------------------------- report


def teacher_specs() -> dict[str, TeacherSpec]:
    """The real-size specs of the paper's teachers (random init: weights do not matter here)."""
    from pipelines.teachers import create_teacher

    return {
        t: create_teacher(t, tiny=False, random_weights=True, base_size=DEFAULT_CROP).spec
        for t in TEACHERS
    }


def _named_floats(items: Sequence[str] | None, default: Sequence[tuple[str, float]], opt: str):
    if not items:
        return list(default)
    out = []
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not name or not number > 0:
            raise SystemExit(f"{opt}: bad value {item!r}; write {opt} NAME=NUMBER (a number > 0)")
        out.append((name, number))
    return out


def summary_table(results, flops, gpus, storage) -> str:
    """Per configuration: bytes, levels, and the break-even TFLOP/s per storage class."""
    rows = []
    for r in results:
        cells = []
        for sname, _ in storage:
            be = r["break_even"][sname]
            wins = first_class_above(be["overlap"], gpus)
            cells.append(f"{be['overlap']:.0f} ({be['no_overlap']:.0f}): {wins}")
        lv = r["reads"]["levels_per_item"]
        rows.append(
            [
                r["config"]["name"],
                f"{r['reads']['tile_bytes'] / C.MIB:.1f}",
                " / ".join(f"{lv[t]:.2f}" for t in TEACHERS),
                f"{r['reads']['bytes_per_step'] / 1e6:.1f}",
                *cells,
            ]
        )
    header = [
        "configuration",
        "MiB / tile",
        "levels / item (DINOv2 / CLIP)",
        "MB / step",
        *(f"P* at {name} ({w:g} GB/s)" for name, w in storage),
    ]
    return C.markdown_table(header, rows)


def step_table(r, flops, gpus, storage) -> str:
    """Step time (ms) online vs cached (no-overlap bound in brackets) per GPU x storage."""
    rows = [["online"] + [f"{flops['online'] / (p * 1e12) * 1e3:.1f}" for _, p in gpus]]
    for sname, w in storage:
        cells = []
        for _, p in gpus:
            t = step_times_s(flops["cached"], flops["online"], r["reads"]["bytes_per_step"], p, w)
            mark = "**" if t["cached"] < t["online"] else ""
            cells.append(f"{mark}{t['cached'] * 1e3:.1f}{mark} ({t['cached_sum'] * 1e3:.1f})")
        rows.append([f"cached, {sname} ({w:g} GB/s)"] + cells)
    return C.markdown_table(["step ms", *(f"{n} {p:g} TFLOP/s" for n, p in gpus)], rows)


def _style(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Colour by layout, line style by codec, so 12 configurations stay readable."""
    layouts = [name for name, _, _ in LAYOUTS]
    layout = cfg["name"].split(",")[0]
    colour = f"C{layouts.index(layout)}" if layout in layouts else "C9"
    dash = {"fp16": "-", "int8": "--", "pca-64": ":"}.get(cfg["codec"], "-.")
    return {"color": colour, "ls": dash, "lw": 1.4}


def plot(results, flops, gpus, storage, path: Path) -> Path:
    """Step time vs TFLOP/s: online and one line per (configuration, storage); a panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = np.logspace(1, np.log10(2000), 200)
    cols = min(2, len(storage))
    rows = -(-len(storage) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.5 * cols, 4.8 * rows), sharey=True, squeeze=False
    )
    for ax, (sname, w) in zip(axes.flat, storage, strict=False):
        ax.plot(p, flops["online"] / (p * 1e12) * 1e3, "k-", lw=2.8, label="online (recompute)")
        for r in results:
            b = r["reads"]["bytes_per_step"]
            cached = np.maximum(flops["cached"] / (p * 1e12), b / (w * 1e9)) * 1e3
            ax.plot(p, cached, label=f"cached: {r['config']['name']}", **_style(r["config"]))
        for name, g in gpus:
            ax.axvline(g, color="grey", ls=":", lw=0.8)
            ax.text(
                g,
                0.97,
                name,
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                transform=ax.get_xaxis_transform(),
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="GPU throughput (TFLOP/s)",
            title=f"storage: {sname} ({w:g} GB/s)",
        )
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(storage) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("8+8 step time (ms)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        "Paper setup, 8+8 step: online teachers vs cached targets (reads overlap compute)\n"
        "colour = levels read; solid fp16, dashed int8, dotted pca-64, dash-dot pca-int8-64"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=5000, help="simulated views per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--codecs", default=",".join(CODECS), help="comma list: fp16,int8,pca-K,pca-int8-K"
    )
    ap.add_argument("--gpu", action="append", metavar="NAME=TFLOPS", help="replaces the classes")
    ap.add_argument("--storage", action="append", metavar="NAME=GBPS", help="replaces the classes")
    ap.add_argument("--train-step-json", type=Path, default=TRAIN_STEP_JSON)
    args = ap.parse_args(argv)
    if args.draws < ITEMS_PER_STEP:
        raise SystemExit(f"--draws must be >= {ITEMS_PER_STEP} (one step), got {args.draws}")
    gpus = _named_floats(args.gpu, GPU_CLASSES, "--gpu")
    storage = _named_floats(args.storage, STORAGE_CLASSES, "--storage")
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    try:
        for c in codecs:
            parse_codec(c)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    flops = step_flops(args.train_step_json)
    specs = teacher_specs()
    results = []
    for cfg in default_configs(codecs):
        reads = read_stats(specs, cfg, args.draws, args.seed)
        b = reads["bytes_per_step"]
        results.append(
            {
                "config": cfg.__dict__ | {"levels": [lv.key for lv in cfg.levels()]},
                "reads": reads,
                "break_even": {
                    s: break_even_tflops(flops["cached"], flops["online"], b, w) for s, w in storage
                },
                "step_ms": {
                    f"{g} / {s}": {
                        k: v * 1e3
                        for k, v in step_times_s(flops["cached"], flops["online"], b, p, w).items()
                    }
                    for g, p in gpus
                    for s, w in storage
                },
            }
        )
    md = [
        f"FLOPs per 8+8 step: student {flops['cached'] / 1e12:.2f} TFLOP, teachers "
        f"{flops['teachers'] / 1e12:.2f} TFLOP, online {flops['online'] / 1e12:.2f} TFLOP.",
        "",
        summary_table(results, flops, gpus, storage),
    ]
    for r in results:
        md += ["", f"**{r['config']['name']}**", "", step_table(r, flops, gpus, storage)]
    text = "\n".join(md)
    print(text)
    png = plot(results, flops, gpus, storage, C.OUT_DIR / "break_even.png")
    payload = {
        "flops": flops,
        "flops_source": str(args.train_step_json),
        "items_per_step": ITEMS_PER_STEP,
        "gpu_classes_tflops": dict(gpus),
        "storage_classes_gbps": dict(storage),
        "teachers": {t: s.to_dict() for t, s in specs.items()},
        "draws": args.draws,
        "results": results,
        "markdown": text,
    }
    path = C.write_json("break_even", payload)
    print(f"\nwrote {path} and {png}")
    return payload


if __name__ == "__main__":
    main()
