"""CLI of the extraction stage: extract / info / verify / synth, and its error messages."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from featcache.cli import main
from featstore import open_store
from pipelines.sources import open_source

TEACHER = "dinov2_vitb14"
TINY = [
    "--teacher",
    TEACHER,
    "--tiny",
    "--tile-size",
    "64",
    "--base-size",
    "70",
    "--tiles-per-shard",
    "3",
    "--batch-size",
    "3",
    "--limit",
    "6",
    "-q",
]


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    result = _run("synth", out, "--n-images", "2", "--size", "128", "--seed", "7")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def store(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "s.zarr"
    result = _run("extract", synth, out, *TINY, "--scales", "1,0.5", "--flip")
    assert result.exit_code == 0, result.output
    return out


def test_synth_writes_a_readable_dataset(synth: Path) -> None:
    assert len(list((synth / "images").glob("*.png"))) == 2
    assert len(open_source(synth, tile_size=64).records) == 8


def test_info_shows_the_key_fields(store: Path) -> None:
    result = _run("info", store)
    assert result.exit_code == 0, result.output
    text = result.output
    fp = open_store(store).fingerprint
    for needle in (
        "dataset:     synth",
        "6/6 done",
        "train=6",
        "background",
        TEACHER,
        "s1.00:",
        "s0.50f:",
        "grid 5x5",
        "'int8'",  # the default codec
        fp,
        "on disk",
    ):
        assert needle in text, f"{needle!r} missing from:\n{text}"


def test_verify_ok_then_corrupted_chunk_and_missing_shard(store: Path, tmp_path: Path) -> None:
    result = _run("verify", store)
    assert result.exit_code == 0 and "OK" in result.output, result.output
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    level = bad / "teachers" / TEACHER / "s1.00" / "c"
    shard0 = level / "0" / "0" / "0" / "0"  # tiles 0..2; tile 0's chunk is written first
    data = bytearray(shard0.read_bytes())
    data[100:104] = bytes(b ^ 0xFF for b in data[100:104])
    shard0.write_bytes(bytes(data))
    (level / "1" / "0" / "0" / "0").unlink()  # shard 1 = tiles 3..5
    result = _run("verify", bad)
    assert result.exit_code == 1, result.output
    assert f"teachers/{TEACHER}/s1.00 tile 0" in result.output
    assert "missing shard file" in result.output and "tiles 3..5" in result.output
    assert "OK" not in result.output


def test_unknown_teacher_lists_names_and_creates_nothing(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    result = _run("extract", synth, out, "--teacher", "dinov9", "--tiny")
    assert result.exit_code == 1
    assert "unknown teacher 'dinov9'" in result.output and TEACHER in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fingerprint_mismatch_needs_overwrite(store: Path, synth: Path, tmp_path: Path) -> None:
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    before = _tree(copy)
    result = _run("extract", synth, copy, *TINY, "--scales", "1", "--no-flip")  # levels differ
    assert result.exit_code == 1
    assert "different fingerprint" in result.output and "--overwrite" in result.output
    assert "levels" in result.output
    assert _tree(copy) == before  # untouched
    result = _run("extract", synth, copy, *TINY, "--scales", "1", "--no-flip", "--overwrite")
    assert result.exit_code == 0, result.output
    assert [lv.key for lv in open_store(copy).levels(TEACHER)] == ["s1.00"]


def test_same_command_again_resumes_without_work(store: Path, synth: Path) -> None:
    before = _tree(store)
    result = _run("extract", synth, store, *TINY, "--scales", "1,0.5", "--flip")
    assert result.exit_code == 0, result.output
    assert _tree(store) == before


def _refuse_probe_in(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make the writability probe in ``folder`` fail the way a read-only mount does (EROFS).

    Permission bits cannot make a folder unwritable here: root (CI containers) ignores them, and
    mounting a read-only filesystem needs privileges. So the refusal of the one call the check
    makes is injected; every other temporary file still works.
    """
    real = tempfile.TemporaryFile

    def probe(*args: Any, **kwargs: Any) -> Any:
        if Path(kwargs.get("dir") or ".").resolve() == folder.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", probe)


@pytest.mark.parametrize("kind", ["under_file", "deep_under_file", "readonly_mount"])
def test_unwritable_output_is_refused_early(
    synth: Path, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A path whose parent (or any ancestor) is a regular file cannot be created, not even by root.
    (tmp_path / "afile").write_text("x")
    if kind == "under_file":
        out, needle = tmp_path / "afile" / "s.zarr", "is a file"
    elif kind == "deep_under_file":
        out, needle = tmp_path / "afile" / "a" / "b" / "s.zarr", "is a file"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        _refuse_probe_in(monkeypatch, ro)
        out, needle = ro / "s.zarr", os.strerror(errno.EROFS)
    result = _run("extract", synth, out, *TINY)
    assert result.exit_code == 1
    assert str(out) in result.output and "Traceback" not in result.output
    assert needle in result.output and "choose" in result.output, result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["afile"] + (["ro"] if kind == "readonly_mount" else [])
    )
    assert (tmp_path / "afile").read_text() == "x"


def test_bad_options_are_click_errors(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "y.zarr"
    for extra, needle in (
        (["--codec", "zstd"], "--codec"),
        (["--scheduler", "mpi"], "--scheduler"),
        (["--weights", "nope"], "--weights"),
        (["--scales", "1,x"], "--scales"),
    ):
        result = _run("extract", synth, out, *TINY, *extra)
        assert result.exit_code == 1 and needle in result.output, result.output
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run("extract", empty, out, *TINY)
    assert result.exit_code == 1 and str(empty) in result.output, result.output
    assert not out.exists()
    np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()), ["empty"])


def test_bank_command_adds_a_verified_view_bank(store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b.zarr"
    shutil.copytree(store, copy)
    result = _run("bank", copy, "--tiny", "--k", "2", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    reader = open_store(copy)
    assert reader.has_bank and reader.bank.spec.k == 2
    assert _run("verify", copy).exit_code == 0
    # different bank parameters on the same store: refused with the fix named
    result = _run("bank", copy, "--tiny", "--k", "3")
    assert result.exit_code == 1 and "overwrite" in result.output
    assert "Traceback" not in result.output
