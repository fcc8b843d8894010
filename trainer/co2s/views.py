"""Co2S views: UniMatch's dual stream on the engine's views (reference §2.1–2.2).

The labeled, weak and first strong view are rendered by the RS-MTDF renderer
(`trainer.step.render_batch`, without its CutMix); Co2S adds a second strong view, drawn
independently from the same weak view (own photometric parameters, own CutMix box).

The CutMix partner is the official one: the "other" batch of UniMatch, a second iterator over the
same unlabeled loader, which holds **the same tiles** with an independent view (reference §2.1).
Here each unlabeled tile gets a second view drawn with the official rule
(`featviews.draw.draw_view`, seeded from the step's generator) and rendered by the one renderer;
the partner's own two strong views are pasted into s1/s2 inside the boxes. (RS-MTDF's partner,
the batch reversed, would paste an image into itself at one image per process, the official
Co2S batch at crop 512.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featstore.constants import SCALE_RANGE
from featviews.draw import ViewParams, draw_view
from featviews.geometry import ViewGeometry
from featviews.render import pixel_valid, render_views
from trainer.augment import cutmix_boxes, paste, strong_photometric
from trainer.step import render_batch


@dataclass
class Co2SViews:
    """A rendered Co2S batch on the device (images in [0, 1]).

    Attributes:
        x_l, y_l: labeled views ``[Bl, 3, V, V]`` and their masks ``[Bl, V, V]``.
        x_w: weak unlabeled views ``[Bu, 3, V, V]``.
        x_s1, x_s2: the two strong views, each CutMixed with the partner's own strong view.
        boxes1, boxes2: their CutMix boxes, int64 ``[Bu, 4]`` ``(y, x, h, w)`` (zeros: none).
        valid_u: bool ``[Bu, V, V]``, False on padding of the weak views.
        x_partner: the CutMix partners' weak views (same tiles, other views; the input of the
            no-grad pass), aligned with ``x_w``.
        valid_partner: their validity.
    """

    x_l: torch.Tensor
    y_l: torch.Tensor
    x_w: torch.Tensor
    x_s1: torch.Tensor
    x_s2: torch.Tensor
    boxes1: torch.Tensor
    boxes2: torch.Tensor
    valid_u: torch.Tensor
    x_partner: torch.Tensor
    valid_partner: torch.Tensor


def draw_partners(
    params: Sequence[ViewParams],
    generator: torch.Generator,
    scale_range: tuple[float, float] = SCALE_RANGE,
    flip_p: float = 0.5,
) -> list[ViewParams]:
    """A second, independent official view of each item's tile (UniMatch's "other" batch).

    One numpy generator per step, seeded from the step's torch ``generator``, so the draw
    replays after a resume like every other augmentation of the step.
    """
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
    rng = np.random.default_rng(int(seed.item()))
    return [draw_view(rng, p.tile, p.crop, scale_range, flip_p) for p in params]


def render_co2s(
    batch_l: Mapping[str, Any],
    batch_u: Mapping[str, Any],
    device: torch.device,
    generator: torch.Generator,
    cutmix_p: float,
    photometric: bool = True,
    jitter_order: str = "batch",
    blur: str = "gaussian",
    scale_range: tuple[float, float] = SCALE_RANGE,
    flip_p: float = 0.5,
) -> Co2SViews:
    """Render labeled, weak, partner and two CutMixed strong views of a batch on ``device``.

    Everything random is drawn from ``generator`` in a fixed order (first strong view, partner
    views, their two strong views, second strong view, boxes), so a step replays exactly after
    a resume. ``scale_range`` / ``flip_p``: the partner draw's (``data.scale_range`` /
    ``data.flip_p``, as for the batch's own views).
    """
    # cutmix_p 0: render_batch's partner (the batch reversed) is not Co2S's
    views = render_batch(batch_l, batch_u, device, generator, 0.0, photometric, jitter_order, blur)
    if views.x_w is None or views.x_s is None or views.pad_u is None:
        raise ValueError("Co2S renders unlabeled views: batch_u must not be None")
    x_w = views.x_w
    geom_o = ViewGeometry.from_params(
        draw_partners(batch_u["view"], generator, scale_range, flip_p), device
    )
    x_o = render_views(batch_u["image"].to(device, non_blocking=True), geom_o)

    def strong(x: torch.Tensor) -> torch.Tensor:
        if not photometric:
            return x.clone()
        return strong_photometric(x, generator, jitter_order=jitter_order, blur=blur)

    s1_o, s2_o, s2 = strong(x_o), strong(x_o), strong(x_w)
    n, v = x_w.shape[0], x_w.shape[-1]
    boxes1 = cutmix_boxes(n, v, generator, cutmix_p)
    boxes2 = cutmix_boxes(n, v, generator, cutmix_p)
    return Co2SViews(
        views.x_l,
        views.y_l,
        x_w,
        paste(views.x_s, s1_o, boxes1),
        paste(s2, s2_o, boxes2),
        boxes1,
        boxes2,
        ~views.pad_u,
        x_o,
        pixel_valid(geom_o),
    )


@dataclass
class PseudoLabels:
    """Pseudo-labels of a (mixed) view: ``pseudo`` int64, ``conf`` float, ``valid`` bool."""

    pseudo: torch.Tensor
    conf: torch.Tensor
    valid: torch.Tensor


def pseudo_from_logits(logits: torch.Tensor, valid: torch.Tensor) -> PseudoLabels:
    """Argmax and max softmax of detached ``[B, K, H, W]`` logits."""
    conf, pseudo = logits.detach().float().softmax(1).max(1)
    return PseudoLabels(pseudo, conf, valid)


def mix_pseudo(own: PseudoLabels, other: PseudoLabels, boxes: torch.Tensor) -> PseudoLabels:
    """Inside each CutMix box take the partner's pseudo-label, confidence and validity.

    ``other`` is aligned with ``own`` (computed on `Co2SViews.x_partner`), as UniMatch's
    ``mask_u_w_cutmixed`` takes the other batch's values.
    """
    return PseudoLabels(
        paste(own.pseudo, other.pseudo, boxes),
        paste(own.conf, other.conf, boxes),
        paste(own.valid, other.valid, boxes),
    )


__all__ = [
    "Co2SViews",
    "PseudoLabels",
    "draw_partners",
    "mix_pseudo",
    "pseudo_from_logits",
    "render_co2s",
]
