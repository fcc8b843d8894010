"""The `featcache` command line: one click group; each area registers its commands here.

Commands live in small modules (`cli_extract`, `cli_train`, `cli_report`, `cli_export`, ...) that
parse options into a config dataclass and call the library; heavy imports (torch, timm) happen
inside the commands so `--help` and `info` start without them (tests/app/test_cli_help.py).
"""

from __future__ import annotations

import importlib

import click

from featcache import __version__

# Modules that define click commands; each exposes COMMANDS, a list of click.Command.
_COMMAND_MODULES = (
    "featcache.cli_extract",
    "featcache.cli_train",
    "featcache.cli_report",
    "featcache.cli_export",
    "featcache.cli_splits",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featcache")
def main() -> None:
    """Teacher-feature cache for VFM-guided semi-supervised segmentation of aerial imagery."""


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency inside the module: surface it
                raise
            continue
        for command in module.COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":
    main()
