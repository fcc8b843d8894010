"""Class concept lists for Co2S's concept-averaged text prompts (package data + user files).

A concept list gives, per class in label order, the concept strings whose prompt embeddings are
averaged into the class prototype. File format (the shipped ``<dataset>.json`` files and a user's
``--concepts FILE``; ``.json``, or ``.yaml``/``.yml`` with the same structure)::

    {"dataset": "loveda",                       # optional, informative
     "source": "where the lists come from",     # optional, informative
     "classes": [{"name": "background", "concepts": ["background", "open space", ...]},
                 {"name": "building",   "concepts": ["building", "high-rise", ...]}, ...]}

``classes`` must name the store's classes in the store's order. The concepts are used as given:
Co2S's lists start with the class name itself (so it is averaged in), a user list may or may not.
The shipped lists are the official ones (Co2S ``model/text_embeddings.py``), quirks included
(WHDLD water has 7 concepts, LoveDA background 5; class names keep their underscores).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from featstore.errors import FeatcacheError

# Shipped list per name; MSL shares MER's classes and list (as in the official code).
BUILTIN_FILES: dict[str, str] = {
    "loveda": "loveda.json",
    "potsdam": "potsdam.json",
    "whdld": "whdld.json",
    "gid15": "gid15.json",
    "mer": "mer.json",
    "msl": "mer.json",
}
# The store's dataset name (``StoreSchema.dataset``) -> shipped list, for ``--concepts builtin``.
# Only datasets whose class table is the list's own; e.g. Vaihingen shares Potsdam's classes but
# is not Co2S's data, so it is not guessed (pass ``--concepts potsdam`` to use that list).
DATASET_LISTS: dict[str, str] = {name: name for name in BUILTIN_FILES} | {"gid": "gid15"}
BUILTIN = "builtin"
# Every class's only concept is its own name: conceptavg then equals single (any store).
NAMES_ONLY = "names"


class ConceptListError(FeatcacheError, ValueError):
    """A concept list is missing, unreadable, or does not fit the store's classes."""


@dataclass(frozen=True)
class ConceptList:
    """Concepts per class, in label order.

    Attributes:
        class_names: The classes, in label order.
        concepts: Per class, its concept strings (at least one).
        source: Where the list came from (``builtin:loveda``, a file path, ``names``).
    """

    class_names: tuple[str, ...]
    concepts: tuple[tuple[str, ...], ...]
    source: str

    def check_classes(self, store_classes: tuple[str, ...], store: str) -> None:
        """Refuse a list whose classes are not ``store_classes`` in order.

        Raises:
            ConceptListError: naming the list, the first differing class and the fix.
        """
        if self.class_names == tuple(store_classes):
            return
        diff = next(
            (
                f"class {i} is {a!r} in the list but {b!r} in the store"
                for i, (a, b) in enumerate(zip(self.class_names, store_classes, strict=False))
                if a != b
            ),
            f"the list has {len(self.class_names)} classes, the store {len(store_classes)}",
        )
        raise ConceptListError(
            f"concept list {self.source} does not fit store {store!r}: {diff}. The store's "
            f"classes in order: {list(store_classes)}. Pass --concepts FILE with one entry per "
            "store class in that order (format: `featcache text --help`), or --concepts names"
        )


def list_builtin() -> list[str]:
    """Names accepted by ``--concepts NAME``."""
    return sorted(BUILTIN_FILES)


def names_only(class_names: tuple[str, ...]) -> ConceptList:
    """Each class's concepts = its own name (``--concepts names``)."""
    return ConceptList(tuple(class_names), tuple((c,) for c in class_names), NAMES_ONLY)


def builtin_concepts(name: str) -> ConceptList:
    """A shipped list by name (``loveda``, ``potsdam``, ``whdld``, ``gid15``, ``mer``, ``msl``).

    Raises:
        ConceptListError: no list is shipped under ``name``.
    """
    if name not in BUILTIN_FILES:
        raise ConceptListError(
            f"no concept list is shipped for {name!r}; shipped: {list_builtin()}. Pass your own "
            "with --concepts FILE (format: `featcache text --help`), or --concepts names"
        )
    text = resources.files(__name__).joinpath(BUILTIN_FILES[name]).read_text(encoding="utf-8")
    return _parse(json.loads(text), f"builtin:{name}")


