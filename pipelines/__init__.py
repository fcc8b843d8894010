"""Pipelines: teachers (registry), tile sources + synthetic data, extraction (local / dask).

The extraction API is exported lazily so that importing a light submodule (e.g.
`pipelines.sources`) does not pull in torch models or dask.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ExtractConfig": "pipelines.config",
    "ExtractConfigError": "pipelines.config",
    "ExtractionError": "pipelines.extract",
    "run_extraction": "pipelines.extract",
    "level_specs": "pipelines.extract",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
