"""Evaluation protocols: every layout's test protocol, recorded in the store, reported twice.

The official RS-MTDF test scripts set the labels of some classes to ignore and drop those classes
from the means (rs-mtdf-reference §7): Potsdam class 0 (impervious surfaces; the paper's Table 1
lists the five others, clutter as "Background"), DeepGlobe class 6 (unknown); LoveDA keeps all 7.
Expected values here are counted by hand or by a pixel loop written out in the test, never by the
metric code itself.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featstore.protocols import Protocol
from featstore.schema import StoreSchema, fingerprint
from trainer.config import TrainConfigError
from trainer.evaluate import evaluate, metrics_json, parse_exclude, resolve_protocol
from trainer.logging_utils import RunLogger
from trainer.metrics import ConfusionMatrix

IGN = 255
TILE = 28  # a multiple of 14: "whole" evaluation runs the model at the tile size
ISPRS = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")

# rows = target, columns = prediction; class 0 plays Potsdam's impervious surfaces
HAND = np.array(
    [
        [5, 3, 0, 2],
        [1, 8, 1, 0],
        [0, 2, 6, 2],
        [4, 0, 0, 6],
    ]
)


def _pixels_of(matrix: np.ndarray, ignored: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Flat pred/target maps holding exactly ``matrix`` plus ``ignored`` target-255 pixels."""
    pred, target = [], []
    for t in range(matrix.shape[0]):
        for p in range(matrix.shape[1]):
            pred += [p] * int(matrix[t, p])
            target += [t] * int(matrix[t, p])
    pred += [0, 1, 2, 3, 0, 1, 2][:ignored]  # predictions on ignored pixels count nowhere
    target += [IGN] * ignored
    return np.array(pred), np.array(target)


def _brute(pred: np.ndarray, target: np.ndarray, k: int, exclude: tuple[int, ...]) -> dict:
    """Pixel-by-pixel counts: pixels of an excluded target class (or 255) are skipped."""
    tp, fp, fn = [0] * k, [0] * k, [0] * k
    pred_n, true_n = [0] * k, [0] * k
    valid = correct = 0
    for p, t in zip(pred.tolist(), target.tolist(), strict=True):
        if t == IGN or t in exclude:
            continue
        valid += 1
        pred_n[p] += 1
        true_n[t] += 1
        if p == t:
            tp[t] += 1
            correct += 1
        else:
            fp[p] += 1
            fn[t] += 1
    kept = [c for c in range(k) if c not in exclude]
    iou = {c: tp[c] / (tp[c] + fp[c] + fn[c]) for c in kept}
    f1 = {c: 2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in kept}
    p0 = correct / valid
    pe = sum(pred_n[c] * true_n[c] for c in kept) / valid**2
    return {
        "iou": iou,
        "miou": sum(iou.values()) / len(kept),
        "mf1": sum(f1.values()) / len(kept),
        "oa": p0,
        "kappa": (p0 - pe) / (1 - pe),
        "pixels": valid,
    }


def test_report_gives_all_class_and_protocol_means() -> None:
    pred, target = _pixels_of(HAND)
    cm = ConfusionMatrix(4)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    got = cm.report(exclude=(0,))
    full, proto = _brute(pred, target, 4, ()), _brute(pred, target, 4, (0,))
    for key in ("miou", "mf1", "oa", "kappa"):
        assert got[key] == pytest.approx(full[key]), key
        assert got[f"{key}_protocol"] == pytest.approx(proto[key]), key
    assert got["pixels"] == 40 and got["pixels_protocol"] == 30
    # written out for class 1: TP 8, FN 1+1; FP 3 (from class 0) + 2 (from class 2) over all
    # classes, but only 2 once class-0 pixels are ignored
    assert got["iou"][1] == pytest.approx(8 / 15)
    assert got["iou_protocol"][1] == pytest.approx(8 / 12)
    assert math.isnan(got["iou_protocol"][0]) and math.isnan(got["f1_protocol"][0])
    assert got["iou"][0] == pytest.approx(5 / 15)  # the all-classes reading keeps class 0
    # OA under the protocol counts no pixel of class 0: (8 + 6 + 6) / 30
    assert got["oa_protocol"] == pytest.approx(20 / 30) and got["oa"] == pytest.approx(25 / 40)
    # the case matters: the two means differ
    assert abs(got["miou"] - got["miou_protocol"]) > 0.02


