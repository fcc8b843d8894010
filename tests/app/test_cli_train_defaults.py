"""`train` distils from every stored teacher by default and says so; split and batch errors.

One tiny store with two teachers (a DINOv2-style ViT and a CLIP tower, both tiny) serves all
tests. The expectations are written out by hand: which teachers the store holds, that a CLIP
teacher is matched by the 224 px branch and any other by the full branch, and the batch that
fits a given number of tiles.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from featcache.cli import main
from featcache.cli_train import build_config
from featstore import open_store
from tests.helpers import CLIP, DINO, build_store, tiny_run_args, write_ids
from trainer.config import TrainConfig, TrainConfigError
from trainer.prepare import open_data, resolve_branches

EXPECTED = [(DINO, "full"), (CLIP, "clip224")]  # the store's order; CLIP on its 224 pass


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("defaults")
    url = build_store(root, teachers=(DINO, CLIP))
    ids = [t.tile_id for t in open_store(url).tiles]
    write_ids(root / "l.txt", ids[:2])
    write_ids(root / "u.txt", ids[2:4])
    write_ids(root / "v.txt", ids[4:])
    return url, root


def _args(url: str, root: Path, out: Path, *extra: str) -> list[str]:
    """``train --store S --out R`` with small sizes; no --teacher."""
    return [
        "train",
        "--store",
        url,
        "--out",
        str(out),
        *tiny_run_args(root),
        "--iters",
        "1",
        "--log-interval",
        "1",
        *extra,
    ]


def _csv_header(run: Path) -> list[str]:
    with (run / "metrics.csv").open() as fh:
        return next(csv.reader(fh))


def test_default_run_distils_from_both_stored_teachers(store, tmp_path: Path) -> None:
    url, root = store
    res = CliRunner().invoke(main, _args(url, root, tmp_path / "r"))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("distillation: 2 teacher(s), every teacher the store holds")
    assert lines[1] == f"  {DINO}: branch full, levels s1.00"
    assert lines[2] == f"  {CLIP}: branch clip224, levels s1.00"
    assert lines[3].startswith("  target mode: warp")
    header = _csv_header(tmp_path / "r")
    assert f"distill/{DINO}" in header and f"distill/{CLIP}" in header
    text = (tmp_path / "r" / "config.yaml").read_text()
    assert text.startswith("# distillation: 2 teacher(s)")
    saved = yaml.safe_load(text)
    assert [(t["name"], t["branch"]) for t in saved["model"]["teachers"]] == EXPECTED
    assert saved["distill"]["enabled"] is True


def test_no_distill_logs_no_teacher(store, tmp_path: Path) -> None:
    url, root = store
    res = CliRunner().invoke(main, _args(url, root, tmp_path / "r", "--no-distill"))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == (
        "distillation: off (--no-distill): plain FixMatch, no teacher"
    )
    assert not [k for k in _csv_header(tmp_path / "r") if k.startswith("distill")]
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["model"]["teachers"] == [] and saved["distill"]["enabled"] is False
    # the saved config reloads as the same no-distill config
    assert TrainConfig.load(tmp_path / "r" / "config.yaml").teacher_list == []


def _resolved(cfg: TrainConfig) -> list[tuple[str, str]]:
    cfg.data.labeled, cfg.data.unlabeled, cfg.data.val = "train", "", ""
    cfg.model.num_classes = None
    data = open_data(cfg)
    resolve_branches(cfg, data.store, None)
    return [(t.name, t.branch) for t in cfg.model.teachers]


def test_cli_and_yaml_give_clip_the_same_branch(store) -> None:
    url, _ = store
    cli = build_config({"store": url, "teacher": (DINO, CLIP), "crop": 70})
    yml = TrainConfig.from_dict(
        {"crop_size": 70, "data": {"store": url}, "model": {"teachers": [DINO, CLIP]}}
    ).validate()
    assert cli == yml
    unset = build_config({"store": url, "crop": 70})  # no --teacher: the store's teachers
    assert unset.model.teachers is None
    assert _resolved(cli) == _resolved(yml) == _resolved(unset) == EXPECTED
    # the rule reads the stored spec's family, not the teacher's name
    assert open_store(url).schema.teacher(CLIP).spec.family == "open_clip"
    # online mode: the same rule on the online teachers' specs
    cfg = build_config({"store": url, "teacher": (DINO, CLIP), "mode": "online", "crop": 70})
    online = {
        DINO: SimpleNamespace(spec=SimpleNamespace(family="timm")),
        CLIP: SimpleNamespace(spec=SimpleNamespace(family="open_clip")),
    }
    resolve_branches(cfg, None, online)
    assert [(t.name, t.branch) for t in cfg.model.teachers] == EXPECTED
    # an explicit branch is kept
    assert _resolved(build_config({"store": url, "teacher": (f"{CLIP}@full",), "crop": 70})) == [
        (CLIP, "full")
    ]


def test_online_without_teacher_is_refused(store, tmp_path: Path) -> None:
    url, root = store
    res = CliRunner().invoke(main, _args(url, root, tmp_path / "r", "--mode", "online"))
    assert res.exit_code == 1
    assert "--teacher NAME" in res.output and "--no-distill" in res.output
    cfg = build_config({"store": url, "mode": "online", "no_distill": True})
    assert cfg.teacher_list == [] and not cfg.distill.enabled
    with pytest.raises(TrainConfigError, match="--no-distill"):  # an empty list says nothing
        TrainConfig.from_dict({"data": {"store": url}, "model": {"teachers": []}}).validate()
    with pytest.raises(TrainConfigError, match="drop one"):
        TrainConfig.from_dict(
            {"data": {"store": url}, "model": {"teachers": [DINO]}, "distill": {"enabled": False}}
        ).validate()


def test_split_problems_come_in_one_message(store, tmp_path: Path) -> None:
    url, root = store
    args = _args(url, root, tmp_path / "r")
    for opt in ("--labeled", "--unlabeled", "--val"):
        args[args.index(opt) + 1] = f"no_{opt[2:]}"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert "3 problem(s)" in res.output
    for key in ("labeled", "unlabeled", "val"):
        assert f"data.{key} (--{key}): split(s) ['no_{key}'] not in the tile index" in res.output
    assert f"featcache splits {url} --labeled 1/8 --val 0.1 --seed 0" in res.output


def test_overlap_and_unknown_split_reported_together(store, tmp_path: Path) -> None:
    url, root = store
    args = _args(url, root, tmp_path / "r")
    args[args.index("--unlabeled") + 1] = "nosuch"
    args[args.index("--val") + 1] = str(root / "l.txt")  # the labeled tiles again
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert "2 problem(s)" in res.output
    assert "split(s) ['nosuch'] not in the tile index (it has ['train'])" in res.output
    assert "labeled and val sets overlap in 2 tiles" in res.output
    assert f"featcache splits {url}" in res.output


def test_batch_too_large_names_the_batch_that_fits(store, tmp_path: Path) -> None:
    url, root = store
    # 2 labeled and 2 unlabeled tiles on one process: batches of 3 never fill, 2+2 does
    res = CliRunner().invoke(main, _args(url, root, tmp_path / "r", "--batch", "3+3"))
    assert res.exit_code == 1
    assert "labeled 2 tile(s) per process, batch 3" in res.output
    assert "the largest batch that fills is --batch 2+2" in res.output
    res = CliRunner().invoke(main, _args(url, root, tmp_path / "r", "--batch", "1+5"))
    assert "the largest batch that fills is --batch 1+2" in res.output
