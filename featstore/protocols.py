"""Test protocols: which classes a dataset's reported means leave out.

The official RS-MTDF test scripts set the labels of some classes to ignore and drop those classes
from the means (rs-mtdf-reference §7). A store records its dataset's protocol
(``StoreSchema.eval_protocol``); each dataset layout's protocol is set in
``pipelines.sources.conventions``. Here, in the bottom layer, so that ``pipelines`` and
``trainer`` both read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ALL_CLASSES", "OFFICIAL_EDGE_RULES", "Protocol", "edge_rule_departure"]


@dataclass(frozen=True)
class Protocol:
    """A test protocol: which classes the reported means leave out.

    Pixels whose target is an excluded class count nowhere (as the official scripts set them to
    ignore), and the excluded classes leave the means; everything else reports all classes too.

    Attributes:
        name: Short name written into every metrics log (``rs-mtdf-potsdam``, ``all-classes``).
        exclude: Excluded class ids.
        source: Where the rule comes from (official file, paper table, or the user's option).
    """

    name: str
    exclude: tuple[int, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(sorted({int(c) for c in self.exclude})))

    def describe(self, class_names: Sequence[str] = ()) -> str:
        """One line: ``rs-mtdf-potsdam (without 0 impervious_surface)``."""
        if not self.exclude:
            return f"{self.name} (all classes)"
        named = [f"{c} {class_names[c]}" if c < len(class_names) else str(c) for c in self.exclude]
        return f"{self.name} (without {', '.join(named)})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (what a store records)."""
        return {"name": self.name, "exclude": list(self.exclude), "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Protocol:
        """Inverse of ``to_dict``."""
        return cls(str(d["name"]), tuple(d.get("exclude", ())), str(d.get("source", "")))


ALL_CLASSES = Protocol("all-classes", (), "every class counts")


# How DWL's scripts (which RS-MTDF's split files follow) cut each dataset into 512-px tiles
# (rs-mtdf-reference §1): LoveDA 1024 -> 2x2 exactly; Potsdam and DeepGlobe zero-padded.
OFFICIAL_EDGE_RULES = {"loveda": "exact", "potsdam": "pad", "deepglobe": "pad"}
_PAD_CHANGES = {
    "potsdam": "edge tiles zero-padded with clutter (5) labels",
    "deepglobe": "edge tiles zero-padded with unknown (6) labels",
}


def edge_rule_departure(dataset: str, edge_rule: str | None) -> tuple[str, str, str] | None:
    """How a store's (or source's) tiling departs from the official data's, if it does.

    Args:
        dataset: The store's dataset name (``schema.dataset``).
        edge_rule: The rule its tiles were cut with (``schema.edge_rule``; ``""`` or None: not
            recorded, a store written before the rule was kept).

    Returns:
        ``(ours, official, what it changes)``, or None when the rule is the official one or the
        dataset has no official rule (a generic folder).
    """
    official = OFFICIAL_EDGE_RULES.get(dataset)
    if official is None or edge_rule == official:
        return None
    fix = f"re-extract with --edge-rule {official}"
    if not edge_rule:
        return ("not recorded", official, f"tiling unknown (store predates the record); {fix}")
    ours = {
        "overlap_last": "last tile shifted inside the scene (overlapping its neighbour)",
        "pad": "edge tiles zero-padded",
        "exact": "scene cut exactly",
    }[edge_rule]
    theirs = _PAD_CHANGES.get(dataset, f"the official edge rule {official!r}")
    return (edge_rule, official, f"{ours}, not {theirs} as DWL cuts them; {fix}")
