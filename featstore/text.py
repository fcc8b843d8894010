"""Class text embeddings of a store: the ``text/`` group (Co2S's frozen class prototypes).

Co2S's CLIP student compares its dense map with one CLIP text embedding per class. They are
computed once (``featcache text STORE``, ``pipelines.text``) and kept beside the features, so a
training run needs no text tower. Layout (torch-free; written by ``write_text_embeddings``)::

    text/single        float32 [class, text_dim]    "a photo of a {class name}", rows L2-normalised
    text/concepts      float32 [concept, text_dim]  every concept prompt, rows L2-normalised
    text/concept_class int32   [concept]            class index of each concept row
    text/conceptavg    float32 [class, text_dim]    L2-normalise(mean of the class's
                                                    *unnormalised* concept embeddings)
    text.attrs["text"] = {format_version, inputs, provenance, complete}

``inputs`` is what decides the numbers (class names, concept lists, template, model, weights
sha256, tokenizer): a re-run with equal inputs is a no-op, other inputs are refused unless
overwritten. ``complete`` is set last, so a reader refuses a group whose write was cut short.
Each array carries its row prompts in attrs and zarr ``dimension_names``, so
``xarray.open_datatree(STORE, engine="zarr")["text"]`` opens it. The group is not part of the
store's fingerprint: it describes the class table, it does not change the cached features.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from featstore import layout as L
from featstore import lock
from featstore.constants import CO2S_TEXT_VARIANT
from featstore.errors import IncompleteStoreError, StoreError

TEXT_GROUP = "text"
TEXT_ATTR = "text"
TEXT_FORMAT_VERSION = 1
CONCEPT_CLASS = "concept_class"
EMBED_DIM = "text_dim"
DEFAULT_VARIANT = CO2S_TEXT_VARIANT
# The official .npy files are float16 (OpenAI ``clip.load`` on CUDA runs the tower in fp16); we
# keep float32, see ``TextEmbeddings``.
OFFICIAL_DTYPE_NOTE = (
    "Co2S's official .npy files are float16 from an fp16 CUDA text tower; these are float32 from "
    "an fp32 tower (differences ~1e-3 per component)"
)


@dataclass(frozen=True)
class TextVariant:
    """One stored embedding matrix.

    Attributes:
        name: Array name in ``text/`` (and ``variant=`` of the reader).
        rows: Dimension name of its rows (``class`` or ``concept``).
        meaning: One line for attrs and ``featcache info``.
    """

    name: str
    rows: str
    meaning: str


TEXT_VARIANTS: dict[str, TextVariant] = {
    v.name: v
    for v in (
        TextVariant("single", "class", "template on the class name, L2-normalised"),
        TextVariant("concepts", "concept", "template on every concept, L2-normalised"),
        TextVariant(
            "conceptavg",
            "class",
            "L2-normalise(mean of the class's unnormalised concept embeddings) (Co2S default)",
        ),
    )
}


class TextGroupError(StoreError):
    """Base of the errors about a store's ``text/`` group."""


class MissingTextError(TextGroupError, KeyError):
    """The store has no (complete) text group."""

    def __str__(self) -> str:
        # KeyError quotes its message; keep the plain text readable.
        return str(self.args[0]) if self.args else ""


class TextInputsMismatchError(TextGroupError, ValueError):
    """The store's text group was made from other inputs than the ones given."""


class TextDataError(TextGroupError, ValueError):
    """Embeddings handed to the writer have the wrong shapes or values."""


