"""`featcache splits`: partitions by whole source image, from split files, saved in the store.

Drawing is checked by brute force over hand-built tile records (scenes with 1-4 windows each):
no source image in two sets, the sets cover the pool, and the numbers of images are the written-
out rounding of the shares. The CLI is run on a tiny store whose 6 scenes hold 4 tiles each.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from featcache.cli import main
from featstore import open_store
from featstore.partitions import (
    PartitionError,
    draw_partition,
    match_lines,
    parse_amount,
    partition_from_split_files,
    read_partition,
)
from featstore.schema import TileRecord
from tests.helpers import DINO, build_store
from trainer.checks import recorded_val


def _tiles(n_scenes: int = 40, val_scenes: int = 5) -> list[TileRecord]:
    """Scene k has 1 + k % 4 windows; the last ``val_scenes`` scenes are the 'val' split."""
    out = []
    for k in range(n_scenes):
        split = "val" if k >= n_scenes - val_scenes else "train"
        for w in range(1 + k % 4):
            out.append(
                TileRecord(
                    f"s{k:02d}_w{w}", f"scenes/s{k:02d}.tif", (0, 64 * w, 64, 64), split, "h"
                )
            )
    return out


def _scene_sets(tiles: list[TileRecord], part) -> dict[str, set[str]]:
    """Set name -> source images, by brute force over every tile of every set."""
    by_id = {t.tile_id: t for t in tiles}
    return {k: {by_id[i].source for i in ids} for k, ids in part.sets.items()}


def _half_up(x: Fraction) -> int:
    return int(x + Fraction(1, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fraction_partition_keeps_scenes_whole(seed: int) -> None:
    tiles = _tiles()
    part = draw_partition(
        tiles,
        parse_amount("1/8", "--labeled"),
        parse_amount("0.1", "--val"),
        seed=seed,
        pool=("train",),
    )
    scenes = _scene_sets(tiles, part)
    for a in scenes:
        for b in scenes:
            assert a == b or not scenes[a] & scenes[b], (a, b)
    # every tile of a chosen scene is in the set (windows never straddle)
    for key, ids in part.sets.items():
        srcs = scenes[key]
        assert set(ids) == {t.tile_id for t in tiles if t.source in srcs}
    pool = {t.source for t in tiles if t.split == "train"}  # 35 scenes
    assert scenes["val"] | scenes["labeled"] | scenes["unlabeled"] == pool
    assert len(scenes["val"]) == _half_up(Fraction(1, 10) * 35) == 4
    assert len(scenes["labeled"]) == _half_up(Fraction(1, 8) * 31) == 4
    assert not scenes["val"] & {t.source for t in tiles if t.split == "val"}


def test_shares_counts_and_nesting() -> None:
    tiles = _tiles()
    eighth = draw_partition(tiles, parse_amount("1/8", "--labeled"), seed=3)
    quarter = draw_partition(tiles, parse_amount("0.25", "--labeled"), seed=3)
    assert set(eighth.sets["labeled"]) < set(quarter.sets["labeled"])  # same seed: nested
    # without --val, the store's val split is the val set, untouched
    assert set(eighth.sets["val"]) == {t.tile_id for t in tiles if t.split == "val"}
    three = draw_partition(tiles, parse_amount("3", "--labeled"), seed=0)
    assert len(_scene_sets(tiles, three)["labeled"]) == 3
    assert parse_amount("1/8", "x").fraction == parse_amount("0.125", "x").fraction
    for bad in ("abc", "3/2", "-1", "1/0"):
        with pytest.raises(PartitionError, match="1/8"):
            parse_amount(bad, "--labeled")
    with pytest.raises(PartitionError, match="at most 35"):
        draw_partition(tiles, parse_amount("36", "--labeled"))
    with pytest.raises(PartitionError, match="--pool"):
        draw_partition(tiles, parse_amount("1/8", "--labeled"), pool=("training",))


def test_split_file_lines_match_by_path_suffix(tmp_path: Path) -> None:
    tiles = _tiles(6, 0)
    idx, unmatched, ambiguous = match_lines(
        tiles, ["data/scenes/s01.tif", "s02.tif", "scenes/s99.tif", "other/s03.tif"]
    )
    assert idx == [
        i for i, t in enumerate(tiles) if t.source in ("scenes/s01.tif", "scenes/s02.tif")
    ]
    assert unmatched == ["scenes/s99.tif", "other/s03.tif"] and not ambiguous
    twins = [
        TileRecord("a", "a/img/0.png", (0, 0, 8, 8), "train", "h"),
        TileRecord("b", "b/img/0.png", (0, 0, 8, 8), "train", "h"),
    ]
    assert match_lines(twins, ["img/0.png"])[2]  # two images end so: ambiguous, not guessed
    (tmp_path / "l.txt").write_text("scenes/s00.tif masks/s00.png\nscenes/s01.tif\n")
    (tmp_path / "v.txt").write_text("scenes/s01.tif\n")
    with pytest.raises(PartitionError, match="labeled and val share 2 tiles"):
        partition_from_split_files(
            tiles, {"labeled": tmp_path / "l.txt", "val": tmp_path / "v.txt"}
        )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """6 synthetic 128 px scenes cut into 4 tiles of 64 px each."""
    from pipelines.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("splits")
    src = generate_synthetic(root / "syn", n_images=6, size=128, seed=0)
    return build_store(root, teachers=(DINO,), source=src)


def _sources(url: str, name: str = "default") -> dict[str, set[str]]:
    st = open_store(url)
    return _scene_sets(st.tiles, read_partition(url, name))


def test_cli_writes_lists_and_train_uses_the_partition(store: str, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["splits", store])
    assert res.exit_code == 0, res.output
    assert "train             24       6" in res.output and "partitions: none" in res.output
    res = runner.invoke(main, ["splits", store, "--labeled", "1/4", "--val", "1/3"])
    assert res.exit_code == 0, res.output
    scenes = _sources(store)
    assert [len(scenes[k]) for k in ("val", "labeled", "unlabeled")] == [2, 1, 3]
    part = read_partition(store, "default")
    assert [len(part.sets[k]) for k in ("val", "labeled", "unlabeled")] == [8, 4, 12]
    assert part.store_fingerprint == open_store(store).fingerprint
    assert (
        "partition default: labeled 4 tiles (1 images), unlabeled 12 tiles (3 images), "
        "val 8 tiles (2 images)" in res.output
    )
    assert not list(Path(store).rglob("*.tmp"))  # written whole, renamed into place
    res = runner.invoke(main, ["splits", store, "--labeled", "1/2"])
    assert res.exit_code == 1 and "--overwrite" in res.output
    res = runner.invoke(
        main,
        [
            "train",
            "--store",
            store,
            "--out",
            str(tmp_path / "r"),
            "--tiny",
            "--crop",
            "70",
            "--iters",
            "1",
            "--batch",
            "2+2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    sets_line = [ln for ln in res.output.splitlines() if ln.startswith("sets:")][0]
    assert "partition 'default' saved in the store" in sets_line
    assert "labeled 4 tiles (1 images)" in sets_line
    # the run records the partition; evaluate's default val is the partition's val set
    ckpt = torch.load(tmp_path / "r" / "latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["data"]["partition"] == "default"
    tiles = open_store(store).tiles
    assert [tiles[i].tile_id for i in recorded_val(tiles, ckpt["config"]["data"], store)] == list(
        part.sets["val"]
    )
    res = runner.invoke(
        main, ["evaluate", str(tmp_path / "r" / "latest.pt"), "--store", store, "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ema"]["pixels"] == 8 * 64 * 64  # the partition's 8 val tiles
    res = runner.invoke(
        main,
        [
            "train",
            "--store",
            store,
            "--partition",
            "default",
            "--labeled",
            "train",
            "--out",
            str(tmp_path / "r2"),
        ],
    )
    assert res.exit_code == 1 and "drop --labeled or drop --partition" in res.output
    res = runner.invoke(
        main,
        [
            "train",
            "--store",
            store,
            "--partition",
            "nope",
            "--out",
            str(tmp_path / "r3"),
            "--tiny",
            "--crop",
            "70",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 1 and "no partition 'nope'" in res.output


def test_cli_partition_from_split_files(store: str, tmp_path: Path) -> None:
    (tmp_path / "labeled.txt").write_text("LoveDA/images/000.png LoveDA/masks/000.png\n")
    (tmp_path / "unlabeled.txt").write_text("images/001.png\nimages/002.png\nimages/404.png\n")
    (tmp_path / "val.txt").write_text("./images/005.png masks/005.png\n")
    res = CliRunner().invoke(
        main,
        [
            "splits",
            store,
            "--labeled-file",
            str(tmp_path / "labeled.txt"),
            "--unlabeled-file",
            str(tmp_path / "unlabeled.txt"),
            "--val-file",
            str(tmp_path / "val.txt"),
            "--name",
            "unimatch",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "1 line(s) of --unlabeled-file match no tile" in res.output
    assert "images/404.png" in res.output and "--partition unimatch" in res.output
    assert _sources(store, "unimatch") == {
        "labeled": {"images/000.png"},
        "unlabeled": {"images/001.png", "images/002.png"},
        "val": {"images/005.png"},
    }
    part = read_partition(store, "unimatch")
    assert len(part.sets["labeled"]) == 4  # all four windows of the scene
