"""`featcache repair SOURCE STORE [extract options]`: re-extract exactly the damaged shards.

Repair is the extraction run again where the store is damaged, so it takes the extraction's own
SOURCE and options: the same command line with `repair` in place of `extract`. Its options are
`extract`'s (one list, never copied by hand), less those that make no sense for a repair.
"""

from __future__ import annotations

from typing import Any

import click

from featcache.cli_extract import _config, _fields, _with_config_file, extract_command

# The one extract parameter a repair does not take: it never deletes a store. --scheduler and
# --quiet are accepted so the extract command line works unchanged; a repair rewrites few
# shards, in this process, and prints what it repaired rather than a progress bar.
_NOT_FOR_REPAIR = {"overwrite"}
_DEFAULTS = {"overwrite": False, "scheduler": "local"}


def _repair(source: str, store: str, config_file: str | None, quiet: bool, **opts: Any) -> None:
    """Re-extract the shards of STORE that `featcache verify` finds damaged, restore its
    metadata, and check it. Give the SOURCE and options of the original `featcache extract`
    (a different source, teacher, weights file or option is refused, naming what differs)."""
    from pipelines.repair import repair_store

    opts.update(_DEFAULTS)
    if config_file:
        cfg = _with_config_file(_fields(source, store, **opts), config_file)
    else:
        cfg = _config(source, store, **opts)
    report = repair_store(cfg)
    click.echo("\n".join(report.lines()))
    click.echo(f"OK: {store} repaired and verified")


repair_command = click.Command(
    "repair",
    callback=_repair,
    params=[p for p in extract_command.params if p.name not in _NOT_FOR_REPAIR],
    help=_repair.__doc__,
    short_help="Re-extract the damaged shards of STORE; verify passes afterwards.",
)

COMMANDS = [repair_command]
