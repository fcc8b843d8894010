"""Predicted borders: no band of another class along the tile edges (issue 10).

Hand-built models with a known answer per pixel, run through the real `predict_logits`:

* a smoothing "brightness" model (7x7 mean over the image, blind to pixels outside it) on a
  uniform bright tile must say "bright" on every pixel, borders included. Before the fix the
  sliding mode padded tiles smaller than the window with black, and the rows and columns next to
  the black strip came out "dark": the 1-px (and wider) border band;
* a pointwise model (logits = the normalised pixel) through overlapping sliding windows and
  through the whole-mode resize round trip must return a linear ramp unchanged up to the last
  row and column (bilinear with align_corners=True maps corner to corner, so a ramp is exact).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.evaluate import predict_logits
from trainer.step import normalize


class Brightness(nn.Module):
    """Class 1 where the 7x7 mean brightness (of the image pixels only) is above 0.5, else 0."""

    def forward(self, x: torch.Tensor, need_translated: bool = True) -> SimpleNamespace:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        grey = (x * std + mean).mean(1, keepdim=True)  # undo the normalisation
        # count_include_pad=False: like a trained network, the model knows where its input ends
        local = F.avg_pool2d(grey, 7, stride=1, padding=3, count_include_pad=False)
        return SimpleNamespace(logits=torch.cat([torch.full_like(local, 0.5), local], 1))


class Pointwise(nn.Module):
    """Logits = the (normalised) input pixel: a model without any spatial extent."""

    def forward(self, x: torch.Tensor, need_translated: bool = True) -> SimpleNamespace:
        return SimpleNamespace(logits=x.clone())


@pytest.mark.parametrize("mode", ["whole", "sliding"])
@pytest.mark.parametrize("side", [64, 20, 112])
def test_a_uniform_tile_is_one_class_up_to_the_border(mode: str, side: int) -> None:
    # 64 in 70-px windows: 6 px of padding (the 512-in-518 case); 20: padding longer than the
    # tile; 112: larger than the window, several overlapping windows and no padding
    x = torch.full((1, 3, side, side), 0.6)
    pred = predict_logits(Brightness(), x, mode, crop=70).argmax(1)[0]
    assert pred.shape == (side, side)
    wrong = (pred != 1).nonzero().tolist()
    assert not wrong, f"{mode}: {len(wrong)} border pixels not 'bright', e.g. {wrong[:4]}"


def _ramp(h: int, w: int) -> torch.Tensor:
    """R rises along x, G along y, B along both: a known linear function of position."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([xx, yy, (xx + yy) / 2]).unsqueeze(0)


@pytest.mark.parametrize(("h", "w", "crop"), [(100, 75, 28), (64, 64, 70), (45, 90, 42)])
def test_sliding_windows_return_a_pointwise_model_exactly(h: int, w: int, crop: int) -> None:
    x = _ramp(h, w)
    out = predict_logits(Pointwise(), x, "sliding", crop)
    torch.testing.assert_close(out, normalize(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (512, 500), (30, 41)])
def test_whole_mode_keeps_a_linear_ramp_to_the_last_pixel(h: int, w: int) -> None:
    x = _ramp(h, w)
    out = predict_logits(Pointwise(), x, "whole", crop=70)
    torch.testing.assert_close(out, normalize(x), atol=1e-5, rtol=0)
    # and so does the decision between two ramps, on every row and column that is not a tie
    ref = normalize(x)[:, :2]
    decided = (ref[:, 1] - ref[:, 0]).abs() > 1e-3
    assert torch.equal(out[:, :2].argmax(1)[decided], ref.argmax(1)[decided])
