"""Errors of the trainer's configuration, below both `trainer.config` and `trainer.presets`."""

from __future__ import annotations

from featstore.errors import FeatcacheError

__all__ = ["TrainConfigError"]


class TrainConfigError(FeatcacheError, ValueError):
    """A training option is invalid; the message names the option and how to fix it."""
