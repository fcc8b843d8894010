"""Dataset conventions: class names, how masks encode them, edge rules, padding and colours.

Class orders and colour maps follow RS-MTDF / DWL (see docs/design rs-mtdf-reference §1) and
mmsegmentation's dataset classes. Masks come out as class ids ``0..K-1`` with ``IGNORE_INDEX``
(255) for ignored pixels. A convention is one of two kinds:

* index masks (single channel): source value ``v`` is stored as id ``v``, or as ``v - 1`` under
  ``reduce_zero_label`` (mmseg's rule: source 0 = ignore). Source 255, and ``ignore_value`` when
  set, are ignore.
* colour-coded masks (RGB): each colour of ``palette`` maps to an id (or to ignore).

``class_colors`` are the display colours of the classes (what ``predict`` paints), separate from
``palette`` (what mask decoding reads): LoveDA has display colours but index masks.

``protocol`` is the dataset's test protocol (`Protocol`): the classes left out of the reported
means, as the official RS-MTDF test scripts do (rs-mtdf-reference §7).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from featstore.constants import IGNORE_INDEX
from featstore.protocols import ALL_CLASSES, Protocol
from featstore.schema import default_class_colors as default_colors

__all__ = [
    "CONVENTIONS",
    "DEEPGLOBE",
    "GENERIC",
    "IGNORE_INDEX",
    "ISPRS_CLASSES",
    "ISPRS_COLORS",
    "LOVEDA",
    "POTSDAM",
    "POTSDAM_MMSEG",
    "VAIHINGEN_MMSEG",
    "ALL_CLASSES",
    "Convention",
    "Protocol",
    "default_colors",
    "describe_colour",
    "hex_colour",
]

RGB = tuple[int, int, int]


_PURE_NAMES = {
    (0, 0, 0): "black",
    (0, 0, 255): "blue",
    (0, 255, 0): "green",
    (0, 255, 255): "cyan",
    (255, 0, 0): "red",
    (255, 0, 255): "magenta",
    (255, 255, 0): "yellow",
    (255, 255, 255): "white",
}


def hex_colour(rgb: RGB) -> str:
    """``(255, 0, 0)`` -> ``"#ff0000"``."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def describe_colour(rgb: RGB) -> str:
    """Hex code, with the name of pure colours: ``"magenta #ff00ff"``, ``"#9f81b7"``."""
    name = _PURE_NAMES.get(tuple(int(v) for v in rgb))  # type: ignore[arg-type]
    return f"{name} {hex_colour(rgb)}" if name else hex_colour(rgb)


# rs-mtdf-reference §7: the LoveDA test script reports all 7 classes.
LOVEDA_PROTOCOL = Protocol("rs-mtdf-loveda", (), "RS-MTDF LoveDA test script: all 7 classes")
# eval/eval_Potsdam.py sets label 0 to ignore and drops class 0 (impervious surfaces; clutter,
# 5, is kept); the paper's Table 1 lists the five other classes (clutter as "Background").
ISPRS_PROTOCOL = Protocol(
    "rs-mtdf-potsdam",
    (0,),
    "RS-MTDF eval/eval_Potsdam.py and the paper's Table 1: impervious surfaces (0) left out",
)
# The DeepGlobe test script sets label 6 (unknown, also DWL's edge padding) to ignore and drops
# class 6.
DEEPGLOBE_PROTOCOL = Protocol(
    "rs-mtdf-deepglobe", (6,), "RS-MTDF DeepGlobe test script: unknown (6) left out"
)


