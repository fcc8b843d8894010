"""`evaluate` output as strict JSON: class names as keys, undefined metrics as null, never NaN.

A constant model on hand-built masks gives a confusion matrix that is written out by hand: the
expected IoUs below are counted pixels, not a second run of the metric code.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from trainer.evaluate import evaluate, metrics_json

SIDE = 28  # a multiple of 14: "whole" mode runs the model at the tile size, no resize


class ConstantModel(nn.Module):
    """Predicts class ``cls`` on every pixel (the evaluation only reads ``.logits``)."""

    def __init__(self, num_classes: int, cls: int) -> None:
        super().__init__()
        self.num_classes, self.cls = num_classes, cls

    def forward(self, x: torch.Tensor, need_translated: bool = True) -> SimpleNamespace:
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, self.cls] = 1.0
        return SimpleNamespace(logits=logits)


class TwoTiles:
    """Tile 0: left half class 0, right half class 1. Tile 1: class 1, top 4 rows ignore (255)."""

    def read_image(self, i: int) -> np.ndarray:
        return np.zeros((SIDE, SIDE, 3), np.uint8)

    def read_mask(self, i: int) -> np.ndarray:
        mask = np.ones((SIDE, SIDE), np.uint8)
        if i == 0:
            mask[:, : SIDE // 2] = 0
        else:
            mask[:4] = 255
        return mask


def _strict(text: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"bare {token} in the JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_class_absent_from_val_is_null_and_classes_are_named() -> None:
    metrics = evaluate({"ema": ConstantModel(3, 1)}, TwoTiles(), [0, 1], 3, "whole", SIDE)
    assert np.isnan(metrics["ema"]["iou"][2])  # the raw result does hold a NaN
    doc = _strict(metrics_json(metrics, ["soil", "roof", "water"]))
    # counted by hand: class 1 is predicted on all 784 + 672 valid pixels, true on 392 + 672;
    # class 0 is true on 392 pixels and never predicted; class 2 is neither true nor predicted.
    iou_roof = (392 + 672) / (784 + 672)
    assert doc["class_names"] == ["soil", "roof", "water"]
    assert doc["ema"]["iou"] == {"soil": 0.0, "roof": pytest.approx(iou_roof), "water": None}
    assert doc["ema"]["precision"]["water"] is None and doc["ema"]["recall"]["soil"] == 0.0
    assert doc["ema"]["miou"] == pytest.approx(iou_roof / 2)  # mean over defined classes
    assert doc["ema"]["pixels"] == 784 + 672


def test_duplicate_class_names_stay_apart() -> None:
    metrics = evaluate({"m": ConstantModel(2, 0)}, TwoTiles(), [0], 2, "whole", SIDE)
    doc = _strict(metrics_json(metrics, ["land", "land"]))
    assert list(doc["m"]["iou"]) == ["land (0)", "land (1)"]
    assert doc["m"]["iou"]["land (0)"] == pytest.approx(0.5)


def test_class_count_mismatch_is_an_error() -> None:
    metrics = evaluate({"m": ConstantModel(2, 0)}, TwoTiles(), [0], 2, "whole", SIDE)
    with pytest.raises(ValueError, match="2 classes but 3 class names"):
        metrics_json(metrics, ["a", "b", "c"])