def test_report_without_exclusions_repeats_the_all_class_values() -> None:
    pred, target = _pixels_of(HAND)
    cm = ConfusionMatrix(4)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    got = cm.report()
    for key in ("miou", "mf1", "oa", "kappa", "pixels"):
        assert got[key] == got[f"{key}_protocol"]


# ---------------------------------------------------------------- a protocol per layout


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _image(seed: int, side: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3)).astype(np.uint8)


def _ids(hi: int, seed: int = 0, side: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hi, (side, side)).astype(np.uint8)


def _make_layout(root: Path, layout: str) -> dict:
    """The smallest tree each layout reads; returns the extra ``open_source`` arguments."""
    if layout == "loveda":
        _png(root / "Train/Urban/images_png/7.png", _image(0))
        _png(root / "Train/Urban/masks_png/7.png", _ids(8))
    elif layout in ("loveda-mmseg", "potsdam-mmseg", "vaihingen-mmseg"):
        _png(root / "img_dir/train/7.png", _image(0))
        _png(root / "ann_dir/train/7.png", _ids(7 if layout != "loveda-mmseg" else 8))
    elif layout in ("loveda-folder", "folder"):
        _png(root / "images/7.png", _image(0))
        _png(root / "masks/7.png", _ids(8 if layout == "loveda-folder" else 6))
        if layout == "folder":
            return {"class_names": ",".join(ISPRS), "reduce_zero_label": False}
    elif layout == "potsdam":  # DWL index tiles listed in a split file
        _png(root / "image/top_potsdam_2_10_1_RGB.png", _image(0))
        _png(root / "label/top_potsdam_2_10_1_label.png", _ids(6))
        (root / "val.txt").write_text(
            "image/top_potsdam_2_10_1_RGB.png label/top_potsdam_2_10_1_label.png\n"
        )
        return {"split_file": root / "val.txt"}
    elif layout == "deepglobe":
        colours = np.array([(0, 255, 255), (255, 255, 0), (0, 0, 0)], np.uint8)
        root.mkdir(parents=True)
        Image.fromarray(_image(0)).save(root / "1_sat.jpg")
        _png(root / "1_mask.png", colours[_ids(3)])
    return {}


# layout -> (dataset, protocol name, excluded ids), from rs-mtdf-reference §7 and the paper
EXPECTED = {
    "loveda": ("loveda", "rs-mtdf-loveda", ()),
    "loveda-folder": ("loveda", "rs-mtdf-loveda", ()),
    "loveda-mmseg": ("loveda", "rs-mtdf-loveda", ()),
    "potsdam": ("potsdam", "rs-mtdf-potsdam", (0,)),
    "potsdam-mmseg": ("potsdam", "rs-mtdf-potsdam", (0,)),
    "vaihingen-mmseg": ("vaihingen", "rs-mtdf-potsdam", (0,)),
    "deepglobe": ("deepglobe", "rs-mtdf-deepglobe", (6,)),
    "folder": (None, "all-classes", ()),
}


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_each_layout_has_its_protocol(tmp_path: Path, layout: str) -> None:
    from pipelines.sources import open_source

    root = tmp_path / "data"
    extra = _make_layout(root, layout)
    src = open_source(root, layout=layout, tile_size=64, **extra)
    dataset, name, exclude = EXPECTED[layout]
    assert dataset is None or src.dataset == dataset
    assert (src.protocol.name, src.protocol.exclude) == (name, exclude)
    if exclude:  # the excluded class is the one the official script drops, by name
        assert src.class_names[exclude[0]] in ("impervious_surface", "unknown")


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_the_store_records_the_protocol(tmp_path: Path, layout: str) -> None:
    from featstore import open_store
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction

    root = tmp_path / "data"
    extra = _make_layout(root, layout)
    opts = {
        "split_file": str(extra["split_file"]) if "split_file" in extra else None,
        "classes": extra.get("class_names"),
        "reduce_zero_label": extra.get("reduce_zero_label"),
    }
    cfg = ExtractConfig(
        source=str(root),
        out=str(tmp_path / "s.zarr"),
        layout=layout,
        tile_size=64,
        teachers=("dinov2_vitb14",),
        tiny=True,
        base_size=28,
        scales=(1.0,),
        flip=False,
        limit=1,
        **{k: v for k, v in opts.items() if v is not None},
    )
    run_extraction(cfg, progress=False)
    schema = open_store(cfg.out).schema
    _, name, exclude = EXPECTED[layout]
    assert schema.eval_protocol is not None
    assert schema.eval_protocol["name"] == name
    assert tuple(schema.eval_protocol["exclude"]) == exclude
    reader = SimpleNamespace(schema=schema)
    assert resolve_protocol(reader, schema.class_names).exclude == exclude
    # `extract` and `info` print it under the class table
    from pipelines.sources.classtable import class_table_lines

    line = class_table_lines(schema)[-1]
    assert line.startswith(f"protocol:    {name} (")
    assert all(f"{c} {schema.class_names[c]}" in line for c in exclude)