@dataclass(frozen=True)
class Convention:
    """How one dataset encodes its labels and cuts its scenes.

    Attributes:
        name: Dataset name recorded in the store.
        class_names: Class names in id order (empty: decided at open time).
        edge_rule: Default tiling edge rule (see ``tiling``).
        pad_label: Stored id of padded pixels under the ``"pad"`` rule.
        reduce_zero_label: Index masks: source 0 = ignore and ``v -> v - 1`` (mmseg's rule).
        ignore_value: Index masks: one more source value that means ignore (255 always does).
        palette: Colour-coded masks: ``((r, g, b), id)`` pairs; an id of ``IGNORE_INDEX``
            marks an ignored colour.
        snap_colours: Threshold each channel at 128 before matching (palettes of pure 0/255
            colours only), which absorbs JPEG or resampling noise; otherwise colours must match
            exactly.
        index_masks: Whether single-channel masks are read as index masks even though a
            palette is set (DWL writes Potsdam and DeepGlobe tiles as indices).
        class_colors: Display colour of each class (empty: ``default_colors``).
        source_note: What the source values are, for the class table (e.g. "ISPRS colours").
        protocol: The dataset's test protocol (classes left out of the reported means).
    """

    name: str
    class_names: tuple[str, ...]
    edge_rule: str = "pad"
    pad_label: int = IGNORE_INDEX
    reduce_zero_label: bool = False
    ignore_value: int | None = None
    palette: tuple[tuple[RGB, int], ...] = ()
    snap_colours: bool = False
    index_masks: bool = True
    class_colors: tuple[RGB, ...] = ()
    source_note: str = ""
    protocol: Protocol = ALL_CLASSES

    def with_classes(self, class_names: tuple[str, ...], name: str | None = None) -> Convention:
        """Copy with class names (and optionally the dataset name) filled in."""
        return replace(self, class_names=class_names, name=name or self.name)

    @property
    def colors(self) -> tuple[RGB, ...]:
        """Display colour of each class."""
        return self.class_colors or default_colors(len(self.class_names))

    def class_sources(self) -> tuple[str, ...]:
        """What each class id is in the source masks: its value (index masks) or colour."""
        if self.palette and not self.index_masks:
            by_id = {k: rgb for rgb, k in self.palette}
            return tuple(hex_colour(by_id[k]) for k in range(len(self.class_names)))
        shift = 1 if self.reduce_zero_label else 0
        sources = [str(k + shift) for k in range(len(self.class_names))]
        if self.palette:  # colours, or DWL's index tiles
            by_id = {k: rgb for rgb, k in self.palette}
            sources = [f"{s} or {hex_colour(by_id[k])}" for k, s in enumerate(sources)]
        return tuple(sources)

    def label_rule(self) -> str:
        """One line: how source masks become stored ids (shown above the class table)."""
        ignored = ["255"]
        if self.ignore_value is not None:
            ignored.append(str(self.ignore_value))
        if self.reduce_zero_label:
            ignored.insert(0, "0")
        index_rule = (
            f"index masks, value v -> id v-1 (reduce-zero-label), {' and '.join(ignored)} = ignore"
            if self.reduce_zero_label
            else f"index masks, value v -> id v, {' and '.join(ignored)} = ignore"
        )
        if not self.palette:
            return index_rule
        ignored_colours = [hex_colour(rgb) for rgb, k in self.palette if k == IGNORE_INDEX]
        colour_rule = "colour masks" + (
            f", {', '.join(ignored_colours)} = ignore" if ignored_colours else ""
        )
        note = f" ({self.source_note})" if self.source_note else ""
        return f"{colour_rule}{note}" + (f"; single-channel: {index_rule}" * self.index_masks)


LOVEDA_COLORS: tuple[RGB, ...] = (  # LoveDA's official COLOR_MAP (also mmseg's LoveDADataset)
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
)
LOVEDA = Convention(
    "loveda",
    ("background", "building", "road", "water", "barren", "forest", "agriculture"),
    edge_rule="exact",
    reduce_zero_label=True,  # raw 0 = no-data
    class_colors=LOVEDA_COLORS,
    protocol=LOVEDA_PROTOCOL,
)

ISPRS_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_COLORS: tuple[RGB, ...] = (
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
)
POTSDAM = Convention(
    "potsdam",
    ISPRS_CLASSES,
    edge_rule="overlap_last",
    pad_label=5,  # DWL paints Potsdam padding red = clutter
    # black marks eroded boundaries in ISPRS' "noBoundary" labels: ignore them
    palette=(*((c, k) for k, c in enumerate(ISPRS_COLORS)), ((0, 0, 0), IGNORE_INDEX)),
    snap_colours=True,
    class_colors=ISPRS_COLORS,
    source_note="ISPRS colours",
    protocol=ISPRS_PROTOCOL,
)
# mmseg's potsdam.py / vaihingen.py converters read the ISPRS colour labels with mmcv (BGR) and
# write index PNGs 0 = black (boundary) and 1..6 = the classes in ISPRS order; its
# PotsdamDataset / ISPRSDataset then load them with reduce_zero_label=True (0 -> 255, v -> v-1).
# Tiles are already 512 px; a smaller --tile-size pads with ignore.
POTSDAM_MMSEG = Convention(
    "potsdam",
    ISPRS_CLASSES,
    reduce_zero_label=True,
    class_colors=ISPRS_COLORS,
    protocol=ISPRS_PROTOCOL,
)
# RS-MTDF has no Vaihingen test: its Potsdam rule applies to the same ISPRS class table.
VAIHINGEN_MMSEG = replace(
    POTSDAM_MMSEG,
    name="vaihingen",
    protocol=replace(
        ISPRS_PROTOCOL,
        source="RS-MTDF has no Vaihingen test; its Potsdam rule on the same ISPRS classes: "
        "impervious surfaces (0) left out",
    ),
)
DEEPGLOBE_COLORS: tuple[RGB, ...] = (
    (0, 255, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 255),
    (0, 0, 0),
)
DEEPGLOBE = Convention(
    "deepglobe",
    (
        "urban_land",
        "agriculture_land",
        "rangeland",
        "forest_land",
        "water",
        "barren_land",
        "unknown",
    ),
    edge_rule="pad",
    pad_label=6,  # DWL's zero padding becomes 6 = unknown
    palette=tuple((c, k) for k, c in enumerate(DEEPGLOBE_COLORS)),
    snap_colours=True,
    class_colors=DEEPGLOBE_COLORS,
    source_note="DeepGlobe colours",
    protocol=DEEPGLOBE_PROTOCOL,
)
GENERIC = Convention("folder", ())
CONVENTIONS = {c.name: c for c in (LOVEDA, POTSDAM, DEEPGLOBE, GENERIC)}
