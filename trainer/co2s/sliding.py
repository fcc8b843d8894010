"""Co2S evaluation: the official window stride, and the models `trainer.evaluate` runs.

The official ``zegclip_sliding_window`` (reference §3) slides crop-size windows at stride
``floor(5/6 crop)``, snaps the last window to the border and averages logits where windows
overlap: `trainer.evaluate.logits_sliding` does exactly that with ``stride = official_stride(crop)``
(its window starts are the official ones; a tile smaller than a window is padded by mirroring,
which the official protocol never meets: it resizes the short side to 512 first).

`trainer.evaluate` calls ``model(x, need_translated=False).logits``; `StudentLogits` gives a Co2S
student that interface, and `FusedLogits` evaluates the confidence-arbitrated fusion of the two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def official_stride(crop: int) -> int:
    """Window stride of the official Co2S evaluation: ``floor(5 * crop / 6)``."""
    return max(crop * 5 // 6, 1)


class LogitsOutput(NamedTuple):
    """What `trainer.evaluate` reads from a model's output."""

    logits: torch.Tensor


class StudentLogits(nn.Module):
    """One Co2S student behind the evaluation interface (no weights of its own)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor, need_translated: bool = False) -> LogitsOutput:
        del need_translated  # a Co2S student has no translators
        return LogitsOutput(self.student(x))


def fuse_by_confidence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per pixel, the logits of the more confident student (max softmax; ties: ``a``)."""
    conf_a = logits_a.float().softmax(1).amax(1, keepdim=True)
    conf_b = logits_b.float().softmax(1).amax(1, keepdim=True)
    return torch.where(conf_a >= conf_b, logits_a, logits_b)


class FusedLogits(nn.Module):
    """The two students fused per pixel by confidence (`fuse_by_confidence`).

    Under sliding evaluation the fusion is taken per window, then the chosen logits are averaged
    over overlapping windows like any model's.
    """

    def __init__(self, student_a: nn.Module, student_b: nn.Module) -> None:
        super().__init__()
        self.student_a, self.student_b = student_a, student_b

    def forward(self, x: torch.Tensor, need_translated: bool = False) -> LogitsOutput:
        del need_translated
        return LogitsOutput(fuse_by_confidence(self.student_a(x), self.student_b(x)))


__all__ = ["FusedLogits", "LogitsOutput", "StudentLogits", "fuse_by_confidence", "official_stride"]