def test_protocol_is_not_part_of_the_fingerprint() -> None:
    """Recording it must not block resuming a store extracted before it was recorded."""
    old = StoreSchema(dataset="potsdam", tile_size=64, class_names=ISPRS)
    new = StoreSchema(
        dataset="potsdam",
        tile_size=64,
        class_names=ISPRS,
        eval_protocol=Protocol("rs-mtdf-potsdam", (0,)).to_dict(),
    )
    assert fingerprint(old, []) == fingerprint(new, [])
    assert StoreSchema.from_dict(new.to_dict()).eval_protocol == new.eval_protocol


# ---------------------------------------------------------------- overrides and old stores


def test_override_by_id_name_or_none_and_bad_values() -> None:
    reader = SimpleNamespace(schema=SimpleNamespace(eval_protocol={"name": "x", "exclude": [0]}))
    assert resolve_protocol(reader, ISPRS).exclude == (0,)
    custom = resolve_protocol(reader, ISPRS, "clutter,4")
    assert (custom.name, custom.exclude) == ("custom", (4, 5))
    assert resolve_protocol(reader, ISPRS, "none").exclude == ()
    assert resolve_protocol(reader, ISPRS, "5").exclude == (5,)
    with pytest.raises(TrainConfigError, match="--exclude-classes 'roof'.*0 impervious_surface"):
        parse_exclude("roof", ISPRS, "--exclude-classes")
    with pytest.raises(TrainConfigError, match="--exclude-classes \\[9\\]: class ids run 0..5"):
        parse_exclude("9", ISPRS, "--exclude-classes")


def test_a_store_without_a_recorded_protocol_says_so() -> None:
    reader = SimpleNamespace(schema=SimpleNamespace(eval_protocol=None))
    protocol = resolve_protocol(reader, ISPRS)
    assert protocol.exclude == () and "records no protocol" in protocol.source


# ---------------------------------------------------------------- evaluate's JSON and the log


class ConstantModel(nn.Module):
    """Predicts class ``cls`` everywhere (evaluation reads only ``.logits``)."""

    def __init__(self, num_classes: int, cls: int) -> None:
        super().__init__()
        self.num_classes, self.cls = num_classes, cls

    def forward(self, x: torch.Tensor, need_translated: bool = True) -> SimpleNamespace:
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, self.cls] = 1.0
        return SimpleNamespace(logits=logits)


