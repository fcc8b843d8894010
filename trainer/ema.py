"""EMA teacher of the student (FixMatch pseudo-labeller), built on timm's ``ModelEmaV3``.

The official update after optimizer step ``i`` (0-based) is
``ema <- ema * r + param * (1 - r)`` with ``r = min(1 - 1/(i + 1), 0.996)`` for every parameter
and buffer. ``ModelEmaV3`` with warm-up (gamma 1, power 1) uses
``decay(step) = 1 - (1 + (step - 1))^-1`` capped at ``decay``, and 0 for ``step <= 1``; calling it
with ``step = i + 1`` gives exactly ``r``. Only the student is averaged: the official code also
deep-copies and averages the frozen teachers, which the EMA pass never runs.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

__all__ = ["EMA_DECAY", "create_ema", "ema_decay", "update_ema"]

EMA_DECAY = 0.996


def _unwrap(model: nn.Module) -> nn.Module:
    # The EMA must mirror the bare student, not a DDP / compile wrapper.
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def create_ema(model: nn.Module, decay: float = EMA_DECAY) -> ModelEmaV3:
    """Deep-copy ``model`` (eval, no grad) into an EMA with the official schedule.

    Args:
        model: The student (DDP / compiled wrappers are unwrapped).
        decay: Cap of the decay ratio (0.996 official).
    """
    ema = ModelEmaV3(
        _unwrap(model),
        decay=decay,
        min_decay=0.0,
        update_after_step=0,
        use_warmup=True,
        warmup_gamma=1.0,
        warmup_power=1.0,
    )
    ema.requires_grad_(False)
    return ema


def ema_decay(ema: ModelEmaV3, step: int) -> float:
    """Decay ratio used after optimizer step ``step`` (0-based): ``min(1 - 1/(step+1), cap)``."""
    return float(ema.get_decay(step + 1))


@torch.no_grad()
def update_ema(ema: ModelEmaV3, model: nn.Module, step: int) -> None:
    """Average ``model`` into ``ema`` after optimizer step ``step`` (0-based global iteration)."""
    ema.update(_unwrap(model), step=step + 1)
