"""The README's tour, run exactly as README.md prints it, in order, in a fresh folder.

The commands are parsed from the fenced block that follows ``<!-- tour -->`` in README.md, so the
README and this test cannot drift apart: edit the tour there and this test runs the new text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"<!-- tour -->\s*```bash\n(.*?)```", re.S)


def tour_commands(text: str) -> list[str]:
    """Shell commands of the tour block: continuation lines joined, trailing comments dropped."""
    match = _BLOCK.search(text)
    if match is None:
        raise AssertionError("README.md has no ```bash block after a '<!-- tour -->' marker")
    commands, pending = [], ""
    for raw in match.group(1).splitlines():
        line = raw.split("  #", 1)[0].rstrip()  # comments sit two spaces after the command
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        commands.append((pending + line.strip()).strip())
        pending = ""
    assert not pending, f"the tour ends inside a continued command: {pending!r}"
    return commands


def test_tour_parser_joins_and_strips() -> None:
    text = (
        "<!-- tour -->\n```bash\n# a comment line\nfeatcache a x \\\n    --b 1   # note\n"
        "featcache c\n```\n"
    )
    assert tour_commands(text) == ["featcache a x --b 1", "featcache c"]


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, text=True, capture_output=True, timeout=600
    )


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    commands = tour_commands(README.read_text())
    assert all(c.startswith("featcache ") for c in commands), commands
    outputs: dict[str, str] = {}
    for command in commands:
        res = _run(command, tmp_path)
        assert res.returncode == 0, f"{command}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
        outputs[command] = res.stdout + res.stderr
    first = {}  # the first command of each verb, and what it printed
    for command in commands:
        first.setdefault(command.split()[1], outputs[command])
    # what each step must have produced, checked on its files rather than on "it ran"
    assert "OK" in first["verify"]
    assert "pixels" in first["info"] and "efficientnet_lite0" in first["info"]
    assert "partition" in first["splits"]
    assert "efficientnet_lite0" in first["train"]  # the run says which teacher it distils
    for command in (c for c in commands if c.split()[1] == "train"):
        out = tmp_path / command.split("--out ", 1)[1].split()[0]
        assert (out / "config.yaml").is_file() and (out / "best.pt").is_file(), command
        rows = (out / "metrics.csv").read_text().splitlines()
        assert any("distill" in column for column in rows[0].split(",")), rows[0]
    val = json.loads((tmp_path / "runs/a/val.json").read_text())
    assert len(val["class_names"]) == 7
    assert len(list((tmp_path / "pred").glob("*.png"))) > 4  # masks + legend
    assert (tmp_path / "pred/legend.json").is_file()
    exported = (tmp_path / "model.safetensors").stat().st_size
    assert exported < (tmp_path / "runs/a/best.pt").stat().st_size / 2
