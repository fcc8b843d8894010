"""Validation: dataset-level confusion matrices for the student and its EMA.

``whole`` (official ``original`` mode): the tile is resized (bilinear, align_corners=True) to the
nearest multiple of 14 (512 -> 518), segmented, and the logits are resized back. ``sliding``:
``crop_size`` windows at ``stride`` over the tile at its own resolution (padded to the crop when
smaller), logits averaged where windows overlap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.metrics import ConfusionMatrix
from trainer.step import normalize


def nearest_multiple(x: int, m: int = 14) -> int:
    """The multiple of ``m`` nearest ``x`` (at least ``m``)."""
    return max(m, int(round(x / m)) * m)


def _forward(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(normalize(x), need_translated=False).logits.float()


@torch.no_grad()
def logits_whole(model: torch.nn.Module, x: torch.Tensor, patch: int = 14,
                 bf16: bool = False) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` of ``[B, 3, H, W]`` images in [0, 1] (run at ``patch`` multiples)."""
    h, w = x.shape[-2:]
    size = (nearest_multiple(h, patch), nearest_multiple(w, patch))
    xr = x if size == (h, w) else F.interpolate(x, size, mode="bilinear", align_corners=True)
    out = _forward(model, xr, bf16)
    if out.shape[-2:] != (h, w):
        out = F.interpolate(out, (h, w), mode="bilinear", align_corners=True)
    return out


def _starts(length: int, crop: int, stride: int) -> list[int]:
    last = max(length - crop, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


@torch.no_grad()
def logits_sliding(model: torch.nn.Module, x: torch.Tensor, crop: int, stride: int,
                   bf16: bool = False) -> torch.Tensor:
    """Logits by averaging ``crop`` windows at ``stride`` (images padded right/bottom to crop)."""
    b, _, h, w = x.shape
    ph, pw = max(h, crop), max(w, crop)
    xp = F.pad(x, (0, pw - w, 0, ph - h))
    acc: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=x.device)
    for y0 in _starts(ph, crop, stride):
        for x0 in _starts(pw, crop, stride):
            out = _forward(model, xp[..., y0:y0 + crop, x0:x0 + crop], bf16)
            if acc is None:
                acc = torch.zeros(b, out.shape[1], ph, pw, device=x.device)
            acc[..., y0:y0 + crop, x0:x0 + crop] += out
            count[..., y0:y0 + crop, x0:x0 + crop] += 1
    assert acc is not None  # at least one window always exists
    return (acc / count)[..., :h, :w]


def predict_logits(model: torch.nn.Module, x: torch.Tensor, mode: str, crop: int,
                   stride: int | None = None, bf16: bool = False) -> torch.Tensor:
    """Dispatch on the evaluation mode (``whole`` | ``sliding``)."""
    if mode == "whole":
        return logits_whole(model, x, bf16=bf16)
    if mode == "sliding":
        return logits_sliding(model, x, crop, stride or max(crop * 2 // 3, 1), bf16)
    raise ValueError(f"evaluation mode {mode!r} is not 'whole' or 'sliding'")


def _shard(indices: Sequence[int]) -> list[int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return list(indices)[rank::world]
    return list(indices)


def evaluate(models: Mapping[str, torch.nn.Module], reader: Any, indices: Sequence[int],
             num_classes: int, mode: str = "whole", crop: int = 518, stride: int | None = None,
             device: torch.device | str = "cpu", batch_size: int = 1, ignore_index: int = 255,
             bf16: bool = False) -> dict[str, dict[str, Any]]:
    """Metrics per model over the tiles ``indices`` of a store or source reader.

    Tiles are split over DDP ranks and the confusion matrices summed with ``all_reduce``.

    Returns:
        ``{model name: ConfusionMatrix.compute() dict}``.
    """
    device = torch.device(device)
    cms = {k: ConfusionMatrix(num_classes, ignore_index, device=device) for k in models}
    was = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    mine = _shard(indices)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        img = np.stack([reader.read_image(i) for i in chunk])
        mask = torch.from_numpy(np.stack([reader.read_mask(i) for i in chunk])).to(device)
        x = torch.from_numpy(img).to(device).permute(0, 3, 1, 2).float() / 255.0
        for k, m in models.items():
            cms[k].update(predict_logits(m, x, mode, crop, stride, bf16).argmax(1), mask)
    for k, m in models.items():
        m.train(was[k])
    out = {}
    for k, cm in cms.items():
        cm.all_reduce()
        out[k] = cm.compute()
    return out


__all__ = ["evaluate", "logits_sliding", "logits_whole", "nearest_multiple", "predict_logits"]
