"""featstore: a torch-free, versioned Zarr v3 store of frozen-teacher patch tokens.

Public API (see docs/architecture.md): schema dataclasses, codecs, ``create_store`` /
``StoreWriter`` to write, ``open_store`` / ``FeatureStore`` to read, ``verify_store``.

Names are imported on first use (as in ``trainer``): ``featstore.errors`` or
``featstore.constants`` alone, which the CLI needs at start-up, must not pull in zarr and xarray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BankReader": "featstore.bank",
    "BankSpec": "featstore.schema",
    "BankWriter": "featstore.bank",
    "CODECS": "featstore.codecs",
    "CodecError": "featstore.errors",
    "FORMAT_VERSION": "featstore.schema",
    "FeatcacheError": "featstore.errors",
    "FeatureCodec": "featstore.codecs",
    "FeatureStore": "featstore.reader",
    "FingerprintMismatchError": "featstore.errors",
    "Float16Codec": "featstore.codecs",
    "IncompleteStoreError": "featstore.errors",
    "Int8Codec": "featstore.codecs",
    "LevelGeometry": "featstore.geometry",
    "LevelSpec": "featstore.schema",
    "MissingTeacherError": "featstore.errors",
    "MissingTextError": "featstore.text",
    "PCACodec": "featstore.codecs",
    "PCAInt8Codec": "featstore.codecs",
    "ResizeSpec": "featstore.schema",
    "ShardDataError": "featstore.errors",
    "ShardDoneError": "featstore.errors",
    "StoreError": "featstore.errors",
    "StoreFormatError": "featstore.errors",
    "StoreSchema": "featstore.schema",
    "StoreWriteError": "featstore.errors",
    "StoreWriter": "featstore.writer",
    "TeacherEntry": "featstore.schema",
    "TeacherSpec": "featstore.schema",
    "TextEmbeddings": "featstore.text",
    "TextInputs": "featstore.text",
    "TileNotDoneError": "featstore.errors",
    "TileRecord": "featstore.schema",
    "add_bank": "featstore.bank",
    "create_store": "featstore.writer",
    "fingerprint": "featstore.schema",
    "get_codec": "featstore.codecs",
    "open_store": "featstore.reader",
    "read_text_embeddings": "featstore.text",
    "register_codec": "featstore.codecs",
    "verify_store": "featstore.verify",
    "write_text_embeddings": "featstore.text",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'featstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
