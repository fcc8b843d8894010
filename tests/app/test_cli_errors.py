"""Project errors end a CLI command in their message and exit code 1, never a traceback.

One place converts them: the `featcache` group (featcache/cli.py). The cases below were
tracebacks when each command kept its own hand-kept list of error types.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from featcache.cli import FeatcacheGroup, cli_message, main
from featcache.demo import DemoError
from featstore.errors import FeatcacheError, FingerprintMismatchError, MissingTeacherError
from pipelines.synthetic import generate_synthetic
from trainer.losses import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[2]


def _tile_ids(path: Path, ids: list[str]) -> str:
    path.write_text("".join(f"{i}\n" for i in ids))
    return str(path)


def test_online_train_with_an_unknown_teacher_is_a_message(tmp_path: Path) -> None:
    data = generate_synthetic(tmp_path / "data", n_images=4, size=64, seed=0)
    ids = [f"images/{p.stem}" for p in sorted((data / "images").iterdir())]
    assert len(ids) == 4
    out = tmp_path / "run"
    argv = [
        "train",
        "--mode",
        "online",
        "--teacher",
        "typo",
        "--source",
        str(data),
        "--tile-size",
        "64",
        "--labeled",
        _tile_ids(tmp_path / "l.txt", ids[:1]),
        "--unlabeled",
        _tile_ids(tmp_path / "u.txt", ids[1:3]),
        "--val",
        _tile_ids(tmp_path / "v.txt", ids[3:]),
        "--no-progress",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)  # not the library error escaping
    assert "Traceback" not in res.output
    assert res.output.startswith("Error: unknown teacher 'typo'; known teachers: ")
    assert not out.exists()


def _group_raising(err: Exception) -> click.Group:
    group = FeatcacheGroup()

    @group.command("boom")
    def boom() -> None:
        raise err

    return group


@pytest.mark.parametrize(
    ("err", "text"),
    [
        # FloatingPointError, RuntimeError and KeyError subclasses: each caught before only by
        # the commands whose list named it.
        (
            NonFiniteLossError("loss is nan at step 3; lower --lr"),
            "loss is nan at step 3; lower --lr",
        ),
        (
            DemoError("--data x does not exist; pass a dataset folder"),
            "--data x does not exist; pass a dataset folder",
        ),
        (
            MissingTeacherError("teacher 'sam' is not in the store"),
            "teacher 'sam' is not in the store",
        ),  # plain, not KeyError's quoted repr
    ],
)
def test_any_project_error_is_its_message_and_exit_1(err: Exception, text: str) -> None:
    res = CliRunner().invoke(_group_raising(err), ["boom"])
    assert res.exit_code == 1
    assert res.output == f"Error: {text}\n"
    assert isinstance(res.exception, SystemExit)


def test_other_exceptions_are_not_hidden() -> None:
    # A bug is not a user error: it keeps its traceback.
    res = CliRunner().invoke(_group_raising(ZeroDivisionError("bug")), ["boom"])
    assert isinstance(res.exception, ZeroDivisionError)


def test_fingerprint_mismatch_says_the_cli_option() -> None:
    err = FingerprintMismatchError("s.zarr", ["schema.teachers differ", "tile list differs"])
    assert "overwrite=True" in str(err)  # the library's words, for Python callers
    assert cli_message(err) == (
        "store 's.zarr' exists with a different fingerprint:\n"
        "  - schema.teachers differ\n"
        "  - tile list differs\n"
        "Use a new STORE path, or pass --overwrite to delete and recreate the store."
    )


def test_an_error_without_text_still_says_what_it_is() -> None:
    assert cli_message(FeatcacheError()) == "FeatcacheError"


def test_commands_do_not_convert_errors_themselves() -> None:
    # One catch site: a command catching library errors again would drift from the group's rule.
    for path in sorted((ROOT / "featcache").glob("cli_*.py")):
        assert "ClickException" not in path.read_text(), f"{path.name} converts errors itself"
