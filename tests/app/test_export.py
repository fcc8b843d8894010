"""`featcache export` / `predict` / `evaluate` outputs: the export, the palette, the legend, JSON.

One tiny one-iteration run serves every test; the checks compare against values written out by
hand (colours, names, keys) or against the checkpoint itself read by torch (the export must
predict bit for bit like it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from featcache.cli import main
from featstore import open_store
from tests.helpers import DINO, build_store, tiny_config
from trainer.checkpoint import load_student, read_checkpoint, save_checkpoint
from trainer.config import TeacherConfig
from trainer.engine import train

NAMES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
# A palette unlike the default one, so the test tells "from the checkpoint" from "fallback".
COLOURS = [
    [10, 20, 30],
    [40, 50, 60],
    [70, 80, 90],
    [100, 110, 120],
    [130, 140, 150],
    [160, 170, 180],
    [190, 200, 210],
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("export")
    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    train(tiny_config(root, url, ids, [TeacherConfig(DINO, "full")], iters=1))
    ckpt = root / "run" / "latest.pt"
    coloured = root / "coloured.pt"
    state = {k: v for k, v in read_checkpoint(ckpt).items() if k != "format"}
    # "plain": no palette anywhere (the store schema may carry one); "coloured": a known one
    state.pop("class_colors", None)
    state["store"]["schema"].pop("class_colors", None)
    plain = root / "plain.pt"
    save_checkpoint(plain, state)
    # training records the store schema in the checkpoint: that is where the palette travels
    schema = {**state["store"]["schema"], "class_colors": COLOURS}
    save_checkpoint(coloured, {**state, "store": {**state["store"], "schema": schema}})
    return {
        "ckpt": ckpt,
        "coloured": coloured,
        "plain": plain,
        "store": url,
        "images": root / "syn" / "images",
    }


def _cli(*args: object) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {
        p.name: np.asarray(Image.open(p))
        for p in sorted(folder.glob("*.png"))
        if p.stem != "legend"
    }


def test_export_predicts_bit_for_bit(run: dict, tmp_path: Path) -> None:
    model_file = tmp_path / "model.safetensors"
    _cli("export", run["coloured"], model_file)
    _cli("predict", run["coloured"], run["images"], "--out", tmp_path / "a", "--no-progress")
    _cli("predict", model_file, run["images"], "--out", tmp_path / "b", "--no-progress")
    a, b = _masks(tmp_path / "a"), _masks(tmp_path / "b")
    assert len(a) == 6 and a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    for name in ("legend.json", "legend.png"):  # names and colours travel with the export
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # the logits themselves, not only their argmax, are identical
    m1, _ = load_student(run["coloured"], "student")  # the export's default: best_model
    m2, _ = load_student(model_file, "student")
    x = torch.rand(1, 3, 70, 70)
    with torch.no_grad():
        assert torch.equal(m1(x).logits, m2(x).logits)


def test_default_weights_are_the_runs_best_model(run: dict, tmp_path: Path) -> None:
    """Without --use, predict and export take the weights best.pt was chosen on."""
    ckpt = read_checkpoint(run["ckpt"])
    state = {k: v for k, v in ckpt.items() if k != "format"}
    # make the two sets tell apart (after one step the EMA equals the student)
    state["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["ema"].items()}
    for best in ("student", "ema"):
        state["config"]["eval"]["best_model"] = best
        path = tmp_path / f"{best}.pt"
        save_checkpoint(path, state)
        model, got = load_student(path)
        assert got["weights_used"] == best
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[best][k]), (best, k)
        exported = tmp_path / f"{best}.safetensors"
        _cli("export", path, exported)
        model, got = load_student(exported)
        assert got["export"]["use"] == got["weights_used"] == best
        assert all(torch.equal(v, state[best][k]) for k, v in model.state_dict().items())


def test_export_keeps_only_what_predict_needs(run: dict, tmp_path: Path) -> None:
    from safetensors import safe_open

    model_file = tmp_path / "m.safetensors"
    out = _cli("export", run["ckpt"], model_file, "--use", "student")
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    with safe_open(str(model_file), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        for k in keys:
            assert torch.equal(f.get_tensor(k), ckpt["student"][k]), k
    assert keys == set(ckpt["student"])  # no optimizer, no EMA copy, no teacher
    assert meta["use"] == "student" and int(meta["crop_size"]) == 70
    assert json.loads(meta["student_config"]) == ckpt["student_config"]
    assert json.loads(meta["class_names"]) == list(NAMES)
    # size: the float32 weights plus a small header, far below the checkpoint
    weights = sum(v.numel() * v.element_size() for v in ckpt["student"].values())
    size = model_file.stat().st_size
    assert weights <= size < weights + 64 * 1024
    assert size * 3 < run["ckpt"].stat().st_size
    assert "smaller" in out


def test_export_holds_one_weight_set(run: dict, tmp_path: Path) -> None:
    model_file = tmp_path / "m.safetensors"
    _cli("export", run["ckpt"], model_file, "--use", "student")
    args = ["predict", str(model_file), str(run["images"]), "--out", str(tmp_path / "p")]
    res = CliRunner().invoke(main, [*args, "--use", "ema"])
    assert res.exit_code == 1
    assert "holds the student weights only; pass --use student" in res.output
    _cli(*args, "--no-progress")  # without --use: the set the export holds
    res = CliRunner().invoke(main, ["export", str(run["ckpt"]), str(tmp_path / "m.pt")])
    assert res.exit_code == 1 and "must end in .safetensors" in res.output


def test_predict_uses_the_checkpoint_palette_and_writes_a_legend(run: dict, tmp_path: Path) -> None:
    _cli("predict", run["coloured"], run["images"], "--out", tmp_path, "--no-progress")
    legend = json.loads((tmp_path / "legend.json").read_text())
    assert legend == {
        "classes": [
            {"id": i, "name": n, "color": c}
            for i, (n, c) in enumerate(zip(NAMES, COLOURS, strict=True))
        ]
    }
    mask = Image.open(next(p for p in sorted(tmp_path.glob("*.png")) if p.stem != "legend"))
    assert mask.mode == "P"
    pal = mask.getpalette()
    assert [pal[3 * i : 3 * i + 3] for i in range(7)] == COLOURS
    swatches = {
        tuple(c)
        for c in np.asarray(Image.open(tmp_path / "legend.png").convert("RGB"))
        .reshape(-1, 3)
        .tolist()
    }
    assert {tuple(c) for c in COLOURS} <= swatches


def test_predict_falls_back_to_the_default_palette(run: dict, tmp_path: Path) -> None:
    _cli("predict", run["plain"], run["images"], "--out", tmp_path, "--no-progress")
    legend = json.loads((tmp_path / "legend.json").read_text())["classes"]
    assert [r["name"] for r in legend] == list(NAMES)
    # the Pascal VOC colour map (mmseg's / torchvision's default), written out by hand
    assert [r["color"] for r in legend] == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 0, 128],
        [128, 0, 128],
        [0, 128, 128],
    ]


def test_evaluate_writes_strict_json_with_class_names(run: dict, tmp_path: Path) -> None:
    out = _cli(
        "evaluate",
        run["ckpt"],
        "--store",
        run["store"],
        "--use",
        "ema",
        "--no-progress",
        "--out",
        tmp_path / "m.json",
    )

    def no_nan(token: str) -> None:
        raise AssertionError(f"bare {token} in the evaluate JSON")

    doc = json.loads(out, parse_constant=no_nan)
    assert doc == json.loads((tmp_path / "m.json").read_text(), parse_constant=no_nan)
    assert doc["class_names"] == list(NAMES) and set(doc) == {"class_names", "protocol", "ema"}
    assert list(doc["ema"]["iou"]) == list(NAMES)
    assert doc["ema"]["pixels"] == 2 * 64 * 64


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_progress_bar_is_shown_and_can_be_turned_off(
    run: dict, tmp_path: Path, command: str
) -> None:
    args = {
        "predict": [run["ckpt"], run["images"], "--out", tmp_path],
        "evaluate": [run["ckpt"], "--store", run["store"], "--use", "ema"],
    }[command]
    shown = CliRunner().invoke(main, [command, *map(str, args)])
    hidden = CliRunner().invoke(main, [command, *map(str, args), "--no-progress"])
    assert shown.exit_code == 0 and hidden.exit_code == 0, shown.output + hidden.output
    assert f"{command}: " in shown.output  # the tqdm bar's description
    assert f"{command}: " not in hidden.output


def test_evaluate_accepts_an_export(run: dict, tmp_path: Path) -> None:
    model_file = tmp_path / "m.safetensors"
    _cli("export", run["ckpt"], model_file, "--use", "ema")
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(model_file),
            "--store",
            str(run["store"]),
            "--use",
            "ema",
            "--no-progress",
        ],
    )
    assert res.exit_code == 2 and "records no val split; pass --split NAME" in res.output
    args = ["--store", run["store"], "--use", "ema", "--split", "train", "--no-progress"]
    assert json.loads(_cli("evaluate", model_file, *args)) == json.loads(
        _cli("evaluate", run["ckpt"], *args)
    )
