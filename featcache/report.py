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
MODE_COLOURS = {"cached": CACHED_COLOUR, "online": ONLINE_COLOUR}


def fmt_cosine(x: float) -> str:
    """Four decimals, or an en dash for NaN (no sample in that bin)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    aligns = ["---:" if rows and all(_numeric(r[k]) for r in rows) else "---"
              for k in range(len(headers))]
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


def _draw_curves(ax: Any, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 smooth: int) -> None:
    for label, (x, y) in curves.items():
        colour = MODE_COLOURS.get(label.split()[0])
        style = "--" if label.endswith("student") else "-"
        x_arr, y_arr = np.asarray(x, float), np.asarray(y, float)
        if smooth > 1 and len(y_arr) >= smooth:
            ax.plot(x_arr, y_arr, color=colour, alpha=0.25, lw=0.8)
            kernel = np.ones(smooth) / smooth
            ax.plot(x_arr[smooth - 1:], np.convolve(y_arr, kernel, "valid"), style,
                    color=colour, lw=1.8, label=f"{label} (mean of {smooth})")
        else:
            ax.plot(x_arr, y_arr, style, color=colour, lw=1.8, label=label,
                    marker="o" if len(x_arr) < 30 else None)


def plot_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                path: Path, title: str, smooth: int = 1) -> Path:
    """One axis per panel of ``{label: (x, y)}`` curves against the iteration.

    ``smooth`` > 1 draws the raw points faintly and a running mean over them.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items(), strict=True):
        _draw_curves(ax, curves, smooth)
        ax.set_xlabel("iteration")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_cost_bars(costs: Mapping[str, Mapping[str, float]], units: Mapping[str, str],
                   path: Path, title: str) -> Path:
    """One panel per cost (``{cost: {mode: value}}``), cached vs online bars with values."""
    plt = _pyplot()
    names = list(costs)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        modes = list(costs[name])
        vals = [float(costs[name][m]) for m in modes]
        bars = ax.bar(modes, vals, color=[MODE_COLOURS.get(m, "grey") for m in modes])
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(f"{name}", fontsize=9)
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


