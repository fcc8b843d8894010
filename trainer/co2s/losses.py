"""Co2S losses: the UniMatch student loss and the confidence-arbitrated stability loss.

Written from ``co2s-reference.md`` §2.3 (what the official ``Co2S.py`` computes):

* ``L_x``: cross-entropy on labeled views, mean over valid pixels (ignore 255).
* ``L_s1``, ``L_s2``, ``L_fp``: per-pixel CE against pseudo-labels, kept where the pseudo-label's
  confidence reaches the threshold and the pixel is valid, **summed and divided by the number of
  valid pixels** (low-confidence pixels count in the denominator; the paper's Eq. (2) writes an
  unnormalised sum).
* Student loss ``(L_x + 1/4 L_s1 + 1/4 L_s2 + 1/2 L_fp) / 2``.
* Stability loss between the two students' weak predictions, three confidence cases, weighted by
  a cosine ramp of lambda to 0.5 over the first 20 % of the iterations.

The official code builds the stability term from already-detached logits, so it has no gradient
(reference §7.1). Here the less confident student (the one that learns) keeps its gradient and
the teacher side is detached per direction; ``detach=True`` reproduces the official no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featstore.constants import IGNORE_INDEX

# Weights of the UniMatch terms and the final halving (reference §2.3, = paper lambda_sup/ct 0.5).
W_STRONG = 0.25
W_FP = 0.5
STUDENT_SCALE = 0.5
# lambda(t) ramps up to STABILITY_MAX over the first STABILITY_RAMP of all iterations.
STABILITY_MAX = 0.5
STABILITY_RAMP = 0.2


def supervised_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_x``: cross-entropy of ``[B, K, H, W]`` logits, mean over pixels that are not 255."""
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def masked_ce(
    logits: torch.Tensor,
    pseudo: torch.Tensor,
    conf: torch.Tensor,
    valid: torch.Tensor,
    conf_thresh: float,
) -> torch.Tensor:
    """Confidence-masked CE, summed over kept pixels, divided by the number of valid pixels.

    Args:
        logits: ``[B, K, H, W]`` student logits on a strong (or feature-perturbed) view.
        pseudo: ``[B, H, W]`` int64 pseudo-labels.
        conf: ``[B, H, W]`` their confidences (max softmax).
        valid: ``[B, H, W]`` bool, False on padding (the official ``ignore_mask != 255``).
        conf_thresh: Pixels below it contribute 0 but still count in the denominator.
    """
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    keep = (conf >= conf_thresh) & valid
    # a batch of pure padding: nothing to learn (the official code would divide by zero)
    return (ce * keep).sum() / valid.sum().clamp(min=1)


def student_loss(
    loss_x: torch.Tensor, loss_s1: torch.Tensor, loss_s2: torch.Tensor, loss_fp: torch.Tensor
) -> torch.Tensor:
    """One student's UniMatch loss ``(L_x + 1/4 L_s1 + 1/4 L_s2 + 1/2 L_fp) / 2``."""
    return STUDENT_SCALE * (loss_x + W_STRONG * (loss_s1 + loss_s2) + W_FP * loss_fp)


@dataclass(frozen=True)
class StabilityMasks:
    """Where each student learns from the other (bool ``[B, H, W]``, reference §2.3).

    ``a_learns``: (b confident and a not) or (both confident and ``c_b >= c_a``); ``b_learns``
    symmetrically. Equal confident pixels are in both (mutual learning); pixels where both are
    below the threshold are in neither.
    """

    a_learns: torch.Tensor
    b_learns: torch.Tensor


def stability_masks(conf_a: torch.Tensor, conf_b: torch.Tensor, tau: float) -> StabilityMasks:
    """The three confidence cases of the stability loss for students ``a`` and ``b``."""
    sure_a, sure_b = conf_a >= tau, conf_b >= tau
    both = sure_a & sure_b
    a_learns = (sure_b & ~sure_a) | (both & (conf_b >= conf_a))
    b_learns = (sure_a & ~sure_b) | (both & (conf_a >= conf_b))
    return StabilityMasks(a_learns, b_learns)


def _pull(student: torch.Tensor, teacher: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Sum over selected pixels and classes of ``(p_s - p_t)^2 / (#selected * K)``; 0 if none."""
    sq = (student - teacher).pow(2).sum(1)  # [B, H, W], summed over the K classes
    n = where.sum()
    return (sq * where).sum() / (n.clamp(min=1) * student.shape[1])


def stability_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    tau: float,
    detach: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stability terms ``(for a, for b)`` from two students' weak logits ``[B, K, H, W]``.

    Each term pulls the learning student's probabilities towards the other's (detached) where the
    masks of `stability_masks` select it, so only the less confident student of a pixel gets a
    gradient (both when their confidences are equal). ``detach=True`` (``--stability-detach``):
    the official code's value with both sides detached, i.e. no gradient at all.
    """
    if detach:
        logits_a, logits_b = logits_a.detach(), logits_b.detach()
    p_a, p_b = logits_a.float().softmax(1), logits_b.float().softmax(1)
    conf_a, conf_b = p_a.detach().amax(1), p_b.detach().amax(1)
    masks = stability_masks(conf_a, conf_b, tau)
    loss_a = _pull(p_a, p_b.detach(), masks.a_learns)
    loss_b = _pull(p_b, p_a.detach(), masks.b_learns)
    return loss_a, loss_b


def stability_weight(step: int, total: int, ramp: float = STABILITY_RAMP) -> float:
    """lambda(t): ``0.5 * (1 - cos(pi t / (T_up - 1))) / 2`` for ``t < T_up``, then 0.5.

    ``T_up = floor(ramp * total)`` iterations (reference §2.3, the official
    ``dynamic_weight``); a ramp shorter than two iterations is the constant 0.5.
    """
    up = int(ramp * total)
    if up <= 1 or step >= up - 1:
        return STABILITY_MAX
    return STABILITY_MAX * 0.5 * (1.0 - math.cos(math.pi * step / (up - 1)))


__all__ = [
    "STABILITY_MAX",
    "STABILITY_RAMP",
    "StabilityMasks",
    "masked_ce",
    "stability_loss",
    "stability_masks",
    "stability_weight",
    "student_loss",
    "supervised_ce",
]
