"""CLI commands of the extraction stage: `extract`, `info`, `verify`, `synth`.

Thin by design: options → `ExtractConfig` → `pipelines.extract.run_extraction`. Library errors
(typed, with a remedy in the message) reach the user through `featcache.cli`: message, exit 1.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from featcache.cli_source import source_options, source_values, teacher_options
from featstore.constants import DEFAULT_CODEC, DEFAULT_CROP, MULTI_SCALES


def _config(source: str, store: str, **opts: Any) -> Any:
    """The validated ``ExtractConfig`` of the options."""
    return _fields(source, store, **opts).validate()


# ExtractConfig field -> extract parameter, where the names differ (a config file's keys are
# field names; what the command line gave is looked up by parameter).
_PARAM_OF_FIELD = {"teachers": "teacher", "store_pixels": "no_pixels"}


def _with_config_file(cfg: Any, path: str) -> Any:
    """``cfg`` with the values of the config file ``path``, except options typed on the
    command line (click's parameter source), which keep their value; validated."""
    import dataclasses

    from pipelines.config import load_extract_config

    ctx = click.get_current_context()
    typed = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    from_file = {
        field: value
        for field, value in load_extract_config(path).items()
        if ctx.get_parameter_source(_PARAM_OF_FIELD.get(field, field)) not in typed
    }
    return dataclasses.replace(cfg, **from_file).validate()


def _fields(source: str, store: str, **opts: Any) -> Any:
    """The ``ExtractConfig`` of the options, not yet validated (a config file may add to it)."""
    from pipelines.config import (
        ExtractConfig,
        parse_codec,
        parse_scales,
        parse_weights,
    )

    return ExtractConfig(
        source=source,
        out=store,
        tile_size=opts["tile_size"],
        edge_rule=opts["edge_rule"],
        teachers=tuple(opts["teacher"]),
        weights=parse_weights(opts["weights"]),
        tiny=opts["tiny"],
        random_weights=opts["random_weights"],
        scales=parse_scales(opts["scales"]),
        flip=opts["flip"],
        keep_padding=opts["keep_padding"],
        codec=parse_codec(opts["codec"]),
        batch_size=opts["batch_size"],
        device=opts["device"],
        scheduler=opts["scheduler"],
        tiles_per_shard=opts["tiles_per_shard"],
        store_pixels=not opts["no_pixels"],
        overwrite=opts["overwrite"],
        add=opts["add"],
        break_lock=opts["break_lock"],
        threads=opts["threads"],
        base_size=opts["base_size"],
        limit=opts["limit"],
        **source_values(opts),
    )


EDGE_RULE_CHOICES = ("exact", "overlap_last", "pad")  # pipelines.sources.EDGE_RULES


@contextlib.contextmanager
def _echo_label_warnings() -> Iterator[None]:
    """Show label-convention warnings on stderr as `warning: ...` lines, when they happen."""
    import warnings

    from pipelines.sources.errors import LabelConventionWarning

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, LabelConventionWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            default(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        default = warnings.showwarning
        warnings.simplefilter("always", LabelConventionWarning)
        warnings.showwarning = show
        yield


@click.command("extract")
@click.argument("source", type=click.Path())
@click.argument("store")
@teacher_options(required=False)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="YAML of extraction settings, keys = ExtractConfig field names (scales, flip, codec, "
    "teachers, ...; `featcache plan` writes one). Options given on the command line override it.",
)
@click.option(
    "--scales",
    default=",".join(f"{s:g}" for s in MULTI_SCALES),
    show_default=True,
    help="Cached scales, e.g. 1 or 1,2 (default covers the 0.5-2.0 rescale range).",
)
@click.option(
    "--flip/--no-flip",
    default=True,
    show_default=True,
    help="Also cache an h-flipped copy of every scale.",
)
@click.option(
    "--keep-padding/--crop-padding",
    default=True,
    show_default=True,
    help="Store every token of a zoom < 1 level's padded canvas (official behaviour, needed "
    "to train with --unmasked), or only the tokens the tile's points read (13 %% fewer bytes "
    "for DINOv2-B + CLIP-L at the default levels; CutMix cells that straddle padding mix in the "
    "level's edge token instead of the padding token).",
)
@click.option(
    "--codec",
    default=DEFAULT_CODEC,
    show_default=True,
    help="fp16 | int8 | pca:K | pca-int8:K (PCA-K coefficients as int8), or any codec "
    "registered in featstore.codecs.",
)
@click.option(
    "--batch-size", default=8, show_default=True, type=int, help="Tiles per teacher forward."
)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda.")
@click.option(
    "--scheduler",
    default="local",
    show_default=True,
    help="local | local:N (N worker processes) | tcp://host:port.",
)
@click.option(
    "--tiles-per-shard",
    default=16,
    show_default=True,
    type=int,
    help="Tiles per storage chunk (and per resumable unit of work).",
)
@click.option(
    "--tile-size",
    default=512,
    show_default=True,
    type=int,
    help="Side in px of the tiles cut from each source image.",
)
@click.option(
    "--edge-rule",
    default=None,
    type=click.Choice(EDGE_RULE_CHOICES),
    help="How scene edges are tiled: exact (side a multiple of the tile), "
    "overlap_last (last tile shifted inside), pad (last tile zero-padded with the "
    "dataset's pad label: DWL's cut of the official Potsdam/DeepGlobe data). "
    "Default: the layout's (LoveDA exact, Potsdam overlap_last, others pad).",
)
@click.option(
    "--base-size",
    default=DEFAULT_CROP,
    show_default=True,
    type=int,
    help="Canvas px of a scale-1 tile (the trainer's crop size).",
)
@source_options(with_defaults=True)
@click.option("--no-pixels", is_flag=True, help="Do not store images and masks.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Delete an existing featcache store at STORE and start over (anything else "
    "at STORE is refused, never deleted).",
)
@click.option(
    "--add",
    is_flag=True,
    help="Add the given teachers (or new --scales/--flip levels of stored teachers) to the "
    "finished store at STORE, keeping what it holds as it is; teachers it holds must be given "
    "with their stored settings. When SOURCE yields the stored tiles and new ones after them "
    "(a new scene), the new tiles are appended instead (with the store's teachers and levels). "
    "Re-run the same command to resume a killed addition.",
)
@click.option(
    "--break-lock",
    is_flag=True,
    help="Remove another writer's lock on STORE (featcache.lock) first: only when "
    "that writer is dead, e.g. killed on another host.",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=int,
    help="Torch threads per process (fixed for reproducible numerics).",
)
@click.option("--limit", default=None, type=int, help="Only the first N tiles (smoke runs).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract_command(
    source: str, store: str, quiet: bool, config_file: str | None, **opts: Any
) -> None:
    """Run teachers once per tile of SOURCE and write their tokens into STORE.

    Re-running the same command resumes an interrupted extraction. With --config FILE, the
    file's settings replace the defaults; options typed on the command line still win.
    """
    from pipelines.extract import run_extraction
    from pipelines.incremental import run_addition

    if config_file:
        cfg = _with_config_file(_fields(source, store, **opts), config_file)
    else:
        cfg = _config(source, store, **opts)
    note = _random_note(cfg.teachers, cfg.weights, cfg.tiny, cfg.random_weights)
    if note:
        click.echo(note)
    with _echo_label_warnings():
        url = (run_addition if cfg.add else run_extraction)(cfg, progress=not quiet)
    summary = _summary(url)
    click.echo(f"wrote {url}")
    click.echo("\n".join(summary))


def _summary(url: str) -> list[str]:
    """What `extract` wrote, as the store recorded it (so it matches `info`): the teachers with
    the weights each ran with, then the class table."""
    from featstore import open_store
    from pipelines.sources.classtable import class_table_lines

    schema = open_store(url).schema
    return [*(_teacher_line(entry) for entry in schema.teachers), *class_table_lines(schema)]


def _teacher_line(entry: Any) -> str:
    """One stored teacher: architecture, the weights it ran with, input, grid, codec."""
    from featstore import get_codec

    spec = entry.spec
    return (
        f"teacher {spec.name}: {spec.family} {spec.arch}, weights "
        f"{spec.weights or 'random'}, input {spec.input_size} px, stride "
        f"{spec.stride}, {spec.channels} ch, layer {spec.layer}; codec "
        f"{get_codec(entry.codec).to_dict()}"
    )


def _random_note(
    names: tuple[str, ...], weights: dict[str, str], tiny: bool, accepted: bool
) -> str | None:
    """First line of a run whose full-size teachers run with random weights (--random-weights)."""
    from pipelines.teachers import plan_weights

    if tiny or not accepted:  # tiny is random by definition; without the flag it is refused
        return None
    rand = [n for n in names if plan_weights(n, weights.get(n)) in (None, "random")]
    if not rand:
        return None
    return (
        f"random weights (--random-weights): {', '.join(rand)}; their features carry no "
        "pretrained knowledge (smoke runs only)"
    )


def _level_bytes(url: str, teacher: str, key: str) -> int:
    """Bytes on disk of a level (features + codec side data)."""
    from featstore.layout import aux_path, feature_path, store_fs

    fs, root = store_fs(url)
    total = 0
    for rel in (feature_path(teacher, key), aux_path(teacher, key)):
        path = f"{root}/{rel}"
        if fs.exists(path):
            total += int(fs.du(path))
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _padding_note(padding_tokens: str) -> str:
    if padding_tokens == "cropped":
        return "zoom < 1 levels store only the tokens the tile reads (--crop-padding)"
    return "every canvas token stored (--keep-padding, the default)"


def _info_lines(url: str) -> list[str]:
    from featstore import get_codec, open_store
    from featstore.text import text_summary
    from pipelines.sources.classtable import class_table_lines

    store = open_store(url)
    schema = store.schema
    done = store.done()
    splits = Counter(t.split for t in store.tiles)
    lines = [
        f"store:       {url}",
        f"dataset:     {schema.dataset}",
        f"tiles:       {int(done.sum())}/{len(done)} done, "
        f"{'complete' if store.complete else 'INCOMPLETE (re-run extract to resume)'} "
        f"(tile {schema.tile_size} px, base {schema.base_size} px, "
        f"{schema.tiles_per_shard} per shard)",
        "splits:      " + ", ".join(f"{k or '-'}={v}" for k, v in sorted(splits.items())),
        f"classes:     {', '.join(schema.class_names) or '-'} (ignore {schema.ignore_index})",
        *class_table_lines(schema),
        f"pixels:      {'stored' if schema.store_pixels else 'not stored'}",
        f"padding:     {_padding_note(schema.padding_tokens)}",
        f"fingerprint: {store.fingerprint}",
        f"text:        {text_summary(store) or '-'}",  # Co2S class embeddings (`featcache text`)
    ]
    for entry in schema.teachers:
        spec, codec = entry.spec, get_codec(entry.codec)
        lines.append(_teacher_line(entry))
        for level in entry.levels:
            g = store.level_geometry(spec.name, level.key).grid  # stored (may be cropped)
            size = _human(_level_bytes(url, spec.name, level.key))
            lines.append(
                f"  level {level.key}: scale {level.scale:g}"
                f"{' flipped' if level.flipped else ''}, grid {g}x{g} x "
                f"{codec.stored_channels(spec.channels)} ch, {size} on disk"
                f"{_added_note(schema, spec.name, level.key)}"
            )
    return lines


def _added_note(schema: Any, teacher: str, key: str) -> str:
    """Which `extract --add` added the level (nothing for the original extraction's levels)."""
    part = schema.part_of(teacher, key)
    return "" if part is None else f", added later (extract --add, part {part.name})"


@click.command("info")
@click.argument("store")
def info_command(store: str) -> None:
    """Describe STORE: dataset, tiles, splits, classes, teachers, levels, sizes, fingerprint."""
    from pipelines.publish import read_card

    lines = _info_lines(store)
    card = read_card(store)  # a published store's dataset card (`featcache publish`)
    if card:
        lines += ["", "card (README.md in the store):", card.rstrip()]
    click.echo("\n".join(lines))


@click.command("verify")
@click.argument("store")
def verify_command(store: str) -> None:
    """Check STORE (done markers, fingerprint, checksums); exit 1 when a problem is found."""
    from featstore import verify_store

    problems = verify_store(store)
    if problems:
        for problem in problems:
            click.echo(f"PROBLEM: {problem}")
        click.echo(
            "Fix: run `featcache repair SOURCE STORE` with the extract command's options: it "
            "re-extracts exactly the damaged shards and restores edited metadata (or re-run "
            "`featcache extract ... --overwrite` to rebuild the whole store)"
        )
        click.get_current_context().exit(1)
    click.echo(f"OK: {store} verified")


@click.command("synth")
@click.argument("out", type=click.Path())
@click.option(
    "--n-images",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Number of synthetic scenes.",
)
@click.option(
    "--size", default=256, show_default=True, type=click.IntRange(min=32), help="Image edge in px."
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same bytes)."
)
def synth_command(out: str, n_images: int, size: int, seed: int) -> None:
    """Write a small synthetic dataset (images/ + masks/) into OUT."""
    from pipelines.synthetic import generate_synthetic

    if Path(out).exists() and not Path(out).is_dir():
        raise click.BadParameter(
            f"{out} is a file; pass a folder for the dataset", param_hint="OUT"
        )
    generate_synthetic(out, n_images=n_images, size=size, seed=seed)
    click.echo(f"wrote {n_images} synthetic images of {size} px to {out}")


