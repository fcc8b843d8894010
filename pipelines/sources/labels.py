"""Label options of generic layouts, and the checks that keep them from being guessed.

A generic layout (``folder``, ``mmseg``, split files without a dataset layout) knows nothing about
its masks, so its convention comes from options (CLI words in brackets):

* class names (``--classes a,b,c`` or ``--classes FILE``, else ``classes.txt``, else the names in
  ``--palette``). The class count is the number of names, never the largest mask value.
* ``reduce_zero_label`` (``--reduce-zero-label`` / ``--no-reduce-zero-label``): source 0 is ignore
  and value ``v`` is id ``v - 1`` (mmseg's rule), or values are ids.
* ``ignore_index`` (``--ignore-index N``): one more source value that means ignore (255 always
  does).
* ``palette`` (``--palette FILE``): colour-coded RGB masks. Text, one line per class in id order,
  ``NAME R G B`` (the name may hold spaces; ``#`` starts a comment line); or JSON, an object
  ``{"NAME": [R, G, B], ...}`` in id order. The reserved name ``ignore`` marks a colour of ignored
  pixels instead of a class. Colours must match exactly.

A dataset can state its own convention in ``labels.json`` beside ``classes.txt``:
``{"reduce_zero_label": false}`` (and optionally ``"ignore_index": N``); ``featcache synth``
writes one. Options fill the same fields and must not contradict it.

When neither ``--reduce-zero-label`` nor ``--no-reduce-zero-label`` (nor ``--ignore-index 0``) is
given, ``check_zero_reading`` compares both readings of the index masks with the class count K,
where ``top`` is the largest source value (255 and the ignore value excluded):

* ``top <= K - 1``: both readings fit. A ``LabelConventionWarning`` shows the value histogram and
  both readings; values are read as ids (0 is a class), the reading this layout always had.
* ``top == K``: only "0 is ignore" fits (e.g. values 1..K with K names): an error naming
  ``--reduce-zero-label``, since reading 0 as a class would need K + 1 names.
* ``top > K``: neither fits: an error showing the histogram and naming ``--classes``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .conventions import IGNORE_INDEX, RGB, Convention
from .errors import LabelConventionError, LabelConventionWarning

__all__ = [
    "LABELS_FILE",
    "LabelOptions",
    "check_zero_reading",
    "convention_with_options",
    "format_histogram",
    "label_options",
    "palette_convention",
    "read_class_names",
    "read_classes_txt",
    "read_labels_file",
    "read_palette",
]

IGNORE_NAME = "ignore"


@dataclass(frozen=True)
class LabelOptions:
    """Label options of generic layouts (see the module docstring).

    Attributes:
        class_names: Class names in id order (empty: ``classes.txt`` or the palette's names).
        reduce_zero_label: True: 0 = ignore and ``v -> v - 1``; False: values are ids; None: not
            stated (checked by ``check_zero_reading``).
        ignore_index: A source value that means ignore, or None.
        palette: Palette file of colour-coded masks, or None.
    """

    class_names: tuple[str, ...] = ()
    reduce_zero_label: bool | None = None
    ignore_index: int | None = None
    palette: Path | None = None

    @property
    def given(self) -> list[str]:
        """CLI names of the options that were set."""
        flags = []
        if self.class_names:
            flags.append("--classes")
        if self.reduce_zero_label is not None:
            flags.append(
                "--reduce-zero-label" if self.reduce_zero_label else "--no-reduce-zero-label"
            )
        if self.ignore_index is not None:
            flags.append("--ignore-index")
        if self.palette is not None:
            flags.append("--palette")
        return flags


def _check_names(names: Sequence[str], where: str) -> tuple[str, ...]:
    out = tuple(names)
    if not out:
        raise LabelConventionError(f"{where} lists no class names; give one name per class")
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise LabelConventionError(f"{where} repeats class names {repeated}; names must be unique")
    if IGNORE_NAME in out:
        raise LabelConventionError(
            f"{where} names a class {IGNORE_NAME!r}, which is reserved for ignored pixels; "
            "rename it"
        )
    return out


def read_class_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Class names from ``--classes``: a file (one name per line) or comma-separated names."""
    if not isinstance(spec, str):
        return _check_names([str(n) for n in spec], "--classes")
    path = Path(spec)
    if path.is_file():
        lines = path.read_text().splitlines()
        return _check_names([n.strip() for n in lines if n.strip()], f"--classes file {path}")
    return _check_names([n.strip() for n in spec.split(",") if n.strip()], "--classes")


def _rgb(values: Sequence[object], where: str) -> RGB:
    try:
        rgb = tuple(int(str(v)) for v in values)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise LabelConventionError(
            f"{where}: expected three integers 0..255 (R G B), got {list(values)}"
        )
    return rgb  # type: ignore[return-value]


def _palette_entries(path: Path, text: str) -> list[tuple[str, RGB]]:
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LabelConventionError(f"--palette {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise LabelConventionError(
                f'--palette {path}: expected a JSON object {{"NAME": [R, G, B], ...}}'
            )
        return [(str(k), _rgb(v, f"--palette {path} entry {k!r}")) for k, v in data.items()]
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if len(tokens) < 4:
            raise LabelConventionError(
                f"--palette {path} line {lineno}: expected 'NAME R G B', got {line.strip()!r}"
            )
        entries.append(
            (" ".join(tokens[:-3]), _rgb(tokens[-3:], f"--palette {path} line {lineno}"))
        )
    return entries


def read_palette(path: str | Path) -> tuple[tuple[str, ...], tuple[tuple[RGB, int], ...]]:
    """Class names and ``(colour, id)`` pairs of a palette file (format: module docstring).

    Raises:
        LabelConventionError: Unreadable file, bad lines, repeated names or colours.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelConventionError(f"cannot read --palette {path}: {exc}") from exc
    entries = _palette_entries(path, text)
    names = _check_names([n for n, _ in entries if n != IGNORE_NAME], f"--palette {path}")
    colours = [c for _, c in entries]
    repeated = sorted({c for c in colours if colours.count(c) > 1})
    if repeated:
        raise LabelConventionError(
            f"--palette {path} gives colours {repeated} more than once; each colour must "
            "name one class"
        )
    ids = iter(range(len(names)))
    pairs = tuple((c, IGNORE_INDEX if n == IGNORE_NAME else next(ids)) for n, c in entries)
    return names, pairs


def format_histogram(hist: np.ndarray, limit: int = 16) -> str:
    """``"0: 120 px (11.7 %), 1: ..."`` for the non-zero entries of a 256-bin histogram."""
    total = int(hist.sum())
    values = np.flatnonzero(hist)
    parts = [f"{v}: {int(hist[v])} px ({100 * hist[v] / total:.1f} %)" for v in values[:limit]]
    more = f", ... ({values.size - limit} more values)" if values.size > limit else ""
    return ", ".join(parts) + more if parts else "no labelled pixels"


def check_zero_reading(
    hist: np.ndarray, names: Sequence[str], names_from: str, opts: LabelOptions, where: str
) -> None:
    """Compare the two readings of source value 0 with the class count (rules: module docstring).

    Args:
        hist: 256-bin histogram of source values over all masks.
        names: Class names (K = their number).
        names_from: Where the names came from, for messages (``classes.txt``, ``--classes``).
        opts: The label options (only called when ``reduce_zero_label`` is None).
        where: The source, for messages.

    Raises:
        LabelConventionError: Only one or neither reading fits the class count.
    """
    counted = hist.copy()
    counted[IGNORE_INDEX] = 0
    if opts.ignore_index is not None:
        counted[opts.ignore_index] = 0
    values = np.flatnonzero(counted)
    if values.size == 0:
        return
    k, top, shown = len(names), int(values[-1]), format_histogram(hist)
    if top > k:
        raise LabelConventionError(
            f"masks in {where} hold values up to {top} but {names_from} names {k} classes, "
            f"which fits neither reading (0 is a class: values 0..{k - 1}; 0 is ignore: values "
            f"1..{k}). Value histogram: {shown}. List every class with --classes NAME,NAME,... "
            "(or classes.txt), in id order"
        )
    if top == k:
        raise LabelConventionError(
            f"masks in {where} hold values up to {k} and {names_from} names {k} classes: that "
            f"fits only if 0 means ignore and value v is class v-1. Value histogram: {shown}. "
            "Pass --reduce-zero-label to read them that way (or list one more class with "
            "--classes if 0 is a class)"
        )
    zero = (
        "contain value 0" if counted[0] else f"never contain 0 (class {names[0]!r} would be empty)"
    )
    warnings.warn(
        f"masks in {where} {zero} and no label convention was given. Value histogram: {shown}. "
        f"Two readings fit the {k} classes of {names_from}: (a) 0 is a class, id = value "
        f"(0 -> {names[0]!r}); (b) 0 is ignore, id = value - 1 (1 -> {names[0]!r}, mmseg's "
        "reduce_zero_label). Using (a); pass --no-reduce-zero-label to confirm it or "
        "--reduce-zero-label for (b)",
        LabelConventionWarning,
        stacklevel=3,
    )


def convention_with_options(base: Convention, opts: LabelOptions, layout: str) -> Convention:
    """A dataset layout's convention, checked against the label options given with it.

    Dataset layouts fix their convention; an option that contradicts it is refused rather than
    silently preferred. ``--classes`` may rename the classes, keeping their number.

    Raises:
        LabelConventionError: A contradicting option.
    """
    conflicts = []
    if opts.reduce_zero_label is not None and opts.reduce_zero_label != base.reduce_zero_label:
        conflicts.append(
            "--reduce-zero-label" if opts.reduce_zero_label else "--no-reduce-zero-label"
        )
    if opts.ignore_index is not None:
        conflicts.append("--ignore-index")
    if opts.palette is not None:
        conflicts.append("--palette")
    if conflicts:
        raise LabelConventionError(
            f"--layout {layout} fixes its label convention ({base.label_rule()}); drop "
            f"{', '.join(conflicts)}, or use --layout folder / mmseg for your own convention"
        )
    if opts.class_names and len(opts.class_names) != len(base.class_names):
        raise LabelConventionError(
            f"--classes gives {len(opts.class_names)} names but --layout {layout} has "
            f"{len(base.class_names)} classes ({', '.join(base.class_names)}); give "
            f"{len(base.class_names)} names or drop --classes"
        )
    return base.with_classes(opts.class_names) if opts.class_names else base


def read_classes_txt(folders: Sequence[Path]) -> tuple[tuple[str, ...], str] | None:
    """Names from the first ``classes.txt`` in ``folders`` and its path, or None."""
    for folder in folders:
        path = folder / "classes.txt"
        if path.is_file():
            return read_class_names(str(path)), str(path)
    return None


LABELS_FILE = "labels.json"
_LABEL_KEYS = {"reduce_zero_label": bool, "ignore_index": int}


def read_labels_file(folders: Sequence[Path], opts: LabelOptions) -> LabelOptions:
    """Fill unset options from a ``labels.json`` beside ``classes.txt`` (a dataset's own note).

    Raises:
        LabelConventionError: Unknown keys, wrong types, or a value an option contradicts.
    """
    path = next((f / LABELS_FILE for f in folders if (f / LABELS_FILE).is_file()), None)
    if path is None:
        return opts
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabelConventionError(f"cannot read {path}: {exc}; fix or delete the file") from exc
    data = data if isinstance(data, dict) else {"(not an object)": data}
    bad = sorted(set(data) - set(_LABEL_KEYS))
    # bool is an int subclass: a "true" ignore_index is refused explicitly
    bad += [k for k, t in _LABEL_KEYS.items() if k in data and type(data[k]) is not t]
    if not bad and not 0 <= data.get("ignore_index", 0) <= 255:
        bad.append("ignore_index")
    if bad:
        raise LabelConventionError(
            f"{path}: unexpected {bad}; write an object with reduce_zero_label (true/false) "
            "and optionally ignore_index (0..255)"
        )
    updates = {}
    for key, value in data.items():
        given = getattr(opts, key)
        if given is not None and given != value:
            raise LabelConventionError(
                f"--{key.replace('_', '-')} {given} contradicts {path} ({key}: {value}); drop "
                "the option or fix the file"
            )
        updates[key] = value
    return replace(opts, **updates)


def palette_convention(name: str, palette: Path, opts: LabelOptions) -> Convention:
    """Convention of colour-coded masks read through a ``--palette`` file.

    Raises:
        LabelConventionError: A bad palette, or index-mask options given with it.
    """
    names, pairs = read_palette(palette)
    if opts.class_names and opts.class_names != names:
        raise LabelConventionError(
            f"--classes {list(opts.class_names)} differs from the names in --palette "
            f"{palette} {list(names)}; drop --classes (the palette names the classes)"
        )
    for flag in ("--reduce-zero-label", "--no-reduce-zero-label", "--ignore-index"):
        if flag in opts.given:
            raise LabelConventionError(
                f"{flag} applies to index masks, but --palette reads colour-coded masks; drop "
                f"{flag} (mark ignored colours with an 'ignore R G B' line in the palette)"
            )
    by_id = {k: rgb for rgb, k in pairs}
    return Convention(
        name,
        names,
        palette=pairs,
        index_masks=False,
        class_colors=tuple(by_id[k] for k in range(len(names))),
        source_note=f"--palette {palette.name}",
    )


def label_options(
    class_names: Sequence[str] | str | None,
    reduce_zero_label: bool | None,
    ignore_index: int | None,
    palette: str | Path | None,
) -> LabelOptions:
    """``LabelOptions`` from ``open_source`` arguments (class names parsed, values checked)."""
    if ignore_index is not None and not 0 <= int(ignore_index) <= 255:
        raise LabelConventionError(
            f"--ignore-index {ignore_index} is not an 8-bit mask value; give 0..255"
        )
    return LabelOptions(
        class_names=read_class_names(class_names) if class_names else (),
        reduce_zero_label=reduce_zero_label,
        ignore_index=None if ignore_index is None else int(ignore_index),
        palette=None if palette is None else Path(palette),
    )