@dataclass(frozen=True)
class TextInputs:
    """What decides the stored embeddings; equal inputs give equal numbers.

    Attributes:
        class_names: The store's classes in label order (one ``single``/``conceptavg`` row each).
        concepts: Per class, its concept strings (Co2S's lists start with the class name).
        template: Prompt template with a ``{concept}`` field.
        model: Text tower id (e.g. ``open_clip ViT-B-16 text, QuickGELU``).
        weights_sha256: sha256 of the weights file, or ``random:<seed>`` for random init.
        tokenizer: Tokenizer id (and context length).
    """

    class_names: tuple[str, ...]
    concepts: tuple[tuple[str, ...], ...]
    template: str
    model: str
    weights_sha256: str
    tokenizer: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(
            self, "concepts", tuple(tuple(str(c) for c in group) for group in self.concepts)
        )

    def prompts(self, variant: str) -> list[str]:
        """The prompt of each row of ``variant`` (``conceptavg`` rows: their concepts joined)."""
        fill = self.template.format
        rows = {
            "single": lambda: [fill(concept=c) for c in self.class_names],
            "concepts": lambda: [fill(concept=c) for group in self.concepts for c in group],
            "conceptavg": lambda: [
                "mean of: " + " | ".join(fill(concept=c) for c in group) for group in self.concepts
            ],
        }
        return rows[_variant(variant).name]()

    def concept_class(self) -> np.ndarray:
        """int32 ``[sum C_k]``: class index of each concept row."""
        return np.repeat(np.arange(len(self.concepts)), [len(g) for g in self.concepts]).astype(
            np.int32
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists, as it reads back from zarr attrs)."""
        return {
            "class_names": list(self.class_names),
            "concepts": [list(g) for g in self.concepts],
            "template": self.template,
            "model": self.model,
            "weights_sha256": self.weights_sha256,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextInputs:
        """Inverse of ``to_dict``."""
        return cls(
            class_names=tuple(d["class_names"]),
            concepts=tuple(tuple(g) for g in d["concepts"]),
            template=str(d["template"]),
            model=str(d["model"]),
            weights_sha256=str(d["weights_sha256"]),
            tokenizer=str(d["tokenizer"]),
        )


def input_differences(old: TextInputs, new: TextInputs) -> list[str]:
    """One line per field that differs between two inputs (empty: equal)."""
    a, b = old.to_dict(), new.to_dict()
    return [f"{k}: stored {a[k]!r}, given {b[k]!r}" for k in a if a[k] != b[k]]


@dataclass(frozen=True, eq=False)  # arrays: no elementwise ==
class TextEmbeddings:
    """The three matrices of one text computation, float32 (the tower's own precision).

    float32, not the official float16: the stored rows then equal a direct computation exactly,
    and the whole group is a few hundred KiB, so halving it saves nothing that matters.

    Attributes:
        inputs: What decided them.
        single: ``[K, D]``.
        concepts: ``[sum C_k, D]`` in class order.
        conceptavg: ``[K, D]``.
        provenance: Facts that do not change the numbers (weights path, concept source, device).
    """

    inputs: TextInputs
    single: np.ndarray
    concepts: np.ndarray
    conceptavg: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    def matrix(self, variant: str) -> np.ndarray:
        """The matrix of ``variant``."""
        return np.asarray(getattr(self, _variant(variant).name), dtype=np.float32)


def _variant(name: str) -> TextVariant:
    if name not in TEXT_VARIANTS:
        raise TextGroupError(f"unknown text variant {name!r}; choose one of {list(TEXT_VARIANTS)}")
    return TEXT_VARIANTS[name]


def _make_command(url: str) -> str:
    return f"`featcache text {url} --weights PATH` (see `featcache text --help`)"


def _open(store: Any, mode: str) -> tuple[str, zarr.Group, dict[str, Any]]:
    """(url, root group, header) of a ``FeatureStore`` or a path/URL."""
    if isinstance(store, str | Path):
        url, options = str(store), None
    else:  # a FeatureStore: reopen its URL (its own group is read-only and may be stale)
        url, options = str(store.url), getattr(store, "_storage_options", None)
    group = L.open_root(url, mode, options)
    return url, group, L.read_header(group, url)


def _header(group: zarr.Group) -> dict[str, Any] | None:
    if TEXT_GROUP not in group:
        return None
    meta = group[TEXT_GROUP].attrs.get(TEXT_ATTR)
    return dict(meta) if isinstance(meta, dict) else None


def _complete_header(group: zarr.Group, url: str) -> dict[str, Any]:
    meta = _header(group)
    if meta is None:
        raise MissingTextError(
            f"store {url!r} has no class text embeddings (group text/); make them with "
            f"{_make_command(url)}"
        )
    if not meta.get("complete"):
        raise IncompleteStoreError(
            f"the text group of store {url!r} is incomplete (its write was interrupted); "
            f"re-run {_make_command(url)}: it rewrites the group"
        )
    if meta.get("format_version") != TEXT_FORMAT_VERSION:
        raise TextGroupError(
            f"the text group of store {url!r} has format version {meta.get('format_version')!r}; "
            f"this featstore reads version {TEXT_FORMAT_VERSION}: re-run {_make_command(url)} "
            "with --overwrite"
        )
    return meta


def stored_text_inputs(store: Any) -> TextInputs | None:
    """Inputs of the store's complete text group, or None when it has none (or an incomplete
    one, which a new write replaces)."""
    _, group, _ = _open(store, "r")
    meta = _header(group)
    if meta is None or not meta.get("complete"):
        return None
    return TextInputs.from_dict(meta["inputs"])


def text_is_current(store: Any, inputs: TextInputs, overwrite: bool = False) -> bool:
    """Whether the store already holds embeddings of ``inputs`` (a write would be a no-op).

    Raises:
        TextInputsMismatchError: it holds embeddings of other inputs and not ``overwrite``.
    """
    url = str(store) if isinstance(store, str | Path) else str(store.url)
    old = stored_text_inputs(store)
    if old is None:
        return False
    diffs = input_differences(old, inputs)
    if not diffs:
        return True
    if overwrite:
        return False
    lines = "\n  - ".join(diffs)
    raise TextInputsMismatchError(
        f"store {url!r} already holds class text embeddings made from other inputs:\n  - {lines}\n"
        "Pass --overwrite (library: overwrite=True) to replace them, or use the stored ones"
    )


def _check_matrices(emb: TextEmbeddings, class_names: tuple[str, ...], url: str) -> None:
    inputs = emb.inputs
    if class_names and inputs.class_names != class_names:
        raise TextDataError(
            f"text embeddings are for classes {list(inputs.class_names)} but store {url!r} has "
            f"classes {list(class_names)}; compute them for the store's class table"
        )
    k, n = len(inputs.class_names), sum(len(g) for g in inputs.concepts)
    if len(inputs.concepts) != k or any(not g for g in inputs.concepts):
        raise TextDataError(
            f"inputs give {len(inputs.concepts)} concept lists for {k} classes (each needs one "
            "or more concepts)"
        )
    single = emb.matrix("single")
    dim = int(single.shape[-1]) if single.ndim == 2 else -1
    want = {"single": (k, dim), "concepts": (n, dim), "conceptavg": (k, dim)}
    for name, shape in want.items():
        got = emb.matrix(name)
        if dim < 1 or got.shape != shape:
            raise TextDataError(f"text/{name} has shape {got.shape}, expected {shape}")
        if not np.isfinite(got).all():
            raise TextDataError(f"text/{name} holds non-finite values")


def _write_arrays(tgroup: zarr.Group, emb: TextEmbeddings) -> None:
    for variant in TEXT_VARIANTS.values():
        data = emb.matrix(variant.name)
        arr = tgroup.create_array(
            variant.name,
            shape=data.shape,
            dtype="float32",
            chunks=data.shape,
            dimension_names=(variant.rows, EMBED_DIM),
        )
        arr[:] = data
        arr.attrs.update(meaning=variant.meaning, prompts=emb.inputs.prompts(variant.name))
    owner = emb.inputs.concept_class()
    arr = tgroup.create_array(
        CONCEPT_CLASS,
        shape=owner.shape,
        dtype="int32",
        chunks=owner.shape,
        dimension_names=("concept",),
    )
    arr[:] = owner
    arr.attrs["meaning"] = "class index (row of single/conceptavg) of each row of concepts"


def write_text_embeddings(store: Any, emb: TextEmbeddings, overwrite: bool = False) -> bool:
    """Write ``emb`` as the store's ``text/`` group; return False when it was already there.

    The group is built with ``complete: False`` and marked complete last. A local store's
    writer lock is held meanwhile.

    Raises:
        TextInputsMismatchError: the store holds embeddings of other inputs and not ``overwrite``.
        TextDataError: shapes/values do not fit the inputs or the store's class table.
        StoreLockedError: another writer holds the store.
    """
    url, group, meta = _open(store, "r+")
    options = None if isinstance(store, str | Path) else getattr(store, "_storage_options", None)
    if text_is_current(url, emb.inputs, overwrite):
        return False
    class_names = tuple(meta["schema"].get("class_names", ()))
    _check_matrices(emb, class_names, url)
    held = _take_lock(url)
    try:
        tgroup = group.create_group(TEXT_GROUP, overwrite=True)
        header = {
            "format_version": TEXT_FORMAT_VERSION,
            "inputs": emb.inputs.to_dict(),
            "provenance": dict(emb.provenance),
            "dim": int(emb.matrix("single").shape[1]),
            "dtype": "float32",
            "official_dtype": OFFICIAL_DTYPE_NOTE,
            "complete": False,
        }
        tgroup.attrs[TEXT_ATTR] = header
        _write_arrays(tgroup, emb)
        # Marked complete last: a reader refuses a group cut short before this line.
        tgroup.attrs[TEXT_ATTR] = dict(header, complete=True)
        L.refresh_consolidated(url, options)
    finally:
        if held is not None:
            lock.remove_lock(L.local_path(url), held)
    return True


def _take_lock(url: str) -> str | None:
    """Hold the store's writer lock while writing (local stores; remote ones have none)."""
    if not L.is_local(url):
        return None
    run_id = f"text-{uuid.uuid4().hex[:12]}"
    lock.acquire(L.local_path(url), run_id)
    return run_id


