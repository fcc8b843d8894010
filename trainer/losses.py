"""Losses of the RS-MTDF objective (§4 of the reference notes) and a non-finite guard.

* supervised: cross-entropy over valid (non-ignored) pixels;
* unsupervised (FixMatch): CE to the EMA pseudo-label on confident, non-ignored pixels, summed
  and divided by the number of non-ignored pixels (official normalisation, not by the number of
  confident pixels);
* distillation: MSE between translated student tokens and teacher targets sampled on the same
  grid. ``masked=True`` weights each token by its validity (fractional under CutMix) so padding
  and the partner's missing pixels do not pull the translator; ``masked=False`` is the official
  plain mean over every element.

Standardisation: with ``mean``/``std`` (per-channel teacher statistics from the store) only the
*target* is standardised; the translator learns to predict the standardised space. This balances
the DINOv2 (LayerNorm-ed) and CLIP (raw residual stream, a few huge channels) terms without any
extra parameters; the projections ``P_t`` read the translator output, so they adapt to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from featstore.constants import IGNORE_INDEX
from featstore.errors import FeatcacheError

__all__ = [
    "NonFiniteLossError",
    "check_finite",
    "distill_loss",
    "supervised_loss",
    "total_loss",
    "unsupervised_loss",
]


class NonFiniteLossError(FeatcacheError, FloatingPointError):
    """A loss term became NaN or infinite."""


def supervised_loss(
    logits: torch.Tensor, mask: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean CE over valid pixels of ``logits [B, K, H, W]`` vs ``mask [B, H, W]``.

    An all-ignored batch gives 0 (with a graph) instead of the NaN of ``F.cross_entropy``.
    """
    ce = F.cross_entropy(logits.float(), mask.long(), ignore_index=ignore_index, reduction="sum")
    count = (mask != ignore_index).sum().clamp_min(1)
    return ce / count


def _ignored(ignore: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if ignore.dtype == torch.bool:
        return ignore
    if ignore.is_floating_point():
        raise TypeError(
            "unsupervised_loss: `ignore` must be bool (True = ignored) or an integer mask with "
            f"{ignore_index} at ignored pixels (official), got {ignore.dtype}"
        )
    return ignore == ignore_index


def unsupervised_loss(
    logits_s: torch.Tensor,
    pseudo: torch.Tensor,
    conf: torch.Tensor,
    ignore: torch.Tensor,
    thresh: float = 0.95,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """FixMatch loss: ``sum(CE * [conf >= thresh] * valid) / count(valid)``.

    Args:
        logits_s: Student logits on the strong view ``[B, K, H, W]``.
        pseudo: EMA argmax labels ``[B, H, W]``.
        conf: EMA max-softmax confidences ``[B, H, W]``.
        ignore: True (bool) or ``ignore_index`` (integer) where a pixel is ignored (padding).
        thresh: Confidence threshold.
        ignore_index: Ignored value of an integer ``ignore`` mask.
    """
    valid = ~_ignored(ignore, ignore_index)
    ce = F.cross_entropy(logits_s.float(), pseudo.long(), reduction="none")
    keep = (conf >= thresh) & valid
    return (ce * keep).sum() / valid.sum().clamp_min(1)


def distill_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    masked: bool = True,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between translated tokens and teacher targets.

    Args:
        pred: Translated student tokens ``[B, n, n, C]``.
        target: Teacher targets ``[B, n, n, C]`` (any float dtype; computed in fp32).
        valid: Token weights in ``[0, 1]`` ``[B, n, n]``; None = all valid.
        masked: Weight by ``valid`` (sum / (sum(valid) * C)); False = plain mean (official).
        mean: Per-channel target mean ``[C]`` for standardisation (needs ``std``).
        std: Per-channel target std ``[C]``.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"distill_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
            "differ; sample targets on the grid the translator reads"
        )
    if (mean is None) != (std is None):
        raise ValueError("distill_loss: give both mean and std (or neither)")
    target = target.float()
    if mean is not None and std is not None:
        target = (target - mean.float()) / std.float()
    sq = (pred.float() - target).square()
    if not masked or valid is None:
        return sq.mean()
    if valid.shape != pred.shape[:-1]:
        raise ValueError(
            f"distill_loss: valid {tuple(valid.shape)} must be pred's shape without channels "
            f"{tuple(pred.shape[:-1])}"
        )
    w = valid.float()
    # An all-padding batch contributes 0 rather than 0/0.
    denom = (w.sum() * pred.shape[-1]).clamp_min(1e-12)
    return (sq.sum(-1) * w).sum() / denom


def total_loss(
    loss_x: torch.Tensor,
    loss_u: torch.Tensor,
    distill_terms: Mapping[str, torch.Tensor],
    distill_scale: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Combine terms as the official code: ``(loss_x + loss_u + distill) / 3``.

    ``distill = distill_scale * sum(distill_terms)``; the official ``dis_loss`` is the half-sum
    of its two teachers' MSEs (scale 0.5). With no teacher the result is the FixMatch baseline
    ``(loss_x + loss_u) / 2``.

    Returns:
        ``{"loss", "loss_x", "loss_u", "distill", "distill/<teacher>" ...}``.
    """
    terms: dict[str, torch.Tensor] = {"loss_x": loss_x, "loss_u": loss_u}
    if distill_terms:
        distill = distill_scale * torch.stack([t.float() for t in distill_terms.values()]).sum()
        terms["distill"] = distill
        terms.update({f"distill/{k}": v for k, v in distill_terms.items()})
        terms["loss"] = (loss_x + loss_u + distill) / 3
    else:
        terms["loss"] = (loss_x + loss_u) / 2
    return terms


def check_finite(
    terms: Mapping[str, torch.Tensor], step: int, batch_ids: Sequence[object] = ()
) -> None:
    """Raise if any loss term is NaN/inf (one host sync for all terms).

    Raises:
        NonFiniteLossError: Naming the step, every term's value and the batch ids.
    """
    if not terms:
        return
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    listed = ", ".join(f"{k}={v:.6g}" for k, v in zip(terms, values.tolist(), strict=True))
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: {listed}; batch ids {list(batch_ids)}. "
        "Lower the learning rate, check the targets of these tiles (featcache verify) or run "
        "with anomaly detection to find the first bad op"
    )
