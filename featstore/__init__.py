"""featstore: a torch-free, versioned Zarr v3 store of frozen-teacher patch tokens.

Public API (see docs/architecture.md): schema dataclasses, codecs, ``create_store`` /
``StoreWriter`` to write, ``open_store`` / ``FeatureStore`` to read, ``verify_store``.
"""

from __future__ import annotations

from featstore.bank import BankReader, BankWriter, add_bank
from featstore.codecs import (
    CODECS,
    FeatureCodec,
    Float16Codec,
    Int8Codec,
    PCACodec,
    get_codec,
    register_codec,
)
from featstore.errors import (
    CodecError,
    FeatcacheError,
    FingerprintMismatchError,
    IncompleteStoreError,
    MissingTeacherError,
    ShardDataError,
    ShardDoneError,
    StoreError,
    StoreFormatError,
    StoreWriteError,
    TileNotDoneError,
)
from featstore.geometry import LevelGeometry
from featstore.reader import FeatureStore, open_store
from featstore.schema import (
    FORMAT_VERSION,
    BankSpec,
    LevelSpec,
    ResizeSpec,
    StoreSchema,
    TeacherEntry,
    TeacherSpec,
    TileRecord,
    fingerprint,
)
from featstore.verify import verify_store
from featstore.writer import StoreWriter, create_store

__version__ = "0.1.0"

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "BankReader",
    "BankSpec",
    "BankWriter",
    "CodecError",
    "FeatcacheError",
    "FeatureCodec",
    "FeatureStore",
    "FingerprintMismatchError",
    "Float16Codec",
    "IncompleteStoreError",
    "Int8Codec",
    "LevelGeometry",
    "LevelSpec",
    "MissingTeacherError",
    "PCACodec",
    "ResizeSpec",
    "ShardDataError",
    "ShardDoneError",
    "StoreError",
    "StoreFormatError",
    "StoreSchema",
    "StoreWriteError",
    "StoreWriter",
    "TeacherEntry",
    "TeacherSpec",
    "TileNotDoneError",
    "TileRecord",
    "add_bank",
    "create_store",
    "fingerprint",
    "get_codec",
    "open_store",
    "register_codec",
    "verify_store",
]
