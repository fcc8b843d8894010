"""Options shared by several commands, defined once.

* The teachers to build (`extract`, `plan`): names, weights, tiny, random weights.
* How to read a dataset (`extract`, `plan`, `train --source`): a source read for a store and a
  source read for online training take the same options with the same meaning: layout and split
  file, the label convention of generic layouts, and the bands used as RGB. The values land on
  the fields of the same names of ``pipelines.config.ExtractConfig`` and
  ``trainer.config.DataConfig`` (``SOURCE_FIELDS``), and ``pipelines.sources.open_configured``
  reads them from either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from featstore.constants import IGNORE_INDEX

# pipelines.sources.LAYOUTS, spelled out so `--help` does not import numpy/PIL (a test keeps
# the two equal).
LAYOUT_CHOICES = (
    "auto",
    "loveda",
    "loveda-folder",
    "potsdam",
    "deepglobe",
    "folder",
    "geotiff",
    "potsdam-mmseg",
    "vaihingen-mmseg",
    "loveda-mmseg",
    "mmseg",
)

# option name -> config field of the same meaning (ExtractConfig and DataConfig alike)
SOURCE_FIELDS = {
    "layout": "layout",
    "split_file": "split_file",
    "classes": "classes",
    "reduce_zero_label": "reduce_zero_label",
    "ignore_index": "ignore_index",
    "palette": "palette",
    "bands": "bands",
}


def _all_of(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """One decorator applying ``options`` in order (as if stacked above the command)."""

    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def source_options(with_defaults: bool) -> Callable[[Any], Any]:
    """Decorator adding the source-reading options to a command.

    ``with_defaults``: show the library defaults (`extract`); otherwise every option defaults
    to None, so that only options given on the command line override a YAML config (`train`).
    """

    def default(value: Any) -> dict[str, Any]:
        return {"default": value, "show_default": True} if with_defaults else {"default": None}

    options = [
        click.option(
            "--layout",
            type=click.Choice(LAYOUT_CHOICES),
            help="Source layout; dataset layouts fix the label convention (potsdam-mmseg, "
            "vaihingen-mmseg: mmseg's ISPRS tiles, 0 = ignore; loveda*: 0 = no-data), "
            "folder/mmseg take it from --classes etc.",
            **default("auto"),
        ),
        click.option(
            "--classes",
            default=None,
            metavar="NAMES|FILE",
            help="Class names in id order, comma-separated or a file with one per line "
            "(generic layouts; default: classes.txt beside the data).",
        ),
        click.option(
            "--reduce-zero-label/--no-reduce-zero-label",
            default=None,
            help="Index masks: 0 means ignore and value v is class v-1 (mmseg's "
            "reduce_zero_label) / values are class ids. Not given: ambiguous masks warn.",
        ),
        click.option(
            "--ignore-index",
            default=None,
            type=click.IntRange(0, IGNORE_INDEX),
            metavar="N",
            help="A source mask value that means ignore (255 always does).",
        ),
        click.option(
            "--palette",
            default=None,
            type=click.Path(dir_okay=False),
            help="Colour-coded RGB masks: file with one 'NAME R G B' line per class in id "
            "order ('ignore R G B' for ignored colours), or JSON {NAME: [R, G, B]}.",
        ),
        click.option(
            "--split-file",
            type=click.Path(),
            default=None,
            help="RS-MTDF/DWL split file ('<image> <mask>' per line) instead of the folder "
            "walk; --layout still sets the label convention.",
        ),
        click.option("--bands", default=None, help="1-based source bands used as RGB, e.g. 3,2,1."),
    ]

    return _all_of(options)


def teacher_options(required: bool) -> Callable[[Any], Any]:
    """Decorator adding ``--teacher/-t`` (repeatable), ``--weights NAME=PATH``, ``--tiny`` and
    ``--random-weights`` (the teachers a command builds). ``required``: ``--teacher`` must be
    given on the command line (`extract` may take them from ``--config`` instead)."""
    options = [
        click.option(
            "--teacher",
            "-t",
            multiple=True,
            required=required,
            help="Teacher registry name (repeatable), e.g. dinov2_vitb14, clip_vitl14"
            + ("." if required else " (required, here or as teachers: in --config)."),
        ),
        click.option(
            "--weights",
            multiple=True,
            metavar="NAME=PATH",
            help="Weights of a teacher: a local checkpoint file, or a pretrained tag where the "
            "model hub is reachable (repeatable).",
        ),
        click.option("--tiny", is_flag=True, help="Tiny random-init teachers (smoke runs, tests)."),
        click.option(
            "--random-weights",
            is_flag=True,
            help="Accept random init for full-size teachers given no --weights (refused "
            "otherwise; efficientnet_lite0 still loads its shipped weights).",
        ),
    ]

    return _all_of(options)


def source_values(opts: dict[str, Any]) -> dict[str, Any]:
    """The given source options as config fields (``--bands 3,2,1`` parsed; None: not given)."""
    from pipelines.config import parse_bands

    out = {field: opts.get(name) for name, field in SOURCE_FIELDS.items()}
    out["bands"] = parse_bands(opts.get("bands"))
    return out


__all__ = [
    "LAYOUT_CHOICES",
    "SOURCE_FIELDS",
    "source_options",
    "source_values",
    "teacher_options",
]
