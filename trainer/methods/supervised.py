"""The supervised-only baseline of the official code (``supervised.py``): labeled views, CE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from featstore.constants import IGNORE_INDEX
from featviews.geometry import ViewGeometry
from featviews.render import render_masks, render_views
from trainer.config import TrainConfig
from trainer.errors import TrainConfigError
from trainer.losses import supervised_loss
from trainer.methods.base import Method, register_method
from trainer.step import autocast, normalize


@register_method
class Supervised(Method):
    """The student trained on labeled views alone with cross-entropy (ignore index 255).

    The views are drawn and rendered as RS-MTDF's labeled views (official rule: random rescale,
    crop, h-flip; no colour augmentation), so the two methods differ only by what RS-MTDF
    adds. Papers report this baseline beside the semi-supervised result. The engine keeps its
    EMA and evaluates both models as for every method.
    """

    name = "supervised"
    summary = "labeled views only, cross-entropy; no unlabeled data, no teacher"
    unlabeled = False
    distils = False

    @classmethod
    def configure(cls, cfg: TrainConfig) -> None:
        """No teachers: refuse named ones, and record distillation as off."""
        if cfg.model.teachers:
            names = [t.name for t in cfg.model.teachers]
            raise TrainConfigError(
                f"--method supervised trains without teachers, but model.teachers names "
                f"{names}: drop --teacher (or use --method rs-mtdf)"
            )
        cfg.model.teachers, cfg.distill.enabled = None, False

    def losses(
        self,
        model: torch.nn.Module,
        ema_model: torch.nn.Module,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        geom = ViewGeometry.from_params(batch_l["view"], self.device)
        x = render_views(batch_l["image"].to(self.device, non_blocking=True), geom)
        y = render_masks(batch_l["mask"].to(self.device, non_blocking=True), geom, IGNORE_INDEX)
        with autocast(x.device, self.cfg.runtime.bf16):
            logits = model(normalize(x), need_translated=False).logits
        loss = supervised_loss(logits.float(), y, IGNORE_INDEX)
        return {"loss": loss, "loss_x": loss}


__all__ = ["Supervised"]