def read_text_embeddings(
    store: Any, variant: str = DEFAULT_VARIANT
) -> tuple[np.ndarray, dict[str, Any]]:
    """The store's class text embeddings of ``variant``.

    Args:
        store: A ``FeatureStore`` or a store path/URL.
        variant: ``conceptavg`` (Co2S's default), ``single`` or ``concepts``.

    Returns:
        float32 rows, L2-normalised (``[K, D]``; ``[sum C_k, D]`` for ``concepts``), and a dict:
        ``variant``, ``prompts`` (per row), ``class_names``, ``concepts``, ``template``,
        ``model``, ``weights_sha256``, ``tokenizer``, ``dim``, ``provenance``, and for
        ``concepts`` ``concept_class`` (class index per row).

    Raises:
        MissingTextError: the store has no text group (the message names the command).
        IncompleteStoreError: the group's write was interrupted.
    """
    spec = _variant(variant)
    url, group, store_meta = _open(store, "r")
    meta = _complete_header(group, url)
    inputs = TextInputs.from_dict(meta["inputs"])
    store_classes = tuple(store_meta["schema"].get("class_names", ()))
    if store_classes and store_classes != inputs.class_names:
        raise TextGroupError(
            f"the text group of store {url!r} is for classes {list(inputs.class_names)}, the "
            f"store has {list(store_classes)}; re-run {_make_command(url)} with --overwrite"
        )
    data = np.asarray(group[f"{TEXT_GROUP}/{spec.name}"][:], dtype=np.float32)
    attrs: dict[str, Any] = {
        "variant": spec.name,
        "prompts": inputs.prompts(spec.name),
        **inputs.to_dict(),
        "dim": int(meta["dim"]),
        "provenance": dict(meta.get("provenance") or {}),
    }
    if spec.rows == "concept":
        attrs[CONCEPT_CLASS] = np.asarray(group[f"{TEXT_GROUP}/{CONCEPT_CLASS}"][:], np.int64)
    return data, attrs


def text_summary(store: Any) -> str | None:
    """One line describing the store's text group for ``featcache info`` (None: no group)."""
    _, group, _ = _open(store, "r")
    meta = _header(group)
    if meta is None:
        return None
    if not meta.get("complete"):
        return "INCOMPLETE (interrupted write; re-run `featcache text`)"
    inputs = TextInputs.from_dict(meta["inputs"])
    n = sum(len(g) for g in inputs.concepts)
    return (
        f"{len(inputs.class_names)} classes x {meta['dim']} ({', '.join(TEXT_VARIANTS)}; "
        f"{n} concepts), {inputs.model}, weights {inputs.weights_sha256[:12]}, "
        f"template {json.dumps(inputs.template)}"
    )


__all__ = [
    "CONCEPT_CLASS",
    "DEFAULT_VARIANT",
    "EMBED_DIM",
    "TEXT_GROUP",
    "TEXT_VARIANTS",
    "MissingTextError",
    "TextDataError",
    "TextEmbeddings",
    "TextGroupError",
    "TextInputs",
    "TextInputsMismatchError",
    "TextVariant",
    "input_differences",
    "read_text_embeddings",
    "stored_text_inputs",
    "text_is_current",
    "text_summary",
    "write_text_embeddings",
]
