"""RS-MTDF: FixMatch with an EMA teacher, plus distillation of the teachers' features."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trainer.methods.base import Method, register_method
from trainer.prepare import store_stats
from trainer.step import LossSettings, compute_losses, render_batch


@register_method
class RSMTDF(Method):
    """Labeled views, weak/strong unlabeled views with CutMix, and the source's targets.

    The student is trained on ``cat(labeled, strong)``: cross-entropy on labeled views,
    confidence-masked pseudo-labels of the EMA model on the weak views, and the distillation
    loss of each teacher's translated features against the targets of the run's target source.
    Without teachers this is plain FixMatch.
    """

    name = "rs-mtdf"
    summary = "FixMatch with an EMA teacher, plus distillation from the run's target source"

    def __init__(self, cfg: Any, data: Any, source: Any, device: torch.device) -> None:
        super().__init__(cfg, data, source, device)
        self.teachers = [t.name for t in cfg.model.teachers]
        self.settings = LossSettings(
            cfg.fixmatch.conf_thresh,
            cfg.distill.masked,
            cfg.runtime.bf16,
            store_stats(cfg, data, device),
        )

    def losses(
        self,
        model: torch.nn.Module,
        ema_model: torch.nn.Module,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        fm = self.cfg.fixmatch
        views = render_batch(
            batch_l,
            batch_u,
            self.device,
            generator,
            fm.cutmix_p,
            fm.photometric,
            fm.jitter_order,
            fm.blur,
        )
        return compute_losses(
            model, ema_model, views, self.source, batch_l, batch_u, self.teachers, self.settings
        )


__all__ = ["RSMTDF"]
