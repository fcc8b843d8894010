"""Label conventions: every layout's stored ids against a hand-built expectation, never a guess.

Fixtures reproduce the real forms: mmseg's converted ISPRS tiles (0 = boundary/ignore, 1..6 =
classes, clutter on some tiles only), DWL LoveDA split files with 3-channel grey masks,
colour-coded masks read through a palette, and generic folders without a convention.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from featstore.schema import StoreSchema, fingerprint
from pipelines.sources import (
    LAYOUTS,
    LabelConventionError,
    LabelConventionWarning,
    LayoutError,
    MaskValueError,
    open_source,
)
from pipelines.sources.classtable import class_table_lines

ISPRS = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_RGB = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)]
LOVEDA = ("background", "building", "road", "water", "barren", "forest", "agriculture")
TILE = 64


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (TILE, TILE, 3)).astype(np.uint8)


def _isprs_ann(seed: int, clutter: bool) -> np.ndarray:
    """mmseg index PNG: 0 = eroded boundary, 1..5 (and 6 = clutter only when ``clutter``)."""
    ann = np.random.default_rng(seed).integers(1, 7 if clutter else 6, (TILE, TILE))
    ann[::9, :] = 0  # boundary rows, as the noBoundary labels erode class borders
    return ann.astype(np.uint8)


def _reduce_zero(raw: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label written out: 0 -> 255, v -> v - 1."""
    out = raw.astype(np.int64) - 1
    out[raw == 0] = 255
    return out.astype(np.uint8)


@pytest.fixture
def isprs_tiles(tmp_path: Path) -> dict[str, np.ndarray]:
    """img_dir/{train,val} + ann_dir: clutter on the train tile, none on the val tiles."""
    root = tmp_path / "potsdam"
    anns = {
        "train/2_10_0_0_512_512": _isprs_ann(0, clutter=True),
        "val/5_15_0_0_512_512": _isprs_ann(1, clutter=False),
        "val/5_15_256_0_768_512": _isprs_ann(2, clutter=False),
    }
    for i, (key, ann) in enumerate(anns.items()):
        _png(root / "img_dir" / f"{key}.png", _image(i))
        _png(root / "ann_dir" / f"{key}.png", ann)
    return anns


def _check_ids(src, raws: dict[str, np.ndarray], expect) -> None:  # noqa: ANN001
    assert len(src) == len(raws)
    for i, rec in enumerate(src.records):
        raw = raws[rec.tile_id.split("/", 1)[1]]
        np.testing.assert_array_equal(src.load(i)[1], expect(raw))


@pytest.mark.parametrize(
    ("layout", "dataset"), [("potsdam-mmseg", "potsdam"), ("vaihingen-mmseg", "vaihingen")]
)
def test_mmseg_isprs_tiles(tmp_path: Path, isprs_tiles: dict, layout: str, dataset: str) -> None:
    src = open_source(tmp_path / "potsdam", layout=layout, tile_size=TILE)
    assert src.dataset == dataset and src.class_names == ISPRS and src.num_classes == 6
    assert {r.split for r in src.records} == {"train", "val"}
    _check_ids(src, isprs_tiles, _reduce_zero)
    assert src.class_colors == tuple(ISPRS_RGB)
    # the class count stays 6 with the clutter-free tiles alone
    val = open_source(tmp_path / "potsdam", layout=layout, tile_size=TILE, split="val")
    assert val.num_classes == 6 and 5 not in np.concatenate([val.load(i)[1] for i in range(2)])
    # pixel counts recorded at open time == a brute-force count of the source values
    raw = np.stack(list(isprs_tiles.values()))
    stats = src.label_stats()
    assert stats["class_pixels"] == [int((raw == v).sum()) for v in range(1, 7)]
    assert stats["ignore_pixels"] == int((raw == 0).sum()) and stats["labeled_tiles"] == 3


def test_mmseg_tree_is_not_guessed(tmp_path: Path, isprs_tiles: dict) -> None:
    fits = r"--layout potsdam-mmseg.*vaihingen-mmseg.*loveda-mmseg.*--layout mmseg"
    with pytest.raises(LayoutError, match=fits):
        open_source(tmp_path / "potsdam", tile_size=TILE)


