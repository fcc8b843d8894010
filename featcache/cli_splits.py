"""`featcache splits`: list a store's splits and partitions, or save a labeled/unlabeled/val one.

Partitions are drawn by whole source image (`featstore.partitions`), so the overlapping windows
of one scene never land in two sets, and are saved inside the store where `train` finds them
(``--partition NAME``; the one named ``default`` is used when no set option is given).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import click


def _recipe(recipe: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in recipe.items()
    )


def list_lines(store: Any) -> list[str]:
    """The report of ``featcache splits STORE``: splits, then saved partitions."""
    from featstore.partitions import count_line, list_partitions, read_partition, scenes_of

    tiles = store.tiles
    lines = [
        f"store {store.url}: {len(tiles)} tiles from "
        f"{len(scenes_of(tiles, range(len(tiles))))} source images"
    ]
    lines.append(f"{'split':<12} {'tiles':>7} {'images':>7}")
    for split, n in sorted(Counter(t.split for t in tiles).items()):
        idx = [i for i, t in enumerate(tiles) if t.split == split]
        lines.append(f"{split or '(none)':<12} {n:>7} {len(scenes_of(tiles, idx)):>7}")
    names = list_partitions(store.url)
    if not names:
        lines.append(
            f"partitions: none; make one: featcache splits {store.url} --labeled 1/8 "
            "--val 0.1 --seed 0"
        )
    for name in names:
        part = read_partition(store.url, name)
        sets = part.indices(tiles, store.url)
        lines.append(
            f"partition {name}: "
            + ", ".join(f"{k} {count_line(tiles, v)}" for k, v in sets.items())
            + f"  [{_recipe(part.recipe)}]"
        )
    return lines


def _make(store: Any, opts: dict[str, Any]) -> tuple[Any, dict[str, list[str]]]:
    from featstore import partitions as P

    files = {k: opts[f"{k}_file"] for k in P.SETS if opts.get(f"{k}_file")}
    if files:
        if opts.get("labeled") or opts.get("val"):
            raise click.UsageError(
                "give either --labeled/--val shares or split files (--labeled-file ...), not both"
            )
        res = P.partition_from_split_files(store.tiles, files, opts["name"])
        return res.partition, res.unmatched
    if opts.get("val") and not opts.get("labeled"):
        raise click.UsageError("--val needs --labeled (e.g. --labeled 1/8 --val 0.1)")
    pool = tuple(s.strip() for s in opts["pool"].split(",") if s.strip())
    val = P.parse_amount(opts["val"], "--val") if opts.get("val") else None
    part = P.draw_partition(
        store.tiles,
        P.parse_amount(opts["labeled"], "--labeled"),
        val,
        opts["seed"],
        pool,
        opts["name"],
    )
    return part, {}


@click.command("splits")
@click.argument("store_url", metavar="STORE")
@click.option(
    "--labeled",
    help="Labeled share of the pool's source images left after --val: 1/8, 0.125, or a "
    "number of images (20); the rest are unlabeled. Writes a partition.",
)
@click.option(
    "--val",
    help="Val share (or number) of the pool's source images, drawn first. "
    "Default: the store's 'val' split stays the val set.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the shuffle of source images."
)
@click.option(
    "--pool",
    default="train",
    show_default=True,
    help="Split(s) the labeled/unlabeled (and --val) images are drawn from, comma separated.",
)
@click.option(
    "--labeled-file",
    type=click.Path(exists=True, dir_okay=False),
    help="DWL/UniMatch split file of labeled images (lines '<image> [<mask>]').",
)
@click.option(
    "--unlabeled-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Split file of unlabeled images (default: none).",
)
@click.option(
    "--val-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Split file of val images (default: the store's 'val' split).",
)
@click.option(
    "--name",
    default="default",
    show_default=True,
    help="Partition name; train uses 'default' unless told otherwise (--partition).",
)
@click.option("--overwrite", is_flag=True, help="Replace a partition of the same name.")
def splits_cmd(store_url: str, **opts: Any) -> None:
    """List the splits and partitions of STORE, or save a labeled/unlabeled/val partition.

    \b
    featcache splits store.zarr                                   # list
    featcache splits store.zarr --labeled 1/8 --val 0.1 --seed 0  # draw by source image
    featcache splits store.zarr --labeled-file labeled.txt --unlabeled-file unlabeled.txt
    """
    from featstore import open_store

    store = open_store(store_url)
    making = (
        opts.get("labeled")
        or opts.get("val")
        or any(opts.get(f"{k}_file") for k in ("labeled", "unlabeled", "val"))
    )
    if making:
        from featstore.partitions import write_partition

        part, unmatched = _make(store, opts)
        part = dataclasses.replace(part, store_fingerprint=store.fingerprint)
        write_partition(store.url, part, overwrite=opts["overwrite"])
        _report_made(store, part, unmatched)
    for line in list_lines(store):
        click.echo(line)


def _report_made(store: Any, part: Any, unmatched: dict[str, list[str]]) -> None:
    for key, lines in unmatched.items():
        if lines:
            click.echo(
                f"warning: {len(lines)} line(s) of --{key}-file match no tile of the "
                f"store and were skipped, e.g. {lines[:5]}",
                err=True,
            )
    use = "" if part.name == "default" else f" --partition {part.name}"
    click.echo(
        f"saved partition {part.name!r} in {store.url}; train uses it with: "
        f"featcache train --store {store.url}{use} --out RUN"
    )


COMMANDS = [splits_cmd]
