"""trainer: semi-supervised segmentation from cached (or online) teacher features.

Entry points: ``trainer.engine.train(TrainConfig)``, ``trainer.evaluate.evaluate``,
``trainer.predict.predict``. Names below are imported lazily so ``import trainer`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "trainer.config",
    "TeacherConfig": "trainer.config",
    "train": "trainer.engine",
    "evaluate": "trainer.evaluate",
    "predict": "trainer.predict",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
