"""The `featcache` command line: one click group; each area registers its commands here.

Commands live in small modules (`cli_extract`, `cli_train`, `cli_report`, `cli_export`, ...) that
parse options into a config dataclass and call the library; heavy imports (torch, timm) happen
inside the commands so `--help` and `info` start without them (tests/app/test_cli_help.py).

Errors: every project error derives from `featstore.errors.FeatcacheError` and carries a message
that names the file or option and the fix. The group catches it here, once, for every command:
the user reads the message (exit code 1), not a traceback. Commands do not catch library errors
themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import click

from featcache import __version__
from featstore.errors import FeatcacheError, FingerprintMismatchError

# Modules that define click commands; each exposes COMMANDS, a list of click.Command.
_COMMAND_MODULES = (
    "featcache.cli_extract",
    "featcache.cli_train",
    "featcache.cli_report",
    "featcache.cli_export",
    "featcache.cli_splits",
    "featcache.cli_plan",
    "featcache.cli_repair",
    "featcache.cli_text",
    "featcache.cli_publish",
)


def _fingerprint_in_cli_words(err: FingerprintMismatchError) -> str:
    # The library's remedy names the Python argument (overwrite=True); a CLI user needs the option.
    diffs = "\n  - ".join(err.differences) or "(fingerprints differ)"
    return (
        f"store {err.url!r} exists with a different fingerprint:\n  - {diffs}\n"
        "Use a new STORE path, or pass --overwrite to delete and recreate the store."
    )


# Errors whose library message names a Python argument where the CLI has an option: their text
# rewritten in CLI words. Every other error is shown as its own message.
_CLI_WORDS: dict[type[FeatcacheError], Callable[[Any], str]] = {
    FingerprintMismatchError: _fingerprint_in_cli_words,
}


def cli_message(err: FeatcacheError) -> str:
    """The text a CLI user reads for ``err``: its message, in CLI words where they differ."""
    for cls in type(err).__mro__:
        if cls in _CLI_WORDS:
            return _CLI_WORDS[cls](err)
    return str(err) or type(err).__name__


class FeatcacheGroup(click.Group):
    """The `featcache` group: the one place where project errors become CLI messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FeatcacheError as err:
            # click prints "Error: <message>" and exits 1, without a traceback.
            raise click.ClickException(cli_message(err)) from err


@click.group(cls=FeatcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