class HalfTiles:
    """One tile: left half class 0 (impervious), right half class 1 (building)."""

    def read_image(self, i: int) -> np.ndarray:
        return np.zeros((TILE, TILE, 3), np.uint8)

    def read_mask(self, i: int) -> np.ndarray:
        mask = np.ones((TILE, TILE), np.uint8)
        mask[:, : TILE // 2] = 0
        return mask


def _strict(text: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"bare {token} in the JSON")

    return json.loads(text, parse_constant=refuse)


def test_evaluate_json_names_the_protocol_and_reports_both_means() -> None:
    protocol = Protocol("rs-mtdf-potsdam", (0,), "test")
    names = ["impervious_surface", "building"]
    metrics = evaluate(
        {"ema": ConstantModel(2, 1)}, HalfTiles(), [0], 2, "whole", TILE, exclude_classes=(0,)
    )
    doc = _strict(metrics_json(metrics, names, protocol))
    assert doc["protocol"]["name"] == "rs-mtdf-potsdam"
    assert doc["protocol"]["excluded"] == ["impervious_surface"]
    assert doc["protocol"]["exclude"] == [0]
    half = TILE * TILE // 2
    # all classes: building predicted on every pixel, true on half -> IoU 1/2; impervious 0
    assert doc["ema"]["miou"] == pytest.approx((0 + 0.5) / 2)
    assert doc["ema"]["oa"] == pytest.approx(0.5)
    # protocol: impervious pixels ignored -> building IoU 1, the only class in the mean
    assert doc["ema"]["miou_protocol"] == pytest.approx(1.0)
    assert doc["ema"]["oa_protocol"] == pytest.approx(1.0)
    assert doc["ema"]["pixels_protocol"] == half
    assert doc["ema"]["iou_protocol"] == {"impervious_surface": None, "building": 1.0}


def test_eval_log_and_printed_line_name_the_protocol(tmp_path: Path) -> None:
    metrics = {"ema": {"miou": 0.25, "oa": 0.5, "miou_protocol": 1.0, "oa_protocol": 1.0}}
    protocol = {"name": "rs-mtdf-potsdam", "exclude": [0], "excluded": ["impervious_surface"]}
    logger = RunLogger(tmp_path, total=1, progress=False, tensorboard=False)
    lines: list[str] = []
    logger._bar.write = lines.append  # the printed eval line
    logger.evaluation(3, metrics, protocol)
    logger.close()
    row = json.loads((tmp_path / "eval.jsonl").read_text())
    assert row["step"] == 3 and row["protocol"]["name"] == "rs-mtdf-potsdam"
    assert row["ema"]["miou_protocol"] == 1.0
    assert lines == ["step 3: ema: mIoU 25.00 OA 50.00 | rs-mtdf-potsdam: mIoU 100.00 OA 100.00"]


def test_a_run_logs_and_evaluate_reports_the_protocol(tmp_path: Path) -> None:
    """End to end: the run's summary, eval.jsonl, and `featcache evaluate` name the protocol."""
    from click.testing import CliRunner

    from featcache.cli import main
    from featstore import open_store
    from tests.helpers import DINO, build_store, tiny_config
    from trainer.config import TeacherConfig
    from trainer.engine import train

    store = build_store(tmp_path / "s", n_images=5)
    schema = open_store(store).schema
    assert schema.eval_protocol["name"] == "all-classes"  # a generic folder: every class
    ids = [t.tile_id for t in open_store(store).tiles]
    cfg = tiny_config(tmp_path, store, ids, [TeacherConfig(DINO)], iters=1)
    cfg.eval.exclude_classes = "0"  # the run's own protocol overrides the store's
    train(cfg)
    run = Path(cfg.runtime.out_dir)
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert row["protocol"]["name"] == "custom" and row["protocol"]["exclude"] == [0]
    assert row["protocol"]["excluded"] == [schema.class_names[0]]
    assert {"miou_protocol", "oa_protocol"} <= set(row["ema"])
    assert math.isnan(row["ema"]["iou_protocol"][0])  # eval.jsonl keeps NaN, as before
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1"]  # one row per step, val columns filled
    assert float(rows[0]["ema_miou[custom]"]) == pytest.approx(row["ema"]["miou_protocol"])
    assert float(rows[0]["ema_miou"]) == pytest.approx(row["ema"]["miou"])
    assert (
        f"evaluation protocol: custom (without 0 {schema.class_names[0]})"
        in (run / "config.yaml").read_text()
    )
    res = CliRunner().invoke(
        main, ["evaluate", str(run / "best.pt"), "--store", store, "--no-progress", "--use", "ema"]
    )
    assert res.exit_code == 0, res.output
    doc = _strict(res.output)
    assert doc["protocol"]["name"] == "custom" and doc["protocol"]["exclude"] == [0]
    assert doc["ema"]["iou_protocol"][schema.class_names[0]] is None
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(run / "best.pt"),
            "--store",
            store,
            "--no-progress",
            "--use",
            "ema",
            "--exclude-classes",
            "none",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = _strict(res.output)
    assert doc["protocol"]["name"] == "all-classes"
    assert doc["ema"]["miou_protocol"] == doc["ema"]["miou"]
    bad = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(run / "best.pt"),
            "--store",
            store,
            "--no-progress",
            "--exclude-classes",
            "nope",
        ],
    )
    assert bad.exit_code != 0 and "--exclude-classes 'nope'" in bad.output


def test_train_option_and_yaml_give_the_same_override(tmp_path: Path) -> None:
    from featcache.cli_train import build_config
    from trainer.config import TrainConfig

    cli = build_config({"store": "s.zarr", "exclude_classes": "5"})
    yaml_cfg = TrainConfig.from_dict({"data": {"store": "s.zarr"}, "eval": {"exclude_classes": 5}})
    assert cli.eval.exclude_classes == yaml_cfg.eval.exclude_classes == "5"
    assert build_config({"store": "s.zarr"}).eval.exclude_classes is None  # the data's protocol


def test_a_recorded_protocol_beyond_the_model_classes_is_refused() -> None:
    reader = SimpleNamespace(schema=SimpleNamespace(eval_protocol={"name": "x", "exclude": [6]}))
    with pytest.raises(TrainConfigError, match="excludes classes \\[6\\] but the model has 6"):
        resolve_protocol(reader, ISPRS)
