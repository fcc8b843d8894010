"""The class table shown after ``extract`` and by ``info``: what each stored id is and how much.

It reads only the store schema, so ``info`` shows exactly what extraction recorded; stores written
before the label fields existed say so instead of guessing.
"""

from __future__ import annotations

from typing import Any

from featstore.protocols import Protocol

from .conventions import hex_colour

__all__ = ["class_table_lines"]


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:5.1f} %" if total else "    - "


def _pixels(n: int | None, total: int) -> str:
    return "not recorded" if n is None else f"{n:>12}  {_share(n, total)}"


def class_table_lines(schema: Any) -> list[str]:
    """Lines of the class table of a ``StoreSchema``.

    Columns: stored id, class name, source value (or colour), display colour, pixels and share
    of the labeled pixels; then the ignored pixels (their share completes 100 %).
    """
    names = schema.class_names
    if not names:
        return ["classes:     none (unlabeled source)"]
    sources = schema.class_sources or ("-",) * len(names)
    colours = [hex_colour(c) for c in schema.class_colors] or ["-"] * len(names)
    stats = schema.label_stats
    rule = schema.label_rule or "not recorded (store written before label conventions were kept)"
    nw = max(len("(ignore)"), *(len(n) for n in names))
    sw = max(len("source"), *(len(s) for s in sources))

    def row(k: object, name: str, source: str, colour: str, pixels: str) -> str:
        return f"  {k:>3}  {name:<{nw}}  {source:<{sw}}  {colour:<7}  {pixels}"

    if stats is None:
        counts, ignored, total = [None] * len(names), None, 0
    else:
        counts, ignored = stats["class_pixels"], stats["ignore_pixels"]
        total = sum(counts) + ignored
    lines = [
        f"labels:      {rule}",
        row("id", "class", "source", "colour", f"{'pixels':>12}  share"),
    ]
    for k, name in enumerate(names):
        lines.append(row(k, name, sources[k], colours[k], _pixels(counts[k], total)))
    lines.append(row(schema.ignore_index, "(ignore)", "", "", _pixels(ignored, total)))
    if stats is None:
        lines.append("  pixel counts: not recorded (store written before they were kept)")
    else:
        lines.append(
            f"  {stats['labeled_tiles']} labeled tiles ({total} px), "
            f"{stats['unlabeled_tiles']} unlabeled tiles"
        )
    lines.append(_protocol_line(schema))
    return lines


def _protocol_line(schema: Any) -> str:
    recorded = getattr(schema, "eval_protocol", None)
    if not recorded:
        return "protocol:    not recorded (store written before protocols were kept): all classes"
    text = Protocol.from_dict(recorded).describe(schema.class_names)
    return f"protocol:    {text}; override with --exclude-classes on train / evaluate"
