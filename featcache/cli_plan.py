"""CLI command `plan`: the storage planner (``featcache.plan``) on a sample of SOURCE.

Thin: options -> the user's ``ExtractConfig`` (the same source and teacher options as
`extract`) -> ``featcache.plan.plan_storage`` -> table on stdout, PNG/JSON/YAML in ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from featcache.cli_source import source_options, source_values, teacher_options
from featstore.constants import DEFAULT_CROP


def _base_config(source: str, opts: dict[str, Any]) -> Any:
    """The user's extraction settings that the plan keeps (source, teachers, sizes)."""
    from pipelines.config import ExtractConfig, parse_weights

    return ExtractConfig(
        source=source,
        out="(sample)",  # replaced by the planner's temporary store
        tile_size=opts["tile_size"],
        teachers=tuple(opts["teacher"]),
        weights=parse_weights(opts["weights"]),
        tiny=opts["tiny"],
        random_weights=opts["random_weights"],
        keep_padding=opts["keep_padding"],
        batch_size=opts["batch_size"],
        device=opts["device"],
        threads=opts["threads"],
        base_size=opts["base_size"],
        **source_values(opts),
    ).validate()


@click.command("plan")
@click.argument("source", type=click.Path())
@teacher_options(required=True)
@click.option(
    "--budget",
    required=True,
    help="Bytes per tile, all teachers together, with a binary unit: e.g. 8MiB, 512KiB, 1.5GiB.",
)
@click.option(
    "--tiles",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help=(
        "Sample tiles extracted (the first N of SOURCE); PCA is fitted on the first half, the "
        "audit views are drawn from the other half."
    ),
)
@click.option(
    "--views",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Random views per teacher in the fidelity audit (shared by every candidate).",
)
@click.option(
    "--pca-k",
    default="64,128,256",
    show_default=True,
    help="PCA sizes k of the pca-int8:k candidates (those above a teacher's channels skipped).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the audit views.")
@click.option(
    "--out",
    default="featcache-plan",
    show_default=True,
    type=click.Path(),
    help="Folder for plan.json, frontier.png and extract.yaml.",
)
@click.option(
    "--keep-padding/--crop-padding",
    default=True,
    show_default=True,
    help="Padding tokens of zoom < 1 levels, as for extract (changes the bytes).",
)
@click.option("--tile-size", default=512, show_default=True, type=int, help="As for extract.")
@click.option(
    "--base-size", default=DEFAULT_CROP, show_default=True, type=int, help="As for extract."
)
@click.option(
    "--batch-size", default=8, show_default=True, type=int, help="Tiles per teacher forward."
)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda.")
@click.option("--threads", default=1, show_default=True, type=int, help="Torch threads.")
@source_options(with_defaults=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def plan_command(source: str, quiet: bool, **opts: Any) -> None:
    """Plan the storage of SOURCE's cache under a per-tile --budget.

    Extracts a sample of tiles and measures every candidate configuration (level set, scale
    blend, codec and PCA k) against the teachers run on random views: the sample's tokens are
    re-encoded with each candidate codec and read as training reads them, so the cosine
    includes the codec loss (the old product-rule estimate is printed beside it). Prints the
    bytes-vs-cosine frontier, saves it (PNG, JSON) in --out and writes the best configuration
    under the budget as extract.yaml for `featcache extract --config`. Exit 1 when nothing
    fits.
    """
    from featcache.plan import parse_budget, parse_pca_ks, plan_storage, refusal, write_outputs

    budget = parse_budget(opts["budget"])  # bad text fails before any work
    ks = parse_pca_ks(opts["pca_k"])
    if Path(opts["out"]).exists() and not Path(opts["out"]).is_dir():
        raise click.BadParameter(f"{opts['out']} is a file; give a folder", param_hint="--out")
    base = _base_config(source, opts)
    result = plan_storage(
        base, budget, opts["tiles"], opts["views"], ks, opts["seed"], progress=not quiet
    )
    click.echo(_markdown(result))
    paths = write_outputs(result, base, opts["out"])
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
    if result.best is None:
        raise refusal(result.candidates, budget)
    click.echo(
        f"best under the budget: {result.best.label} "
        f"({result.best.bytes_per_tile / 2**20:.4f} MiB/tile, measured cosine "
        f"{result.best.cosine:.4f})"
    )


def _markdown(result: Any) -> str:
    from featcache.plan import markdown

    return markdown(result)


COMMANDS = [plan_command]
