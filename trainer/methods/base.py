"""The method seam: what a training method declares, and the registry of methods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from trainer.config import TrainConfig
from trainer.errors import TrainConfigError
from trainer.prepare import build_student


class Method:
    """Base of the training methods.

    Class attributes a method sets:
        name: its registry key (``--method``).
        summary: one line saying what it trains on and with which losses (the run's log).
        unlabeled: whether it needs the unlabeled stream (weak and strong views).
        distils: whether it uses teachers (distillation targets from the run's source).

    Args:
        cfg: The run's config (validated; teachers and branches resolved).
        data: The run's data (``trainer.prepare.RunData``).
        source: The run's target source (``featviews.sources``).
        device: The training device.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    unlabeled: ClassVar[bool] = True
    distils: ClassVar[bool] = True

    def __init__(self, cfg: TrainConfig, data: Any, source: Any, device: torch.device) -> None:
        self.cfg, self.data, self.source, self.device = cfg, data, source, device

    @classmethod
    def configure(cls, cfg: TrainConfig) -> None:
        """Settle, before the data is opened, the options the method decides (default: none)."""

    def build_model(self, teachers: Mapping[str, Any] | None) -> torch.nn.Module:
        """The student to train (the engine adds its EMA copy, optimizer and DDP wrapper)."""
        return build_student(self.cfg, self.data, teachers)

    def losses(
        self,
        model: torch.nn.Module,
        ema_model: torch.nn.Module,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Render the batch's views, forward, and return the loss terms (``loss`` first)."""
        raise NotImplementedError

    def evaluated(
        self, model: torch.nn.Module, ema_model: torch.nn.Module
    ) -> dict[str, torch.nn.Module]:
        """The models validated at each evaluation, by the name metrics are reported under."""
        return {"student": model, "ema": ema_model}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The method registered as ``name``.

    Raises:
        TrainConfigError: no such method (the message lists them).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise TrainConfigError(
            f"method {name!r} is not one of {sorted(METHODS)} (--method / method:)"
        ) from None


__all__ = ["METHODS", "Method", "method_class", "register_method"]
