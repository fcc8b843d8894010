"""The method seam: what a training method declares, and the registry of methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from trainer.checkpoint import (
    check_architecture,
    load_state,
    student_config_dict,
    student_config_from,
    weight_set,
)
from trainer.config import TrainConfig
from trainer.errors import TrainConfigError
from trainer.prepare import build_student
from trainer.student import Student, param_groups


class Method:
    """Base of the training methods.

    Class attributes a method sets:
        name: its registry key (``--method``).
        summary: one line saying what it trains on and with which losses (the run's log).
        unlabeled: whether it needs the unlabeled stream (weak and strong views).
        distils: whether it uses teachers (distillation targets from the run's source).
        uses_ema: whether the engine keeps, updates and checkpoints an EMA copy of the model
            (False: no copy at all; ``losses`` and ``evaluated`` get ``None`` for it).
        evaluated_names: the names ``evaluated`` returns, in the order metrics are reported.

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
    uses_ema: ClassVar[bool] = True
    evaluated_names: ClassVar[tuple[str, ...]] = ("student", "ema")

    def __init__(self, cfg: TrainConfig, data: Any, source: Any, device: torch.device) -> None:
        self.cfg, self.data, self.source, self.device = cfg, data, source, device

    @classmethod
    def configure(cls, cfg: TrainConfig) -> None:
        """Settle, before the data is opened, the options the method decides (default: none)."""

    @classmethod
    def data_lines(cls, cfg: TrainConfig, data: Any) -> list[str]:
        """Lines of the run's summary about what the method reads from the data beyond the
        sets and teachers the engine lists (default: none)."""
        return []

    def build_model(self, teachers: Mapping[str, Any] | None) -> torch.nn.Module:
        """The student to train (the engine adds its EMA copy, optimizer and DDP wrapper)."""
        return build_student(self.cfg, self.data, teachers)

    def optimizers(self, model: torch.nn.Module) -> list[torch.optim.Optimizer]:
        """The optimizers the engine steps together each iteration (poly lr on each group's
        ``base_lr``; all of them checkpointed). Default: one AdamW over the student's groups."""
        o = self.cfg.optim
        return [torch.optim.AdamW(param_groups(model, o.lr, o.lr_multi, o.weight_decay))]

    @classmethod
    def check_checkpoint(cls, ckpt: Mapping[str, Any], path: Any) -> None:
        """Refuse, before anything is built, a checkpoint whose model record this method cannot
        read (default: the student's `StudentConfig`)."""
        student_config_from(dict(ckpt), path)

    @classmethod
    def load_models(
        cls, ckpt: Mapping[str, Any], names: Sequence[str], path: Any
    ) -> dict[str, torch.nn.Module]:
        """Rebuild, from a checkpoint's record and weights, the models ``names`` (of
        `evaluated_names`) for evaluation and prediction: no teacher, store or text tower.
        Default: one student per name from the ``student`` / ``ema`` weight set."""
        models = {}
        for name in names:
            model = Student(student_config_from(dict(ckpt), path))
            load_state(model, weight_set(dict(ckpt), name, path), f"{path} [{name}]")
            models[name] = model
        return models

    def architecture(self, model: torch.nn.Module) -> dict[str, Any]:
        """The model's architecture record (checkpoint ``student_config``)."""
        return student_config_dict(model.cfg)

    def check_architecture(
        self, ckpt: Mapping[str, Any], model: torch.nn.Module, path: Any
    ) -> None:
        """Refuse a checkpoint made for another architecture than ``model``."""
        check_architecture(dict(ckpt), model.cfg, path)

    def set_progress(self, step: int, total: int) -> None:
        """Called by the engine before each step's `losses`: the 0-based iteration and the run's
        total (for schedules inside a loss, e.g. Co2S's stability ramp); default: unused."""

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
        self, model: torch.nn.Module, ema_model: torch.nn.Module | None
    ) -> dict[str, torch.nn.Module]:
        """The models validated at each evaluation, by the name metrics are reported under."""
        assert ema_model is not None  # uses_ema: the engine keeps one
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
