"""One RS-MTDF training step: views on the device, EMA pseudo-labels, student forward, losses.

The distillation targets come from the run's target source (``featviews.sources``): cached
grids sampled through each view (no teacher in memory), the view bank, or the teachers run
online; the step only asks the source for the targets of its batch of views.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from featstore.constants import IGNORE_INDEX as IGNORE
from featstore.constants import IMAGENET_MEAN, IMAGENET_STD
from featviews.geometry import ViewGeometry
from featviews.render import pixel_valid, render_masks, render_views
from featviews.sources import TargetSource, Views
from trainer.augment import cutmix_boxes, cutmix_pixels, strong_photometric
from trainer.losses import (
    distill_loss,
    supervised_loss,
    total_loss,
    unsupervised_loss,
)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise ``[B, 3, H, W]`` images in [0, 1] (the student's input)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def render_batch(
    batch_l: Mapping[str, Any],
    batch_u: Mapping[str, Any] | None,
    device: torch.device,
    generator: torch.Generator,
    cutmix_p: float,
    photometric: bool = True,
    jitter_order: str = "batch",
    blur: str = "gaussian",
) -> Views:
    """Move a batch to ``device`` and render every view there (batched pixel work).

    ``jitter_order`` / ``blur``: the strong views' colour-jitter order and blur kind
    (``fixmatch.jitter_order`` / ``fixmatch.blur``, see ``trainer.augment``).
    """
    geom_l = ViewGeometry.from_params(batch_l["view"], device)
    img_l = batch_l["image"].to(device, non_blocking=True)
    x_l = render_views(img_l, geom_l)
    y_l = render_masks(batch_l["mask"].to(device, non_blocking=True), geom_l, IGNORE)
    if batch_u is None:
        return Views(x_l, y_l, geom_l)
    geom_u = ViewGeometry.from_params(batch_u["view"], device)
    img_u = batch_u["image"].to(device, non_blocking=True)
    x_w = render_views(img_u, geom_u)
    pad_u = ~pixel_valid(geom_u)
    x_s = (
        strong_photometric(x_w, generator, jitter_order=jitter_order, blur=blur)
        if photometric
        else x_w.clone()
    )
    boxes = cutmix_boxes(x_w.shape[0], x_w.shape[-1], generator, cutmix_p)
    x_s = cutmix_pixels(x_s, boxes)
    return Views(x_l, y_l, geom_l, x_w, x_s, pad_u, geom_u, boxes)


@dataclass
class LossSettings:
    """Loss options of a step (from ``TrainConfig``)."""

    conf_thresh: float = 0.95
    masked: bool = True
    bf16: bool = False
    stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@torch.no_grad()
def pseudo_labels(
    ema_model: torch.nn.Module, views: Views, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EMA on the weak views, mixed with the CutMix boxes: ``(pseudo, conf, ignore)``."""
    assert views.x_w is not None and views.pad_u is not None and views.boxes is not None
    with autocast(views.x_w.device, bf16):
        logits = ema_model(normalize(views.x_w), need_translated=False).logits
    prob = logits.float().softmax(1)
    conf, pseudo = prob.max(1)
    # One cutmix call for the three maps: they are mixed with exactly the pixels' boxes.
    stack = torch.stack([pseudo.float(), conf, views.pad_u.float()], 1)
    mixed = cutmix_pixels(stack, views.boxes)
    return mixed[:, 0].round().long(), mixed[:, 1], mixed[:, 2] > 0.5


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``enabled`` (``runtime.bf16``)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def compute_losses(
    model: torch.nn.Module,
    ema_model: torch.nn.Module | None,
    views: Views,
    targets: TargetSource | None,
    batch_l: Mapping[str, Any],
    batch_u: Mapping[str, Any] | None,
    teachers: list[str],
    settings: LossSettings,
) -> dict[str, torch.Tensor]:
    """Forward the student on ``cat(labeled, strong)`` and return every loss term.

    Returns:
        ``total_loss`` terms: ``loss``, ``loss_x``, ``loss_u``, ``distill``, ``distill/<t>``.
    """
    b_l = views.x_l.shape[0]
    pseudo = None
    if views.x_s is not None and ema_model is not None:
        pseudo = pseudo_labels(ema_model, views, settings.bf16)
    with autocast(views.x_l.device, settings.bf16):
        out = model(normalize(views.student_input), need_translated=bool(teachers))
    logits = out.logits.float()
    loss_x = supervised_loss(logits[:b_l], views.y_l, IGNORE)
    if pseudo is None:
        loss_u = logits.sum() * 0.0
    else:
        loss_u = unsupervised_loss(
            logits[b_l:], pseudo[0], pseudo[1], pseudo[2], settings.conf_thresh
        )
    distill: dict[str, torch.Tensor] = {}
    for name in teachers:
        pred = out.translated[name].float()
        target, valid = targets(name, pred.shape[1], views, batch_l, batch_u)
        mean, std = settings.stats[name] if settings.stats else (None, None)
        distill[name] = distill_loss(pred, target, valid, settings.masked, mean, std)
    scale = 1.0 / max(len(teachers), 1)  # mean over teachers (= official half-sum of two)
    return total_loss(loss_x, loss_u, distill, distill_scale=scale)


def poly_lr(optimizer: Any, step: int, total: int, power: float) -> None:
    """Official poly schedule: ``lr_i = base * (1 - i / total) ** power`` (set after step i)."""
    factor = (1 - min(step, total) / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


__all__ = [
    "autocast",
    "LossSettings",
    "compute_losses",
    "normalize",
    "poly_lr",
    "pseudo_labels",
    "render_batch",
]
