"""The store as the audit's target sources read it: cached per batch, optionally re-encoded.

The audit builds the trainer's own target sources (``featviews.sources``) over these readers,
so the cached side of every comparison goes through the code that trains: the same reads of
encoded grids, the same decode on the device (``featviews.decode.decode_on_device``).

* ``BatchReads``: the store's encoded grids, each (teacher, tile, level) read once per batch
  (the audited configurations overlap: nested level sets, each with and without the blend).
* ``ReencodedReads``: the same grids as a *candidate codec* would have stored them: decoded
  from the store, encoded with the candidate, and ``codec(name)`` answers the candidate, so the
  source decodes them as training would read a store extracted with that codec. On an fp16
  store (the planner's sample) the difference to the store's own reads is the candidate's loss
  alone, on the tokens extraction computed (fp16 rounding aside).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from featstore.codecs import FeatureCodec
from featstore.errors import CodecError

Encoded = tuple[np.ndarray, np.ndarray | None]


class _GridReads:
    """Batched reads built from a cached ``read_encoded`` (what the sources call)."""

    def read_encoded(self, name: str, tile_index: int, key: str) -> Encoded:
        raise NotImplementedError

    def codec(self, name: str) -> FeatureCodec:
        raise NotImplementedError

    def read_batch_encoded(self, name: str, rows: Sequence[int], key: str) -> Encoded:
        """``FeatureStore.read_batch_encoded`` through the cache (tile by tile)."""
        pairs = [self.read_encoded(name, int(i), key) for i in rows]
        aux = None if pairs[0][1] is None else np.stack([a for _, a in pairs])
        return np.stack([d for d, _ in pairs]), aux

    def read_batches_encoded(
        self, requests: Sequence[tuple[str, str, Sequence[int]]]
    ) -> list[Encoded]:
        """``FeatureStore.read_batches_encoded``: one ``read_batch_encoded`` per request."""
        return [self.read_batch_encoded(name, rows, key) for name, key, rows in requests]


class BatchReads(_GridReads):
    """The store's own encoded grids, each read once (make one per batch: it keeps them)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._cache: dict[tuple[str, int, str], Encoded] = {}

    def read_encoded(self, name: str, tile_index: int, key: str) -> Encoded:
        """``FeatureStore.read_encoded``, cached."""
        k = (name, int(tile_index), key)
        if k not in self._cache:
            self._cache[k] = self.store.read_encoded(name, int(tile_index), key)
        return self._cache[k]

    def codec(self, name: str) -> FeatureCodec:
        """The store's codec of teacher ``name``."""
        return self.store.codec(name)


class ReencodedReads(_GridReads):
    """Read-only view of ``reads`` as if the store had been extracted with ``codecs``.

    Args:
        reads: the store's reads (``BatchReads``; its cache is shared by every codec).
        codecs: per teacher, the candidate codec, fitted when it needs a fit (PCA).
    """

    def __init__(self, reads: _GridReads, codecs: Mapping[str, FeatureCodec]) -> None:
        for name, codec in codecs.items():
            if codec.needs_fit and getattr(codec, "basis", None) is None:
                raise CodecError(
                    f"candidate codec {codec.name!r} of teacher {name!r} is not fitted; fit it "
                    "(codec.fit on scale-1 tokens) before auditing with it"
                )
        self.reads = reads
        self.codecs = dict(codecs)
        self._cache: dict[tuple[str, int, str], Encoded] = {}

    def read_encoded(self, name: str, tile_index: int, key: str) -> Encoded:
        """The tile's level as the candidate stores it: per tile, as extraction encodes."""
        k = (name, int(tile_index), key)
        if k not in self._cache:
            data, aux = self.reads.read_encoded(name, int(tile_index), key)
            tokens = self.reads.codec(name).decode(data, aux)
            self._cache[k] = self.codecs[name].encode(np.asarray(tokens, np.float32))
        return self._cache[k]

    def codec(self, name: str) -> FeatureCodec:
        """The candidate codec of teacher ``name`` (what the source decodes with)."""
        return self.codecs[name]


__all__ = ["BatchReads", "ReencodedReads"]