def plot_pca(image: np.ndarray, features: Mapping[str, np.ndarray], path: Path,
             title: str) -> Path:
    """The tile beside a PCA false-colour image of each teacher's cached ``s1.00`` tokens."""
    plt = _pyplot()
    n = 1 + len(features)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.3))
    axes[0].imshow(image)
    axes[0].set_title("tile", fontsize=9)
    for ax, (name, feat) in zip(axes[1:], features.items(), strict=True):
        ax.imshow(pca_rgb(feat), interpolation="nearest")
        ax.set_title(f"{name}\n{feat.shape[0]}x{feat.shape[1]} tokens, C={feat.shape[2]}",
                     fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
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


def plot_predictions(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     preds: Mapping[str, Sequence[np.ndarray]], class_names: Sequence[str],
                     ignore: int, path: Path, title: str) -> Path:
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
    fig.legend(handles, list(class_names), loc="lower center", ncol=min(k, 7), fontsize=8,
               frameon=False)
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


def _miou(m: Mapping[str, Any], model: str = "ema") -> float:
    return float(m.get(model, {}).get("miou", float("nan")))


def _curves(runs: Mapping[str, Any], key: str) -> dict[str, tuple[list[float], list[float]]]:
    return {mode: (r.log.get("step", []), r.log[key]) for mode, r in runs.items() if key in r.log}


def _figures(out: Path, store: Any, runs: Mapping[str, Any], info: Mapping[str, Any]) -> list[Path]:
    """Every PNG of the demo report."""
    s = info["settings"]
    smooth = max(1, min(8, s.iters // 6))
    figs = [plot_panels({"total loss": _curves(runs, "loss"),
                         "supervised CE (labeled views)": _curves(runs, "loss_x"),
                         "distillation (mean over teachers)": _curves(runs, "distill")},
                        out / "loss_curves.png", "training losses: cached vs online", smooth)]
    miou = {}
    for mode, r in runs.items():
        for model in ("ema", "student"):
            miou[f"{mode} {model}"] = ([e["step"] for e in r.evals],
                                       [100 * _miou(e, model) for e in r.evals])
    figs.append(plot_panels({"validation mIoU (%)": miou}, out / "miou_curves.png",
                            "validation mIoU during training", 1))
    i = info["show"][0]
    feats = {n: store.read(n, i, "s1.00") for n in store.teacher_names}
    figs.append(plot_pca(store.read_image(i), feats, out / "pca_features.png",
                         f"cached s1.00 tokens of tile {store.tiles[i].tile_id}: first 3 PCs"))
    sch = store.schema
    figs.append(plot_predictions([store.read_image(k) for k in info["show"]],
                                 [store.read_mask(k) for k in info["show"]],
                                 {f"{m} (EMA)": r.predictions for m, r in runs.items()},
                                 sch.class_names, sch.ignore_index, out / "predictions.png",
                                 "validation tiles: prediction overlays vs ground truth"))
    figs.append(plot_cost_bars(cost_table(store, runs, info), COST_UNITS, out / "cost_bars.png",
                               "cost of distillation targets: cached vs online"))
    return figs


COST_UNITS = {"train time": "s", "train + extraction": "s", "peak memory (train)": "MiB",
              "peak memory of the process": "MiB",
              "teacher passes": "images", "teacher compute": "GFLOP"}


def cost_table(store: Any, runs: Mapping[str, Any], info: Mapping[str, Any]
               ) -> dict[str, dict[str, float]]:
    """``{cost: {"cached": v, "online": v}}`` measured in this run."""
    c, o = runs["cached"], runs["online"]
    n_tiles = int(store.done().sum())
    flops = info["flops"]
    ext_passes = n_tiles * sum(len(store.levels(n)) for n in store.teacher_names)
    ext_flops = n_tiles * sum(v for f in flops.values() for k, v in f.items() if k != "view")
    online_flops = o.teacher_passes * sum(f["view"] for f in flops.values())
    n_teachers, mib = len(flops), 2**20
    return {"train time": {"cached": c.seconds, "online": o.seconds},
            "train + extraction": {"cached": c.seconds + info["extract_seconds"],
                                   "online": o.seconds},
            "peak memory (train)": {"cached": c.peak_bytes / mib, "online": o.peak_bytes / mib},
            "peak memory of the process": {"cached": c.max_rss / mib, "online": o.max_rss / mib},
            "teacher passes": {"cached": ext_passes, "online": o.teacher_passes * n_teachers},
            "teacher compute": {"cached": ext_flops, "online": online_flops}}


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a > 0 else "–"


def summary_markdown(store: Any, runs: Mapping[str, Any], info: Mapping[str, Any],
                     figures: Sequence[Path]) -> str:
    """The demo's ``summary.md``."""
    s, sch = info["settings"], store.schema
    n_tiles = int(store.done().sum())
    teachers = list(store.teacher_names)
    head = [
        "# featcache demo: cached vs online teacher targets", "",
        f"Data: {'`' + info['source'] + '`' if info['data_given'] else 'synthetic scenes'} "
        f"({n_tiles} tiles of {sch.tile_size} px, crop {s.crop} px, {len(sch.class_names)} "
        f"classes); teachers {', '.join(f'`{t}`' for t in teachers)} cached at levels "
        f"{', '.join(lv.key for lv in store.levels(teachers[0]))}. Tiny student, {s.iters} "
        f"iterations of {s.batch} labeled + {s.batch} unlabeled views, device "
        f"`{info['device']}` ({info['threads']} threads), seed {info['seed']}. Both runs start "
        "from the same student weights and use the same teacher weights, views and CutMix "
        f"boxes; total demo time {info['total_seconds']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in info.get("phases", {}).items()) + ").", "",
        "## Segmentation (validation, final)", ""]
    rows = [[mode, f"{100 * _miou(r.final, 'ema'):.2f}",
             f"{100 * _miou(r.final, 'student'):.2f}",
             f"{100 * float(r.final.get('ema', {}).get('oa', float('nan'))):.2f}",
             f"{r.log['loss'][-1]:.4f}" if r.log.get("loss") else "–"]
            for mode, r in runs.items()]
    metrics = markdown_table(["mode", "mIoU EMA (%)", "mIoU student (%)", "OA EMA (%)",
                              "last loss"], rows)
    costs = cost_table(store, runs, info)
    fmt = {"train time": "{:.1f}", "train + extraction": "{:.1f}", "peak memory (train)": "{:.0f}",
           "peak memory of the process": "{:.0f}",
           "teacher passes": "{:.0f}", "teacher compute": "{:.2f}"}
    cost_rows = [[f"{k} ({COST_UNITS[k]})", fmt[k].format(v["cached"]),
                  fmt[k].format(v["online"]), _ratio(v["cached"], v["online"])]
                 for k, v in costs.items()]
    n_train = max(int(info["n_train_tiles"]), 1)
    per_tile = [[t, len(store.levels(t)), f"{runs['online'].teacher_passes / n_train:.1f}"]
                for t in teachers]
    per_iter = costs["teacher compute"]["online"] / max(s.iters, 1)
    even = costs["teacher compute"]["cached"] / per_iter if per_iter > 0 else float("nan")
    size_rows = []
    for t in teachers:
        nbytes = teacher_bytes(store.url, t)
        spec = sch.teacher(t).spec
        size_rows.append([t, spec.channels, len(store.levels(t)), human_bytes(nbytes),
                          human_bytes(nbytes / max(n_tiles, 1))])
    load = float(info.get("load_per_core", 0.0))
    warn = ([f"**Note:** the machine was busy (load {load:.1f} per core at the end of the run), "
             "so the times below are disturbed by other processes.", ""] if load > 1.2 else [])
    body = [metrics, "", "## Cost, measured side by side in this run", "", *warn,
            markdown_table(["cost", "cached", "online", "online / cached"], cost_rows), "",
            "Cached teacher passes and compute are the one-off extraction (every level of every "
            "tile); online ones are paid again by every training run: the extraction's teacher "
            f"compute equals {even:.0f} online iterations of this schedule. Peak memory is the "
            "rise in process memory from building the trainer to the end of training (RSS on "
            "CPU, allocator peak on CUDA); each mode trains in a fresh process.", "",
            "## Teacher passes per tile", "",
            markdown_table(["teacher", "cached (once: levels)",
                            "online (this run, per training tile)"], per_tile),
            "", "## Store size per teacher", "",
            markdown_table(["teacher", "channels", "levels", "on disk", "per tile"], size_rows),
            "", "## Figures", ""]
    body += [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(head + body) + "\n"


def write_report(out: Path, store: Any, runs: Mapping[str, Any], info: Mapping[str, Any]) -> Path:
    """Write the figures and ``summary.md`` (plus ``summary.json``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(out, store, runs, info)
    path = out / "summary.md"
    path.write_text(summary_markdown(store, runs, info, figures))
    data = {"costs": cost_table(store, runs, info),
            "final": {m: r.final for m, r in runs.items()},
            "evals": {m: r.evals for m, r in runs.items()},
            "extract_seconds": info["extract_seconds"], "total_seconds": info["total_seconds"],
            "phases": info.get("phases", {}),
            "flops_gflop_per_image": info["flops"]}
    (out / "summary.json").write_text(json.dumps(data, indent=2, default=float))
    return path


__all__ = ["colour_mask", "fmt_cosine", "human_bytes", "label_palette", "markdown_table",
           "pca_rgb", "plot_cost_bars", "plot_panels", "plot_pca", "plot_predictions"]
