"""The real CLI: train -> evaluate -> predict on a tiny synthetic store, and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from featcache.cli import main
from featcache.cli_train import build_config, parse_batch
from featstore import open_store
from tests.helpers import DINO, build_store, tiny_run_args, write_ids


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    write_ids(root / "l.txt", ids[:2])
    write_ids(root / "u.txt", ids[2:4])
    write_ids(root / "v.txt", ids[4:])
    return url, root


def _train_args(url: str, root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--store",
        url,
        "--teacher",
        DINO,
        *tiny_run_args(root),
        "--iters",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_train_evaluate_predict(store: tuple[str, Path], tmp_path: Path) -> None:
    url, root = store
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(main, _train_args(url, root, out, "--eval-interval", "2"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["step"] == 2
    assert (out / "config.yaml").is_file() and (out / "best.pt").is_file()
    res = runner.invoke(
        main, ["evaluate", str(out / "latest.pt"), "--store", url, "--no-progress"]
    )  # the bar would mix into the JSON here
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert set(metrics) == {"class_names", "protocol", "student", "ema"}
    assert metrics["ema"]["pixels"] == 2 * 64 * 64
    saved = torch.load(out / "latest.pt", map_location="cpu", weights_only=True)["metrics"]
    assert metrics["ema"]["miou"] == pytest.approx(saved["ema"]["miou"])
    res = runner.invoke(
        main,
        [
            "predict",
            str(out / "latest.pt"),
            str(root / "syn" / "images"),
            "--out",
            str(tmp_path / "pred"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*.png"))) == 6 + 1  # + legend.png
    # resume from the YAML the run wrote: continues from step 2 to 3
    res = runner.invoke(
        main, ["train", "--config", str(out / "config.yaml"), "--iters", "3", "--resume", "auto"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["step"] == 3


def test_user_errors_are_messages_not_tracebacks(store: tuple[str, Path], tmp_path: Path) -> None:
    url, root = store
    runner = CliRunner()
    res = runner.invoke(main, _train_args(url, root, tmp_path / "r", "--num-classes", "3"))
    expected = "--num-classes 3 (model.num_classes) but the data has 7 classes"
    assert res.exit_code == 1 and expected in res.output
    res = runner.invoke(main, _train_args(url, root, tmp_path / "r", "--crop", "64"))
    assert res.exit_code == 1 and "multiple of 14" in res.output
    res = runner.invoke(main, ["predict", str(tmp_path / "none.pt"), "x", "--out", "o"])
    assert res.exit_code == 2  # click: the checkpoint path does not exist
    with pytest.raises(Exception, match="LABELED\\+UNLABELED"):
        parse_batch("a+b")


def test_options_map_onto_the_config() -> None:
    cfg = build_config(
        {
            "store": "s.zarr",
            "teacher": ("dinov2_vitb14@full", "clip_vitl14"),
            "batch": "4+6",
            "bf16": True,
            "grad_ckpt": True,
            "crop": 70,
            "masked": False,
        }
    )
    # no @branch: left to the teacher's spec when the run starts (test_cli_train_defaults.py)
    assert [(t.name, t.branch) for t in cfg.model.teachers] == [
        ("dinov2_vitb14", "full"),
        ("clip_vitl14", None),
    ]
    assert (cfg.schedule.batch_labeled, cfg.schedule.batch_unlabeled) == (4, 6)
    assert cfg.runtime.bf16 and cfg.runtime.grad_checkpointing and not cfg.distill.masked
    assert cfg.crop_size == 70 and cfg.data.store == "s.zarr"
    assert cfg.distill.scale_blend == 0.25  # the default mixes neighbouring levels
    assert build_config({"store": "s.zarr", "scale_blend": 0.0}).distill.scale_blend == 0.0
    with pytest.raises(Exception, match="--scale-blend"):
        build_config({"store": "s.zarr", "scale_blend": -1.0})