def concepts_for_dataset(dataset: str) -> ConceptList:
    """The shipped list of a store's dataset name (``--concepts builtin``).

    Raises:
        ConceptListError: the dataset has no shipped list, saying how to pass one.
    """
    if dataset not in DATASET_LISTS:
        raise ConceptListError(
            f"the store's dataset is {dataset!r}, which has no shipped concept list (shipped: "
            f"{list_builtin()}); pass --concepts NAME for one of those whose classes the store "
            "has, --concepts FILE for your own list (format: `featcache text --help`), or "
            "--concepts names (each class's name only)"
        )
    return builtin_concepts(DATASET_LISTS[dataset])


def read_concepts(path: str | Path) -> ConceptList:
    """A user's concept list file (JSON, or YAML by suffix).

    Raises:
        ConceptListError: missing/unreadable file or a malformed list, naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConceptListError(
            f"--concepts file {str(path)!r} does not exist; pass an existing .json/.yaml file, a "
            f"shipped list ({', '.join(list_builtin())}), 'builtin' or 'names'"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConceptListError(f"cannot read --concepts file {path}: {err}") from err
    return _parse(_load_document(text, path), str(path))


def _load_document(text: str, path: Path) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConceptListError(f"--concepts file {path} is not valid YAML: {err}") from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise ConceptListError(
            f"--concepts file {path} is not valid JSON ({err}); name YAML files .yaml/.yml"
        ) from err


def resolve_concepts(spec: str, dataset: str, class_names: tuple[str, ...]) -> ConceptList:
    """The list ``--concepts spec`` names, for a store of ``dataset`` with ``class_names``.

    ``builtin``: the shipped list of the store's dataset; a shipped name; ``names``: class names
    only; anything else: a file. The result is not yet checked against the classes.
    """
    if spec in _KEYWORDS:
        return _KEYWORDS[spec](dataset, class_names)
    if spec in BUILTIN_FILES:
        return builtin_concepts(spec)
    return read_concepts(spec)


# The --concepts keywords (every other value is a shipped name or a file).
_KEYWORDS: dict[str, Callable[[str, tuple[str, ...]], ConceptList]] = {
    BUILTIN: lambda dataset, _classes: concepts_for_dataset(dataset),
    NAMES_ONLY: lambda _dataset, classes: names_only(classes),
}


def _parse(doc: Any, source: str) -> ConceptList:
    fix = "expected {'classes': [{'name': NAME, 'concepts': [TEXT, ...]}, ...]}"
    entries = doc.get("classes") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConceptListError(f"concept list {source} has no 'classes' list; {fix}")
    names, concepts = [], []
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        items = entry.get("concepts") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ConceptListError(f"concept list {source}: classes[{i}] has no 'name'; {fix}")
        if not isinstance(items, list) or not items or not all(isinstance(c, str) for c in items):
            raise ConceptListError(
                f"concept list {source}: class {name!r} needs a non-empty 'concepts' list of "
                f"strings; {fix}"
            )
        if any(not c.strip() for c in items):
            raise ConceptListError(f"concept list {source}: class {name!r} has an empty concept")
        names.append(name)
        concepts.append(tuple(items))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConceptListError(f"concept list {source} repeats classes {repeated}")
    return ConceptList(tuple(names), tuple(concepts), source)


__all__ = [
    "BUILTIN",
    "BUILTIN_FILES",
    "DATASET_LISTS",
    "NAMES_ONLY",
    "ConceptList",
    "ConceptListError",
    "builtin_concepts",
    "concepts_for_dataset",
    "list_builtin",
    "names_only",
    "read_concepts",
    "resolve_concepts",
]
