"""Report building blocks: markdown tables and the demo's matplotlib figures (Agg backend).

matplotlib is imported inside the plotting functions, so the audit (which only needs the
markdown helpers) and ``featcache --help`` stay light.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CACHED_COLOUR = "#1f77b4"
ONLINE_COLOUR = "#d62728"
PLAIN_COLOUR = "#7f7f7f"
MODE_COLOURS = {"cached": CACHED_COLOUR, "online": ONLINE_COLOUR, "no-distill": PLAIN_COLOUR}


def fmt_cosine(x: float) -> str:
    """Four decimals, or an en dash for NaN (no sample in that bin)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    aligns = [
        "---:" if rows and all(_numeric(r[k]) for r in rows) else "---" for k in range(len(headers))
    ]
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _numeric(v: Any) -> bool:
    if isinstance(v, (int, float)):
        return True
    try:
        float(str(v).rstrip("x%s"))
    except ValueError:
        return str(v) == "–"
    return True


def human_bytes(n: float) -> str:
    """``1.2 MiB`` style size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ----------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _draw_curves(
    ax: Any, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], smooth: int
) -> None:
    for label, (x, y) in curves.items():
        colour = MODE_COLOURS.get(label.split()[0])
        style = "--" if label.endswith("student") else "-"
        x_arr, y_arr = np.asarray(x, float), np.asarray(y, float)
        if smooth > 1 and len(y_arr) >= smooth:
            ax.plot(x_arr, y_arr, color=colour, alpha=0.25, lw=0.8)
            kernel = np.ones(smooth) / smooth
            ax.plot(
                x_arr[smooth - 1 :],
                np.convolve(y_arr, kernel, "valid"),
                style,
                color=colour,
                lw=1.8,
                label=f"{label} (mean of {smooth})",
            )
        else:
            ax.plot(
                x_arr,
                y_arr,
                style,
                color=colour,
                lw=1.8,
                label=label,
                marker="o" if len(x_arr) < 30 else None,
            )


def plot_panels(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: Path,
    title: str,
    smooth: int = 1,
    refs: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """One axis per panel of ``{label: (x, y)}`` curves against the iteration.

    ``smooth`` > 1 draws the raw points faintly and a running mean over them. ``refs``:
    ``{panel: {label: y}}`` horizontal reference lines (e.g. the majority-class baseline).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items(), strict=True):
        _draw_curves(ax, curves, smooth)
        for label, y in (refs or {}).get(name, {}).items():
            ax.axhline(y, color="black", ls=":", lw=1.2, label=label)
        ax.set_xlabel("iteration")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if len(curves) > 4:  # a long legend goes under the axis, off the curves
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
        elif curves:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_cost_bars(
    costs: Mapping[str, Mapping[str, float]], units: Mapping[str, str], path: Path, title: str
) -> Path:
    """One panel per cost (``{cost: {mode: value}}``): a bar per mode, with its value."""
    plt = _pyplot()
    names = list(costs)
    ncol = min(4, -(-len(names) // 2))  # two rows at most for up to 8 costs
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        modes = list(costs[name])
        vals = [float(costs[name][m]) for m in modes]
        bars = ax.bar(modes, vals, color=[MODE_COLOURS.get(m, "grey") for m in modes])
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(
                f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}",
                (bar.get_x() + bar.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(f"{name}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylabel(units.get(name, ""))
        ax.set_ylim(0, max(vals + [1e-9]) * 1.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """False colour ``[g, g, 3]`` in [0, 1]: the first three principal components of the tokens.

    Each component is stretched between its 2nd and 98th percentiles so one outlier token does
    not wash out the picture.
    """
    g1, g2, c = features.shape
    x = features.reshape(-1, c).astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = np.percentile(comps, 2, axis=0), np.percentile(comps, 98, axis=0)
    rgb = np.clip((comps - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return rgb.reshape(g1, g2, 3)


def plot_pca(image: np.ndarray, features: Mapping[str, np.ndarray], path: Path, title: str) -> Path:
    """The tile beside a PCA false-colour image of each teacher's cached ``s1.00`` tokens."""
    plt = _pyplot()
    n = 1 + len(features)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.3))
    axes[0].imshow(image)
    axes[0].set_title("tile", fontsize=9)
    for ax, (name, feat) in zip(axes[1:], features.items(), strict=True):
        ax.imshow(pca_rgb(feat), interpolation="nearest")
        ax.set_title(
            f"{name}\n{feat.shape[0]}x{feat.shape[1]} tokens, C={feat.shape[2]}", fontsize=8
        )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # leave the suptitle its own band
    return _save(fig, path)


def label_palette(k: int) -> np.ndarray:
    """``[k + 1, 3]`` uint8 colours; the last entry (ignore) is black."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    cols = [np.asarray(cmap(i % cmap.N)[:3]) * 255 for i in range(k)]
    return np.asarray(cols + [np.zeros(3)], dtype=np.uint8)


def colour_mask(mask: np.ndarray, k: int, ignore: int) -> np.ndarray:
    """Label map ``[H, W]`` → RGB using ``label_palette`` (ignore → black)."""
    pal = label_palette(k)
    m = np.where((mask == ignore) | (mask >= k), k, mask)
    return pal[m]


def plot_predictions(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    preds: Mapping[str, Sequence[np.ndarray]],
    class_names: Sequence[str],
    ignore: int,
    path: Path,
    title: str,
) -> Path:
    """Rows of tiles: image, ground truth, then each model's prediction overlaid on the image."""
    plt = _pyplot()
    k = len(class_names)
    cols = 2 + len(preds)
    rows = len(images)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.6), squeeze=False)
    for r, (img, gt) in enumerate(zip(images, masks, strict=True)):
        panels = [("image", img), ("ground truth", colour_mask(gt, k, ignore))]
        for name, pr in preds.items():
            over = (0.45 * img + 0.55 * colour_mask(pr[r], k, ignore)).astype(np.uint8)
            panels.append((name, over))
        for c, (name, pic) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(pic, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    pal = label_palette(k)
    handles = [plt.Rectangle((0, 0), 1, 1, color=pal[i] / 255) for i in range(k)]
    fig.legend(
        handles, list(class_names), loc="lower center", ncol=min(k, 7), fontsize=8, frameon=False
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


# ----------------------------------------------------------------------------- demo report


def teacher_bytes(url: str, teacher: str) -> int:
    """Bytes on disk of one teacher's arrays (all levels, codec side data, statistics)."""
    from featstore.layout import store_fs

    fs, root = store_fs(url)
    path = f"{root}/teachers/{teacher}"
    return int(fs.du(path)) if fs.exists(path) else 0


def _metric(m: Mapping[str, Any], key: str = "miou", model: str = "ema") -> float:
    return float(m.get(model, {}).get(key, float("nan")))


def _curves(runs: Mapping[str, Any], key: str) -> dict[str, tuple[list[float], list[float]]]:
    return {mode: (r.log.get("step", []), r.log[key]) for mode, r in runs.items() if key in r.log}


def _figures(out: Path, store: Any, runs: Mapping[str, Any], info: Mapping[str, Any]) -> list[Path]:
    """Every PNG of the demo report."""
    s, base = info["settings"], info["baseline"]
    sch = store.schema
    smooth = max(1, min(8, s.iters // 6))
    distilled = {m: r for m, r in runs.items() if m != "no-distill"}
    figs = [
        plot_panels(
            {
                "total loss": _curves(runs, "loss"),
                "supervised CE (labeled views)": _curves(runs, "loss_x"),
                "distillation (mean over teachers)": _curves(distilled, "distill"),
            },
            out / "loss_curves.png",
            "training losses (no-distill has no distillation term)",
            smooth,
        )
    ]
    miou: dict[str, tuple[list[float], list[float]]] = {}
    oa: dict[str, tuple[list[float], list[float]]] = {}
    for mode, r in runs.items():
        steps = [e["step"] for e in r.evals]
        for model in ("ema", "student"):
            miou[f"{mode} {model}"] = (steps, [100 * _metric(e, "miou", model) for e in r.evals])
        oa[f"{mode} ema"] = (steps, [100 * _metric(e, "oa") for e in r.evals])
    major = sch.class_names[base["class"]]
    refs = {
        "validation mIoU (%)": {f"majority baseline ({major} everywhere)": 100 * base["miou"]},
        "validation OA (%), EMA": {f"majority baseline ({major} everywhere)": 100 * base["oa"]},
    }
    figs.append(
        plot_panels(
            {"validation mIoU (%)": miou, "validation OA (%), EMA": oa},
            out / "miou_curves.png",
            "validation metrics during training vs the majority-class baseline",
            1,
            refs,
        )
    )
    i = info["show"][0]
    weights = info.get("teacher_weights", {})
    feats = {
        f"{n} ({'pretrained' if weights.get(n) else 'tiny, random'})": store.read(n, i, "s1.00")
        for n in store.teacher_names
    }
    figs.append(
        plot_pca(
            store.read_image(i),
            feats,
            out / "pca_features.png",
            f"cached s1.00 tokens of tile {store.tiles[i].tile_id}: first 3 PCs",
        )
    )
    preds = {
        f"{m} (EMA)\nval mIoU {100 * _metric(r.final):.1f}%": r.predictions for m, r in runs.items()
    }
    figs.append(
        plot_predictions(
            [store.read_image(k) for k in info["show"]],
            [store.read_mask(k) for k in info["show"]],
            preds,
            sch.class_names,
            sch.ignore_index,
            out / "predictions.png",
            f"val tiles: EMA predictions vs ground truth (majority baseline "
            f"mIoU {100 * base['miou']:.1f}%)",
        )
    )
    figs.append(
        plot_cost_bars(
            cost_table(store, runs, info),
            COST_UNITS,
            out / "cost_bars.png",
            "cost of the distillation targets per run (no-distill: no teacher at all)",
        )
    )
    return figs


COST_UNITS = {
    "train time": "s",
    "train CPU time": "s",
    "train + extraction": "s",
    "peak memory (train)": "MiB",
    "peak memory of the process": "MiB",
    "teacher passes": "images",
    "teacher compute": "GFLOP",
}


def cost_table(
    store: Any, runs: Mapping[str, Any], info: Mapping[str, Any]
) -> dict[str, dict[str, float]]:
    """``{cost: {mode: value}}`` measured in this run.

    Only the cached run reads the extraction's features, so only it is charged the extraction
    (time, teacher passes and compute); the online run pays its teachers on every view.
    """
    n_tiles = int(store.done().sum())
    flops = info["flops"]
    ext_passes = n_tiles * sum(len(store.levels(n)) for n in store.teacher_names)
    ext_flops = n_tiles * sum(v for f in flops.values() for k, v in f.items() if k != "view")
    view_flops = sum(f["view"] for f in flops.values())
    mib = 2**20
    out: dict[str, dict[str, float]] = {k: {} for k in COST_UNITS}
    for mode, r in runs.items():
        cached = mode == "cached"
        out["train time"][mode] = r.seconds
        out["train CPU time"][mode] = r.cpu_seconds
        out["train + extraction"][mode] = r.seconds + (info["extract_seconds"] if cached else 0)
        out["peak memory (train)"][mode] = r.peak_bytes / mib
        out["peak memory of the process"][mode] = r.max_rss / mib
        out["teacher passes"][mode] = ext_passes if cached else r.teacher_passes * len(flops)
        out["teacher compute"][mode] = ext_flops if cached else r.teacher_passes * view_flops
    return out


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a > 0 else "–"


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}"


def miou_from_confusion(m: np.ndarray) -> float:
    """mIoU of a ``[K, K]`` matrix; classes absent from target and prediction left out."""
    m = np.asarray(m, np.float64)
    inter = np.diag(m)
    union = m.sum(0) + m.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


def bootstrap_gap(
    conf_a: np.ndarray, conf_b: np.ndarray, n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of mIoU(a) - mIoU(b) over val tiles resampled with replacement.

    ``conf_*``: ``[n_tiles, K, K]`` per-tile matrices of two models on the same tiles; both are
    resampled with the same draw (a paired bootstrap). It measures how much the gap depends on
    which val tiles were drawn, not the run-to-run noise of training.
    """
    rng = np.random.default_rng(seed)
    t = len(conf_a)
    gaps = []
    for _ in range(n):
        pick = rng.integers(0, t, t)
        gaps.append(
            miou_from_confusion(conf_a[pick].sum(0)) - miou_from_confusion(conf_b[pick].sum(0))
        )
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    return float(lo), float(hi)


def _noise(runs: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """How far another seed moves the cached run, against the cached-online gap."""
    nr = info.get("noise_run")
    if nr is None:
        return ""
    c, o = runs["cached"].final, runs["online"].final
    gap = abs(_metric(c) - _metric(o))
    move = abs(_metric(c) - _metric(nr.final))
    verdict = "within" if gap <= move else "larger than"
    return (
        f"The same cached run from seed {info['seed'] + 1} (another init, other views) "
        f"ends at {_pct(_metric(nr.final))} %, {100 * move:.1f} points away: the "
        f"cached-online gap is {verdict} this seed-to-seed noise."
    )


def headline(runs: Mapping[str, Any], info: Mapping[str, Any]) -> list[str]:
    """The demo's four claims, each with the figures measured in this run."""
    base = info["baseline"]["miou"]
    c, o = runs["cached"], runs["online"]
    lines = [
        f"- **Training time** (wall): cached {c.seconds:.1f} s, online {o.seconds:.1f} s "
        f"(online / cached = {_ratio(c.seconds, o.seconds)})"
    ]
    if "no-distill" in runs:
        lines[-1] += f", no-distill {runs['no-distill'].seconds:.1f} s (the student alone)"
    lines[-1] += (
        f". CPU time, which other processes on the machine disturb least: cached "
        f"{c.cpu_seconds:.1f} s, online {o.cpu_seconds:.1f} s (online / cached = "
        f"{_ratio(c.cpu_seconds, o.cpu_seconds)})."
    )
    gap = _metric(c.final) - _metric(o.final)
    lo, hi = bootstrap_gap(c.tile_confusion, o.tile_confusion)
    lines.append(
        f"- **Cached vs online mIoU (EMA)**: {_pct(_metric(c.final))} vs "
        f"{_pct(_metric(o.final))} %, gap {100 * gap:+.1f} points. "
        + _noise(runs, info)
        + f" Resampling the {len(c.tile_confusion)} val tiles alone moves the gap "
        f"within [{100 * lo:+.1f}, {100 * hi:+.1f}] (95 %)."
    )
    per_run = ", ".join(
        f"{m} {_pct(_metric(r.final))} % = {_metric(r.final) / base:.1f}x" for m, r in runs.items()
    )
    lines.append(f"- **Against the majority-class baseline** (mIoU {_pct(base)} %): {per_run}.")
    best = max(_metric(r.final) for r in runs.values())
    if not best >= 2 * base:
        lines.append(
            "- **Not learned**: no run reaches twice the majority baseline, so these runs "
            "compare cost, not accuracy. Compare the val and labeled class shares below: the "
            f"student learns from {info['n_images']['labeled']} labeled image(s) only."
        )
    lines.append(
        f"- **Whole demo**: {info['total_seconds']:.0f} s on `{info['device']}` "
        f"({info['threads']} torch thread(s): {info.get('threads_why', '')}), report "
        "writing excluded."
    )
    return lines


def class_table(
    class_names: Sequence[str], counts: Sequence[int], labeled: Sequence[int] | None = None
) -> str:
    """Val pixels per class: count and share (ignored pixels excluded, as in the metric), and
    the share of each class in the labeled tiles when given (what the student learns from)."""
    total = max(sum(counts), 1)
    rows = [
        [name, int(n), f"{100 * n / total:.1f}"]
        for name, n in zip(class_names, counts, strict=True)
    ]
    headers = ["class", "val pixels", "val share (%)"]
    if labeled is not None:
        lab_total = max(sum(labeled), 1)
        for row, n in zip(rows, labeled, strict=True):
            row.append(f"{100 * n / lab_total:.1f}")
        headers.append("labeled share (%)")
    return markdown_table(headers, rows)


def _metrics_table(runs: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    base = info["baseline"]
    rows = [
        [
            mode,
            _pct(_metric(r.final)),
            _pct(_metric(r.final, model="student")),
            f"{_metric(r.final) / base['miou']:.2f}x",
            _pct(_metric(r.final, "oa")),
            f"{r.log['loss'][-1]:.4f}" if r.log.get("loss") else "–",
        ]
        for mode, r in runs.items()
    ]
    rows.append(
        [
            "majority baseline",
            _pct(base["miou"]),
            _pct(base["miou"]),
            "1.00x",
            _pct(base["oa"]),
            "–",
        ]
    )
    return markdown_table(
        [
            "run",
            "mIoU EMA (%)",
            "mIoU student (%)",
            "EMA mIoU / baseline",
            "OA EMA (%)",
            "last total loss",
        ],
        rows,
    )


def _teacher_list(teachers: Sequence[str], weights: Mapping[str, str | None]) -> str:
    """Each teacher with where its weights come from (random tiny towers said so)."""

    def kind(t: str) -> str:
        w = weights.get(t)
        return (
            f"pretrained weights from `{Path(w).name}`"
            if w
            else "tiny, random weights: the real teacher's code path at toy width"
        )

    return "; ".join(f"`{t}` ({kind(t)})" for t in teachers)


def _intro(store: Any, info: Mapping[str, Any]) -> list[str]:
    s, sch = info["settings"], store.schema
    n_tiles = int(store.done().sum())
    teachers = list(store.teacher_names)
    img, til = info["n_images"], info["n_tiles"]
    split = ", ".join(
        f"{k} {img[k]} image(s) / {til[k]} tiles" for k in ("labeled", "unlabeled", "val")
    )
    return [
        "# featcache demo: cached vs online teacher targets, and no distillation",
        "",
        f"Data: {'`' + info['source'] + '`' if info['data_given'] else 'synthetic scenes'} "
        f"({n_tiles} tiles of {sch.tile_size} px, crop {s.crop} px, {len(sch.class_names)} "
        f"classes), split by whole source image: {split}. Teachers "
        f"{_teacher_list(teachers, info.get('teacher_weights', {}))}, cached at levels "
        f"{', '.join(lv.key for lv in store.levels(teachers[0]))}. Tiny student (random init), "
        f"{s.iters} iterations of {s.batch} labeled + {s.batch} unlabeled views, device "
        f"`{info['device']}` ({info['threads']} torch thread(s)), seed {info['seed']}. The three "
        "runs "
        "start from the same student weights and see the same views and CutMix boxes; cached "
        "and online use the same teacher weights. Each trains in a fresh process, one after "
        "the other. Phases: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in info.get("phases", {}).items())
        + ".",
        "",
    ]


def summary_markdown(
    store: Any, runs: Mapping[str, Any], info: Mapping[str, Any], figures: Sequence[Path]
) -> str:
    """The demo's ``summary.md``."""
    sch = store.schema
    n_tiles = int(store.done().sum())
    teachers = list(store.teacher_names)
    base = info["baseline"]
    major = sch.class_names[base["class"]]
    costs = cost_table(store, runs, info)
    fmt = {
        "train time": "{:.1f}",
        "train CPU time": "{:.1f}",
        "train + extraction": "{:.1f}",
        "peak memory (train)": "{:.0f}",
        "peak memory of the process": "{:.0f}",
        "teacher passes": "{:.0f}",
        "teacher compute": "{:.2f}",
    }
    modes = list(runs)
    cost_rows = [
        [
            f"{k} ({COST_UNITS[k]})",
            *(fmt[k].format(v[m]) for m in modes),
            _ratio(v["cached"], v["online"]),
        ]
        for k, v in costs.items()
    ]
    n_train = max(int(info["n_train_tiles"]), 1)
    per_tile = [
        [t, len(store.levels(t)), f"{runs['online'].teacher_passes / n_train:.1f}"]
        for t in teachers
    ]
    per_iter = costs["teacher compute"]["online"] / max(info["settings"].iters, 1)
    even = costs["teacher compute"]["cached"] / per_iter if per_iter > 0 else float("nan")
    size_rows = []
    for t in teachers:
        nbytes = teacher_bytes(store.url, t)
        spec = sch.teacher(t).spec
        size_rows.append(
            [
                t,
                spec.channels,
                len(store.levels(t)),
                human_bytes(nbytes),
                human_bytes(nbytes / max(n_tiles, 1)),
            ]
        )
    load = float(info.get("load_per_core", 0.0))
    warn = (
        [
            f"**Note:** the machine was busy (load {load:.1f} per core at the end of the run), "
            "so the times below are disturbed by other processes.",
            "",
        ]
        if load > 1.2
        else []
    )
    body = [
        "## In short",
        "",
        *headline(runs, info),
        "",
        "## Segmentation (validation, final)",
        "",
        _metrics_table(runs, info),
        "",
        f"The majority baseline predicts the most frequent val class (**{major}**, "
        f"{_pct(base['oa'])} % of the val pixels) everywhere: its OA is that share, its mIoU "
        "that share divided by the number of classes present in the val masks (classes "
        "absent from them count nowhere, as in the metric). A model is only learning where it "
        "beats this row.",
        "",
        "### Val class distribution",
        "",
        class_table(sch.class_names, info["val_counts"], info.get("labeled_counts")),
        "",
        "## Cost, measured side by side in this run",
        "",
        *warn,
        markdown_table(["cost", *modes, "online / cached"], cost_rows),
        "",
        "Cached teacher passes and compute are the one-off extraction (every level of every "
        "tile); online ones are paid again by every training run: the extraction's teacher "
        f"compute equals {even:.0f} online iterations of this schedule. No-distill runs no "
        "teacher. Peak memory is the rise in process memory from building the trainer to the "
        "end of training (RSS on CPU, allocator peak on CUDA).",
        "",
        "## Teacher passes per tile",
        "",
        markdown_table(
            ["teacher", "cached (once: levels)", "online (this run, per training tile)"], per_tile
        ),
        "",
        "## Store size per teacher",
        "",
        markdown_table(["teacher", "channels", "levels", "on disk", "per tile"], size_rows),
        "",
        "## Figures",
        "",
        "The distillation losses of cached and online differ by construction: cached targets are "
        "resampled from the stored grids of the nearest scales, online ones are computed on each "
        "view; compare the runs by their validation metrics, not by this loss.",
        "",
    ]
    body += [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(_intro(store, info) + body) + "\n"


def write_report(out: Path, store: Any, runs: Mapping[str, Any], info: Mapping[str, Any]) -> Path:
    """Write the figures and ``summary.md`` (plus ``summary.json``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(out, store, runs, info)
    path = out / "summary.md"
    path.write_text(summary_markdown(store, runs, info, figures))
    sch = store.schema
    data = {
        "costs": cost_table(store, runs, info),
        "final": {m: r.final for m, r in runs.items()},
        "evals": {m: r.evals for m, r in runs.items()},
        "baseline": {**info["baseline"], "class_name": sch.class_names[info["baseline"]["class"]]},
        "val_class_pixels": dict(zip(sch.class_names, info["val_counts"], strict=True)),
        "labeled_class_pixels": dict(zip(sch.class_names, info["labeled_counts"], strict=True)),
        "splits": {"images": info["n_images"], "tiles": info["n_tiles"]},
        # the final EMA re-run on the val tiles by the demo (the bootstrap's input)
        "val_confusion_ema": {m: r.tile_confusion.sum(0).tolist() for m, r in runs.items()},
        "cached_minus_online_miou_95": bootstrap_gap(
            runs["cached"].tile_confusion, runs["online"].tile_confusion
        ),
        "cached_next_seed": {
            "seed": info["seed"] + 1,
            "final": info["noise_run"].final,
            "seconds": info["noise_run"].seconds,
        }
        if info.get("noise_run")
        else None,
        "extract_seconds": info["extract_seconds"],
        "total_seconds": info["total_seconds"],
        "phases": info.get("phases", {}),
        "flops_gflop_per_image": info["flops"],
    }
    (out / "summary.json").write_text(json.dumps(_strict(data), indent=2, allow_nan=False))
    return path


def _strict(obj: Any) -> Any:
    """JSON-ready copy: NaN/inf become null (strict JSON has no NaN), numpy scalars plain."""
    if isinstance(obj, Mapping):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


__all__ = [
    "colour_mask",
    "fmt_cosine",
    "human_bytes",
    "label_palette",
    "markdown_table",
    "pca_rgb",
    "plot_cost_bars",
    "plot_panels",
    "plot_pca",
    "plot_predictions",
]