def _generic_isprs(root: Path, anns: list[np.ndarray]) -> None:
    for i, ann in enumerate(anns):
        _png(root / "images" / f"t{i}.png", _image(i))
        _png(root / "masks" / f"t{i}.png", ann)
    (root / "classes.txt").write_text("\n".join(ISPRS) + "\n")


def test_generic_folder_of_isprs_tiles(tmp_path: Path) -> None:
    with_clutter = [_isprs_ann(0, True), _isprs_ann(1, False)]
    _generic_isprs(tmp_path / "a", with_clutter)
    # values 0..6 with 6 names: only "0 is ignore" fits -> refused, naming the option
    with pytest.raises(LabelConventionError, match=r"up to 6.*6 classes.*--reduce-zero-label"):
        open_source(tmp_path / "a", tile_size=TILE)
    src = open_source(tmp_path / "a", tile_size=TILE, reduce_zero_label=True)
    assert src.num_classes == 6
    _check_ids(src, {f"t{i}": a for i, a in enumerate(with_clutter)}, _reduce_zero)
    # no clutter anywhere: both readings fit -> a warning with the histogram, ids = values
    no_clutter = [_isprs_ann(1, False), _isprs_ann(2, False)]
    _generic_isprs(tmp_path / "b", no_clutter)
    zeros = sum(int((a == 0).sum()) for a in no_clutter)
    with pytest.warns(
        LabelConventionWarning,
        match=rf"contain value 0.*0: {zeros} px.*"
        r"\(a\) 0 is a class.*\(b\) 0 is ignore.*--reduce-zero-label",
    ):
        src = open_source(tmp_path / "b", tile_size=TILE)
    assert src.num_classes == 6
    _check_ids(src, {f"t{i}": a for i, a in enumerate(no_clutter)}, lambda a: a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice silences it
        open_source(tmp_path / "b", tile_size=TILE, reduce_zero_label=False)
        open_source(tmp_path / "b", tile_size=TILE, ignore_index=0)


def test_generic_folder_without_classes_is_refused(tmp_path: Path) -> None:
    anns = [_isprs_ann(0, True)]
    _generic_isprs(tmp_path, anns)
    (tmp_path / "classes.txt").unlink()
    counts = np.bincount(anns[0].ravel(), minlength=7)
    hist = ", ".join(
        rf"{v}: {counts[v]} px \({100 * counts[v] / counts.sum():.1f} %\)" for v in range(7)
    )
    with pytest.raises(LabelConventionError, match=rf"never taken from the largest.*{hist}"):
        open_source(tmp_path, tile_size=TILE, reduce_zero_label=True)
    src = open_source(tmp_path, tile_size=TILE, reduce_zero_label=True, class_names=",".join(ISPRS))
    assert src.class_names == ISPRS
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(MaskValueError, match=r"raw .* values \[3, 4, 5, 6\].*0\.\.2"):
        open_source(tmp_path, tile_size=TILE, reduce_zero_label=True, class_names=str(names))


def _dwl_loveda(root: Path) -> dict[str, np.ndarray]:
    """DWL's LoveDA tiles: RGB images and raw masks (0 = no-data) saved as 3-channel grey."""
    raws = {}
    for i, name in enumerate(["1366_1", "1366_2", "2522_4"]):
        raw = np.random.default_rng(i).integers(0, 8, (TILE, TILE)).astype(np.uint8)
        _png(root / "Train/Rural/images_png" / f"{name}.png", _image(i))
        _png(root / "Train/Rural/masks_png" / f"{name}.png", np.repeat(raw[..., None], 3, -1))
        raws[f"Rural/images_png/{name}"] = raw
    lines = [
        f"./Train/Rural/images_png/{n}.png ./Train/Rural/masks_png/{n}.png"
        for n in ("1366_1", "2522_4")
    ]
    (root / "labeled.txt").write_text("\n".join(lines) + "\n")
    (root / "unlabeled.txt").write_text("./Train/Rural/images_png/1366_2.png x.png\n")
    return raws


def test_dwl_loveda_split_files(tmp_path: Path) -> None:
    raws = _dwl_loveda(tmp_path)
    files = [tmp_path / "labeled.txt", tmp_path / "unlabeled.txt"]
    src = open_source(tmp_path, layout="loveda", split_file=files, tile_size=TILE)
    assert src.dataset == "loveda" and src.class_names == LOVEDA and src.num_classes == 7
    assert [r.split for r in src.records] == ["labeled", "unlabeled", "labeled"]
    for i, rec in enumerate(src.records):
        mask = src.load(i)[1]
        if rec.split == "unlabeled":
            assert mask is None
            continue
        np.testing.assert_array_equal(mask, _reduce_zero(raws[rec.tile_id.split("/", 1)[1]]))
    # the same split files without --layout are generic: no classes, no guess
    with pytest.raises(LabelConventionError, match="--classes"):
        open_source(tmp_path, split_file=files, tile_size=TILE)
    # a colour mask (channels differ) under an index convention names --palette
    colour = np.zeros((TILE, TILE, 3), np.uint8)
    colour[..., 0] = 1
    _png(tmp_path / "Train/Rural/masks_png/2522_4.png", colour)
    with pytest.raises(MaskValueError, match=r"2522_4\.png is a colour image.*--palette FILE"):
        open_source(tmp_path, layout="loveda", split_file=files, tile_size=TILE)


def test_dwl_potsdam_split_file_index_tiles(tmp_path: Path) -> None:
    """DWL Potsdam tiles are single-channel ids 0..5 under the potsdam layout (no shift)."""
    ids = np.random.default_rng(3).integers(0, 6, (TILE, TILE)).astype(np.uint8)
    _png(tmp_path / "image/top_potsdam_2_10_1_RGB.png", _image(0))
    _png(tmp_path / "label/top_potsdam_2_10_1_label.png", ids)
    (tmp_path / "val.txt").write_text(
        "image/top_potsdam_2_10_1_RGB.png label/top_potsdam_2_10_1_label.png\n"
    )
    src = open_source(tmp_path, layout="potsdam", split_file=tmp_path / "val.txt", tile_size=TILE)
    assert src.num_classes == 6 and src.class_names == ISPRS
    np.testing.assert_array_equal(src.load(0)[1], ids)
    # the same tile listed for the mmseg convention is read with reduce_zero_label
    mm = open_source(
        tmp_path, layout="potsdam-mmseg", split_file=tmp_path / "val.txt", tile_size=TILE
    )
    np.testing.assert_array_equal(mm.load(0)[1], _reduce_zero(ids))


PALETTE_TXT = """# class R G B, in id order
low vegetation 0 255 255
building 0 0 255
water 10 20 200
ignore 0 0 0
"""


@pytest.mark.parametrize("kind", ["txt", "json"])
def test_colour_masks_with_a_palette(tmp_path: Path, kind: str) -> None:
    colours = np.array([(0, 255, 255), (0, 0, 255), (10, 20, 200), (0, 0, 0)], np.uint8)
    ids = np.random.default_rng(4).integers(0, 4, (2, TILE, TILE))
    for i in range(2):
        _png(tmp_path / "data/images" / f"t{i}.png", _image(i))
        _png(tmp_path / "data/masks" / f"t{i}.png", colours[ids[i]])
    palette = tmp_path / f"palette.{kind}"
    if kind == "txt":
        palette.write_text(PALETTE_TXT)
    else:
        palette.write_text(
            json.dumps(
                {
                    "low vegetation": [0, 255, 255],
                    "building": [0, 0, 255],
                    "water": [10, 20, 200],
                    "ignore": [0, 0, 0],
                }
            )
        )
    src = open_source(tmp_path / "data", tile_size=TILE, palette=palette)
    assert src.class_names == ("low vegetation", "building", "water") and src.num_classes == 3
    assert src.class_colors == ((0, 255, 255), (0, 0, 255), (10, 20, 200))
    assert src.class_sources == ("#00ffff", "#0000ff", "#0a14c8")
    for i in range(2):
        np.testing.assert_array_equal(src.load(i)[1], np.where(ids[i] == 3, 255, ids[i]))
    with pytest.raises(LabelConventionError, match="--reduce-zero-label applies to index masks"):
        open_source(tmp_path / "data", tile_size=TILE, palette=palette, reduce_zero_label=True)
    off = colours[ids[0]].copy()
    off[0, 0] = (10, 20, 201)  # one pixel off the palette: exact matching, no snapping
    _png(tmp_path / "data/masks/t0.png", off)
    with pytest.raises(MaskValueError, match=r"t0\.png has colours #0a14c9 \(1 px\).*--palette"):
        open_source(tmp_path / "data", tile_size=TILE, palette=palette)


def test_dataset_layouts_refuse_contradicting_options(tmp_path: Path, isprs_tiles: dict) -> None:
    root = tmp_path / "potsdam"
    with pytest.raises(LabelConventionError, match=r"potsdam-mmseg fixes.*--no-reduce-zero-label"):
        open_source(root, layout="potsdam-mmseg", tile_size=TILE, reduce_zero_label=False)
    with pytest.raises(LabelConventionError, match=r"--classes gives 2 names.*6 classes"):
        open_source(root, layout="potsdam-mmseg", tile_size=TILE, class_names="a,b")


def test_label_fields_in_the_fingerprint_but_not_the_counts() -> None:
    base = StoreSchema("d", 64, class_names=("a", "b"))
    assert "class_colors" not in base.to_dict()  # stores without them keep their fingerprint
    coloured = StoreSchema("d", 64, class_names=("a", "b"), class_colors=((0, 0, 0), (1, 2, 3)))
    counted = StoreSchema(
        "d",
        64,
        class_names=("a", "b"),
        class_colors=((0, 0, 0), (1, 2, 3)),
        label_stats={
            "class_pixels": [1, 2],
            "ignore_pixels": 3,
            "labeled_tiles": 1,
            "unlabeled_tiles": 0,
        },
    )
    assert fingerprint(base, []) != fingerprint(coloured, []) == fingerprint(counted, [])
    assert StoreSchema.from_dict(counted.to_dict()) == counted
    old = class_table_lines(base)
    assert any("not recorded" in line for line in old)


def test_cli_layout_choices_match_the_library() -> None:
    from featcache.cli_source import LAYOUT_CHOICES

    assert set(LAYOUT_CHOICES) == set(LAYOUTS)


TINY = [
    "--teacher",
    "dinov2_vitb14",
    "--tiny",
    "--tile-size",
    str(TILE),
    "--base-size",
    "70",
    "--scales",
    "1",
    "--no-flip",
    "-q",
]


def _table(text: str) -> dict[str, tuple[int, str]]:
    """``name -> (pixels, share)`` rows of a printed class table."""
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s.*?\s(\d+)\s+(\d+\.\d) %$", text, re.M)
    return {name: (int(px), share) for _, name, px, share in rows}


def test_cli_extract_and_info_print_the_class_table(tmp_path: Path, isprs_tiles: dict) -> None:
    from featcache.cli import main

    store = tmp_path / "s.zarr"
    run = CliRunner().invoke(
        main, ["extract", str(tmp_path / "potsdam"), str(store), "--layout", "potsdam-mmseg", *TINY]
    )
    assert run.exit_code == 0, run.output
    raw = np.stack(list(isprs_tiles.values()))
    total = raw.size
    expect = {name: int((raw == k + 1).sum()) for k, name in enumerate(ISPRS)}
    expect["(ignore)"] = int((raw == 0).sum())
    shares = {n: f"{100 * c / total:.1f}" for n, c in expect.items()}
    for text in (run.output, CliRunner().invoke(main, ["info", str(store)]).output):
        assert "reduce-zero-label" in text and "#ffffff" in text
        assert _table(text) == {n: (c, shares[n]) for n, c in expect.items()}, text
    # a store written before the table existed still opens; info says "not recorded"
    group = zarr.open_group(str(store), mode="r+")
    meta = dict(group.attrs["featstore"])
    meta["schema"] = {
        k: v
        for k, v in meta["schema"].items()
        if k not in ("class_colors", "class_sources", "label_rule", "label_stats")
    }
    group.attrs["featstore"] = meta
    info = CliRunner().invoke(main, ["info", str(store)])
    assert info.exit_code == 0 and "pixel counts: not recorded" in info.output, info.output


def test_cli_extract_warns_about_zero(tmp_path: Path) -> None:
    from featcache.cli import main

    _generic_isprs(tmp_path / "g", [_isprs_ann(1, False)])
    run = CliRunner().invoke(
        main, ["extract", str(tmp_path / "g"), str(tmp_path / "s.zarr"), *TINY]
    )
    assert run.exit_code == 0, run.output
    assert "warning: masks in" in run.stderr and "--reduce-zero-label" in run.stderr


LOVEDA_RGB = (
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
)


@pytest.mark.parametrize("layout", ["loveda", "loveda-mmseg"])
def test_loveda_layouts_state_their_convention(tmp_path: Path, layout: str) -> None:
    """Official tree and mmseg's copy of it: raw 0 = no-data -> ignore, 1..7 -> ids 0..6."""
    raw = np.random.default_rng(5).integers(0, 8, (TILE, TILE)).astype(np.uint8)
    if layout == "loveda":
        image, mask = "Train/Urban/images_png/7.png", "Train/Urban/masks_png/7.png"
    else:
        image, mask = "img_dir/train/7.png", "ann_dir/train/7.png"
    _png(tmp_path / image, _image(0))
    _png(tmp_path / mask, raw)
    src = open_source(tmp_path, layout=layout, tile_size=TILE)
    assert src.class_names == LOVEDA and src.num_classes == 7 and src.dataset == "loveda"
    np.testing.assert_array_equal(src.load(0)[1], _reduce_zero(raw))
    assert src.class_sources == tuple(str(v) for v in range(1, 8))
    assert src.class_colors == LOVEDA_RGB
    assert "0 and 255 = ignore" in src.label_rule and "v-1" in src.label_rule


def test_ignore_index_and_labels_json(tmp_path: Path) -> None:
    raw = np.random.default_rng(6).integers(0, 3, (TILE, TILE)).astype(np.uint8)
    raw[:5] = 9  # a no-data value of this dataset
    _png(tmp_path / "images/t0.png", _image(0))
    _png(tmp_path / "masks/t0.png", raw)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    src = open_source(tmp_path, tile_size=TILE, ignore_index=9, reduce_zero_label=False)
    np.testing.assert_array_equal(src.load(0)[1], np.where(raw == 9, 255, raw))
    assert "9" in src.label_rule
    # the dataset's own labels.json states the convention; a contradicting option is refused
    (tmp_path / "labels.json").write_text('{"reduce_zero_label": false, "ignore_index": 9}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = open_source(tmp_path, tile_size=TILE)
    np.testing.assert_array_equal(src.load(0)[1], np.where(raw == 9, 255, raw))
    with pytest.raises(LabelConventionError, match=r"--reduce-zero-label True contradicts"):
        open_source(tmp_path, tile_size=TILE, reduce_zero_label=True)
    (tmp_path / "labels.json").write_text('{"reduce_zero": true}')
    with pytest.raises(LabelConventionError, match=r"labels\.json: unexpected \['reduce_zero'\]"):
        open_source(tmp_path, tile_size=TILE)


def test_default_colours_are_the_voc_map() -> None:
    """Generic stores draw with the Pascal VOC map (its published first entries)."""
    voc = [
        (0, 0, 0),
        (128, 0, 0),
        (0, 128, 0),
        (128, 128, 0),
        (0, 0, 128),
        (128, 0, 128),
        (0, 128, 128),
        (128, 128, 128),
        (64, 0, 0),
        (192, 0, 0),
    ]
    old = StoreSchema("d", 64, class_names=tuple("abcdefghij"))
    assert list(old.display_colors) == voc  # a store without class_colors still gets colours
    isprs = StoreSchema("p", 64, class_names=ISPRS, class_colors=tuple(ISPRS_RGB))
    assert list(isprs.display_colors) == ISPRS_RGB
