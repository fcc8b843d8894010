"""The one-command demo (quick mode through the real CLI) and its report helpers."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.demo import QUICK, PeakMemory
from featcache.report import markdown_table, pca_rgb

PNGS = ("loss_curves.png", "miou_curves.png", "pca_features.png", "predictions.png",
        "cost_bars.png")
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
    for needle in ("| cached |", "| online |", "train time (s)", "peak memory (train) (MiB)",
                   "Store size per teacher", "Teacher passes per tile"):
        assert needle in summary
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


def test_runs_are_paired_and_costs_consistent(demo_out: Path) -> None:
    cached, online = _log(demo_out / "runs" / "cached"), _log(demo_out / "runs" / "online")
    assert cached["step"] == online["step"] == [float(i) for i in range(1, QUICK.iters + 1)]
    # same student init and the same labeled views: the first supervised loss is identical
    assert cached["loss_x"][0] == pytest.approx(online["loss_x"][0], rel=1e-5)
    # the distillation targets differ (cache approximations), so the runs are not copies
    assert cached["distill"][0] != pytest.approx(online["distill"][0], rel=1e-6)
    data = json.loads((demo_out / "report" / "summary.json").read_text())
    costs = data["costs"]
    n_train = sum(len((demo_out / "splits" / f"{k}.txt").read_text().split())
                  for k in ("labeled", "unlabeled"))
    n_teachers = len(data["flops_gflop_per_image"])
    assert costs["teacher passes"]["online"] == QUICK.iters * 2 * QUICK.batch * n_teachers
    n_levels = len(QUICK.scales) * 2  # every scale plus its flipped copy
    n_tiles = n_train + QUICK.n_val
    assert costs["teacher passes"]["cached"] == n_tiles * n_levels * n_teachers
    assert costs["train time"]["cached"] > 0 and costs["peak memory (train)"]["online"] > 0


def test_store_size_matches_disk(demo_out: Path) -> None:
    from featcache.report import teacher_bytes

    dirs = [d for d in (demo_out / "store.zarr" / "teachers").iterdir() if d.is_dir()]
    assert len(dirs) == 2
    for teacher_dir in dirs:
        walked = sum(f.stat().st_size for f in teacher_dir.rglob("*") if f.is_file())
        assert teacher_bytes(str(demo_out / "store.zarr"), teacher_dir.name) == walked


def test_peak_memory_sees_an_allocation() -> None:
    import torch

    with PeakMemory(torch.device("cpu")) as mem:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, touched
        time.sleep(0.1)
        del block
    assert mem.peak >= 30 * 2**20
    assert mem.peak_abs >= mem.peak


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
    assert md.splitlines() == ["| name | value |", "|---|---:|", "| a\\|b | 1.5 |",
                               "| c | – |"]


def test_cli_lists_both_commands() -> None:
    from featcache.cli import main

    res = CliRunner().invoke(main, ["--help"])
    assert "audit" in res.output and "demo" in res.output
