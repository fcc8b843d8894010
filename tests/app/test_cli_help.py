"""The CLI explains itself: every option has help, fixed sets are choices, start-up is light.

The walk covers every command registered on the click group, so options added later are checked
too. Start-up: `featcache --help` and `featcache info STORE` must not import torch (torch alone
takes seconds to import on a small machine); checked in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.cli_source import LAYOUT_CHOICES


def _commands(group: click.Group, prefix: str = "featcache") -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, path)
    return out


def _options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


def test_the_walk_sees_every_command() -> None:
    names = {path.split()[-1] for path, _ in _commands(main)}
    assert {
        "extract",
        "info",
        "train",
        "evaluate",
        "predict",
        "export",
        "audit",
        "bank",
        "plan",
    } <= names


def test_every_option_of_every_command_has_help() -> None:
    missing = [
        f"{path} {opt.opts[0]}"
        for path, cmd in _commands(main)
        for opt in _options(cmd)
        if not (opt.help or "").strip()
    ]
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_every_command_has_a_description() -> None:
    missing = [path for path, cmd in _commands(main) if not (cmd.help or "").strip()]
    assert not missing, f"commands without a docstring: {missing}"


@pytest.mark.parametrize(
    ("command", "option", "values"),
    [
        ("evaluate", "--use", {"all", "ema", "student", "both", "clip", "dinov3", "fused"}),
        ("evaluate", "--mode", {"whole", "sliding"}),
        ("predict", "--use", {"ema", "student", "clip", "dinov3", "fused"}),
        ("predict", "--mode", {"whole", "sliding"}),
        ("export", "--use", {"ema", "student"}),
        ("train", "--eval-mode", {"whole", "sliding"}),
        ("audit", "--grid", {"teacher", "student"}),
        ("demo", "--layout", set(LAYOUT_CHOICES)),
        ("extract", "--layout", set(LAYOUT_CHOICES)),
    ],
)
def test_fixed_sets_are_choices(command: str, option: str, values: set[str]) -> None:
    opt = next(o for o in _options(main.commands[command]) if option in o.opts)
    assert isinstance(opt.type, click.Choice)
    assert set(opt.type.choices) == values
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "|".join(opt.type.choices) in result.output.replace(
        "\n", ""
    ).replace(" ", "")


_PROBE = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from featcache.cli import main
    try:
        main(sys.argv[1:], prog_name="featcache")
    except SystemExit as exit:
        code = exit.code
    heavy = sorted(m for m in ("torch", "timm", "open_clip", "torchvision") if m in sys.modules)
    print(json.dumps({"code": code, "heavy": heavy, "seconds": time.perf_counter() - t0}),
          file=sys.stderr)
""")


def _probe(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("audit", "--quiet"),
        ("bank", "--quiet"),
        ("extract", "--quiet"),
        ("plan", "--quiet"),
        ("evaluate", "--no-progress"),
        ("predict", "--no-progress"),
        ("train", "--no-progress"),
    ],
)
def test_long_commands_have_a_progress_switch(command: str, flag: str) -> None:
    # the bars themselves: tests/app/test_export.py (predict, evaluate) and a run by hand
    flags = {o for opt in _options(main.commands[command]) for o in opt.opts}
    assert flag in flags


def test_help_does_not_import_torch() -> None:
    report = _probe("--help")
    assert report["code"] == 0
    assert report["heavy"] == [], f"--help imported {report['heavy']}"


def test_info_does_not_import_torch(tmp_path: Path) -> None:
    url = _small_store(tmp_path)
    report = _probe("info", url)
    assert report["code"] == 0
    assert report["heavy"] == [], f"info imported {report['heavy']}"


def _small_store(tmp_path: Path) -> str:
    """A two-tile store with pixels and one tiny teacher, made by the real extraction."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction
    from pipelines.synthetic import generate_synthetic

    src = generate_synthetic(tmp_path / "syn", n_images=1, size=64, seed=0)
    cfg = ExtractConfig(
        source=str(src),
        out=str(tmp_path / "s.zarr"),
        teachers=("dinov2_vitb14",),
        tiny=True,
        scales=(1.0,),
        flip=False,
        tile_size=64,
        base_size=70,
        tiles_per_shard=2,
        batch_size=2,
    )
    return run_extraction(cfg, progress=False)
