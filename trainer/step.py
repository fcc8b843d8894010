"""One training step: views on the device, EMA pseudo-labels, student forward, losses.

The same code serves both modes; only the distillation targets differ:

* cached (`CachedTargets`): the per-item grids read from the store are sampled at the student's
  token grid through each view's geometry (``trainer.targets.sample_targets``), then mixed with
  the CutMix boxes at token level. No teacher is in memory.
* online (`trainer.online.OnlineTargets`): the teachers run on the rendered views (labeled views
  and CutMixed strong views, un-normalised [0, 1]) and their grids are resampled onto the same
  student grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from featstore.constants import IGNORE_INDEX as IGNORE
from featstore.constants import IMAGENET_MEAN, IMAGENET_STD
from featstore.geometry import LevelGeometry
from trainer.augment import (
    cutmix_boxes,
    cutmix_pixels,
    pixel_valid,
    render_masks,
    render_views,
    strong_photometric,
)
from trainer.geometry import ViewGeometry, token_valid
from trainer.losses import (
    check_finite,
    distill_loss,
    supervised_loss,
    total_loss,
    unsupervised_loss,
)
from trainer.targets import cutmix_targets, mix_levels, sample_targets


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise ``[B, 3, H, W]`` images in [0, 1] (the student's input)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class Views:
    """A rendered batch: labeled views + masks, weak/strong unlabeled views, CutMix boxes."""

    x_l: torch.Tensor
    y_l: torch.Tensor
    geom_l: ViewGeometry
    x_w: torch.Tensor | None = None
    x_s: torch.Tensor | None = None
    pad_u: torch.Tensor | None = None
    geom_u: ViewGeometry | None = None
    boxes: torch.Tensor | None = None

    @property
    def student_input(self) -> torch.Tensor:
        """``cat(labeled, strong)`` in [0, 1] (normalise before the student)."""
        return self.x_l if self.x_s is None else torch.cat([self.x_l, self.x_s])


class TargetProvider(Protocol):
    """Distillation targets on an ``n x n`` student grid for ``cat(labeled, strong)``."""

    def __call__(
        self,
        name: str,
        n: int,
        views: Views,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


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


class CachedTargets:
    """Targets sampled from the cached grids the dataset read for each item.

    Args:
        level_geoms: ``{(teacher, level key): LevelGeometry}`` of the store.
    """

    def __init__(self, level_geoms: Mapping[tuple[str, str], LevelGeometry]) -> None:
        self.level_geoms = dict(level_geoms)

    def _sample(
        self, name: str, n: int, batch: Mapping[str, Any], geom: ViewGeometry
    ) -> tuple[torch.Tensor, torch.Tensor]:
        views = batch["view"]
        geoms = [self.level_geoms[(name, v.levels[name].key)] for v in views]
        grids = [g.to(geom.device, non_blocking=True) for g in batch["grids"][name]]
        targets, valid = sample_targets(grids, geoms, geom, n)
        if any(name in v.blend for v in views):  # scale blend: mix in the other levels
            extra = batch["blend_grids"][name]
            extras = [
                [
                    (
                        extra[b][k].to(geom.device, non_blocking=True),
                        self.level_geoms[(name, lv.key)],
                        w,
                    )
                    for k, (lv, w) in enumerate(v.blend.get(name, ()))
                ]
                for b, v in enumerate(views)
            ]
            mix_levels(targets, extras, lambda g, lg, sub: sample_targets(g, lg, sub, n)[0], geom)
        return targets, valid

    def __call__(
        self,
        name: str,
        n: int,
        views: Views,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t_l, v_l = self._sample(name, n, batch_l, views.geom_l)
        if batch_u is None or views.geom_u is None or views.boxes is None:
            return t_l, v_l
        t_u, v_u = self._sample(name, n, batch_u, views.geom_u)
        t_u, v_u = cutmix_targets(t_u, v_u, views.boxes, views.geom_u.crop)
        return torch.cat([t_l, t_u]), torch.cat([v_l, v_u])


def view_validity(views: Views, n: int) -> torch.Tensor:
    """Token validity ``[B_l + B_u, n, n]`` of ``cat(labeled, strong)`` from the geometry."""
    v_l = token_valid(views.geom_l, n)
    if views.geom_u is None or views.boxes is None:
        return v_l
    v_u = token_valid(views.geom_u, n)
    _, v_u = cutmix_targets(v_u.unsqueeze(-1), v_u, views.boxes, views.geom_u.crop)
    return torch.cat([v_l, v_u])


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
    with _autocast(views.x_w.device, bf16):
        logits = ema_model(normalize(views.x_w), need_translated=False).logits
    prob = logits.float().softmax(1)
    conf, pseudo = prob.max(1)
    # One cutmix call for the three maps: they are mixed with exactly the pixels' boxes.
    stack = torch.stack([pseudo.float(), conf, views.pad_u.float()], 1)
    mixed = cutmix_pixels(stack, views.boxes)
    return mixed[:, 0].round().long(), mixed[:, 1], mixed[:, 2] > 0.5


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def compute_losses(
    model: torch.nn.Module,
    ema_model: torch.nn.Module | None,
    views: Views,
    targets: TargetProvider | None,
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
    with _autocast(views.x_l.device, settings.bf16):
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


def train_step(
    model: torch.nn.Module,
    ema_model: torch.nn.Module,
    optimizer: Any,
    views: Views,
    targets: TargetProvider | None,
    batch_l: Mapping[str, Any],
    batch_u: Mapping[str, Any] | None,
    teachers: list[str],
    settings: LossSettings,
    step: int,
) -> dict[str, torch.Tensor]:
    """Losses, backward, optimizer step; raises NonFiniteLossError before any update."""
    terms = compute_losses(model, ema_model, views, targets, batch_l, batch_u, teachers, settings)
    ids = batch_l["index"].tolist() + ([] if batch_u is None else batch_u["index"].tolist())
    check_finite(terms, step, ids)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


def poly_lr(optimizer: Any, step: int, total: int, power: float) -> None:
    """Official poly schedule: ``lr_i = base * (1 - i / total) ** power`` (set after step i)."""
    factor = (1 - min(step, total) / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


__all__ = [
    "CachedTargets",
    "LossSettings",
    "TargetProvider",
    "Views",
    "compute_losses",
    "normalize",
    "poly_lr",
    "pseudo_labels",
    "render_batch",
    "train_step",
    "view_validity",
]