@click.command("bank")
@click.argument("store")
@click.option(
    "--teacher",
    "-t",
    multiple=True,
    help="Teacher in the store to bank (repeatable; default: all of them).",
)
@click.option(
    "--weights",
    multiple=True,
    metavar="NAME=PATH",
    help="Weights the store was extracted with (repeatable).",
)
@click.option("--tiny", is_flag=True, help="The store was extracted with --tiny teachers.")
@click.option(
    "--random-weights",
    is_flag=True,
    help="The store was extracted with --random-weights (accept random init).",
)
@click.option(
    "--k", "k", default=8, show_default=True, type=click.IntRange(min=1), help="Views per tile."
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the recorded view draws."
)
@click.option(
    "--batch-size", default=16, show_default=True, type=int, help="Views per teacher forward."
)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda.")
@click.option("--overwrite", is_flag=True, help="Replace a bank drawn with other parameters.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bank_command(
    store: str,
    teacher: tuple[str, ...],
    weights: tuple[str, ...],
    tiny: bool,
    random_weights: bool,
    k: int,
    seed: int,
    batch_size: int,
    device: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Add an exact view bank to STORE: K recorded views per tile with the teacher run on each.

    Training with `target_mode: view_bank` then draws views whose targets equal the online
    teacher's. Resumable: re-run the same command after a crash.
    """
    from pipelines.config import parse_weights
    from pipelines.viewbank import build_view_bank

    build_view_bank(
        store,
        teacher_names=teacher or None,
        weights=parse_weights(weights),
        tiny=tiny,
        k=k,
        seed=seed,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
        progress=not quiet,
        random_weights=random_weights,
    )
    click.echo(f"view bank of {k} views per tile written to {store}")


COMMANDS = [extract_command, info_command, verify_command, synth_command, bank_command]
