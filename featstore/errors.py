"""Typed errors of the feature store; messages name the store or option and say how to fix.

`FeatcacheError` is the root of every error the project raises for a user to read (featstore,
pipelines, trainer, featcache): the CLI catches it in one place (`featcache.cli`) and prints the
message without a traceback. It lives here, torch-free, because featstore is the bottom layer
that every other package may import (tests/test_layering.py).
"""

from __future__ import annotations


class FeatcacheError(Exception):
    """Base class of every project error; its message names what is wrong and how to fix it.

    Subclasses keep their historical builtin base as well (``ValueError``, ``RuntimeError``,
    ...) so that callers' ``except ValueError`` clauses keep working.
    """


class StoreError(FeatcacheError):
    """Base class of every error raised by ``featstore``."""


class StoreFormatError(StoreError):
    """The target is not a featstore store, or was written by an unsupported format version."""


class StoreWriteError(StoreError):
    """The store location cannot be written (permissions, read-only filesystem, bad URL)."""


class StoreLockedError(StoreError):
    """Another writer holds the store's writer lock (``featcache.lock`` in the store)."""


class FingerprintMismatchError(StoreError):
    """An existing store was made from a different schema or tile list than the one requested."""

    def __init__(self, url: str, differences: list[str]) -> None:
        self.url = url
        self.differences = list(differences)
        lines = "\n  - ".join(self.differences) or "(fingerprints differ)"
        super().__init__(
            f"store {url!r} exists with a different fingerprint:\n  - {lines}\n"
            "Use a new store path, or pass overwrite=True to delete and recreate it."
        )


class IncompleteStoreError(StoreError):
    """The store (or a tile/shard of it) has not been fully written yet."""


class TileNotDoneError(IncompleteStoreError):
    """A read touched a tile whose shard has not been committed."""


class ShardDoneError(StoreError):
    """A write targeted a shard that is already committed (done)."""


class MissingTeacherError(StoreError, KeyError):
    """A teacher or level name that the store does not hold."""

    def __str__(self) -> str:
        # KeyError quotes its message; keep the plain text readable.
        return str(self.args[0]) if self.args else ""


class CodecError(StoreError, ValueError):
    """Unknown codec, bad codec parameters, unfitted PCA, or values the codec cannot represent."""


class ShardDataError(StoreError, ValueError):
    """Arrays given to ``write_shard`` have the wrong teachers, levels, shapes or values."""


class TileDataError(StoreError):
    """A stored tile cannot be read, or its bytes differ from the checksum recorded at write time.

    Attributes:
        tile_id: The tile's id in the tile index.
        index: The tile's position in the store.
        path: The array that failed (e.g. ``teachers/dino/s1.00``).
        file: The shard file holding that tile.
    """

    def __init__(
        self, message: str, tile_id: str = "", index: int = -1, path: str = "", file: str = ""
    ) -> None:
        # Defaults: torch's DataLoader re-raises a worker's error as ``type(err)(text)``, the
        # text holding the worker's traceback; the user gets the message, not the traceback.
        if "Original Traceback" in message:
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)
        self.tile_id, self.index, self.path, self.file = tile_id, int(index), path, file

    def __reduce__(self) -> tuple[type, tuple[str, str, int, str, str]]:
        # DataLoader workers pickle the error back to the main process.
        return (type(self), (str(self), self.tile_id, self.index, self.path, self.file))


__all__ = [
    "CodecError",
    "FeatcacheError",
    "FingerprintMismatchError",
    "IncompleteStoreError",
    "MissingTeacherError",
    "ShardDataError",
    "ShardDoneError",
    "StoreError",
    "StoreFormatError",
    "StoreLockedError",
    "StoreWriteError",
    "TileDataError",
    "TileNotDoneError",
]
