"""Tile sources: every layout against an independent read (PIL / rasterio + numpy slicing)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.sources import (
    BandError,
    EmptySourceError,
    ImageReadError,
    LabelConventionError,
    LayoutError,
    MaskValueError,
    SizeMismatchError,
    SourceError,
    SplitFileError,
    open_source,
)
from pipelines.synthetic import synthetic_scene

LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _hash(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def _scene(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_scene(np.random.default_rng(seed), size)


def _loveda_raw(mask: np.ndarray, seed: int) -> np.ndarray:
    """Index mask -> LoveDA raw (+1) with a no-data (0) corner."""
    raw = mask + 1
    raw[: 8 + seed, :10] = 0
    return raw


def _expected_loveda_mask(raw: np.ndarray) -> np.ndarray:
    return np.where(raw == 0, 255, raw.astype(np.int64) - 1).astype(np.uint8)


# --------------------------------------------------------------------------- LoveDA


def test_loveda_sample_tiles_match_pil_slices(loveda_sample: Path) -> None:
    src = open_source(loveda_sample, layout="loveda-folder", tile_size=512)
    assert len(src) == 12 and src.num_classes == 7 and src.class_names == LOVEDA_CLASSES
    assert src.dataset == "loveda" and src.ignore_index == 255
    ids = [r.tile_id for r in src.records]
    assert ids == sorted(ids) and len(set(ids)) == 12
    for i, rec in enumerate(src.records):
        stem = Path(rec.source).stem
        scene = np.asarray(Image.open(loveda_sample / "images" / f"{stem}.png").convert("RGB"))
        raw = np.asarray(Image.open(loveda_sample / "masks" / f"{stem}.png"))
        r, c, h, w = rec.window
        image, mask = src.load(i)
        assert image.dtype == np.uint8 and image.flags.c_contiguous
        assert image.shape == (512, 512, 3)
        np.testing.assert_array_equal(image, scene[r : r + h, c : c + w])
        np.testing.assert_array_equal(mask, _expected_loveda_mask(raw[r : r + h, c : c + w]))
        assert rec.pixel_hash == _hash(scene[r : r + h, c : c + w])
    assert {r.window[:2] for r in src.records} == {(0, 0), (0, 512), (512, 0), (512, 512)}


def _fake_loveda(root: Path, size: int = 128) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    scenes = {}
    for seed, rel in enumerate(["Train/Urban/7", "Train/Rural/3", "Val/Rural/11"]):
        split, domain, name = rel.split("/")
        image, mask = _scene(seed, size)
        raw = _loveda_raw(mask, seed)
        _png(root / split / domain / "images_png" / f"{name}.png", image)
        _png(root / split / domain / "masks_png" / f"{name}.png", raw)
        scenes[f"{split}/{domain}/images_png/{name}"] = (image, raw)
    return scenes


def test_loveda_tree_layout(tmp_path: Path) -> None:
    scenes = _fake_loveda(tmp_path)
    src = open_source(tmp_path, tile_size=64)  # auto-detects the LoveDA tree
    assert src.dataset == "loveda" and len(src) == 3 * 4
    assert {r.split for r in src.records} == {"train", "val"}
    for i, rec in enumerate(src.records):
        key = rec.tile_id.rsplit("_r", 1)[0]
        image, raw = scenes[key]
        r, c, h, w = rec.window
        got_img, got_mask = src.load(i)
        np.testing.assert_array_equal(got_img, image[r : r + h, c : c + w])
        np.testing.assert_array_equal(got_mask, _expected_loveda_mask(raw[r : r + h, c : c + w]))
        assert rec.split == ("val" if key.startswith("Val") else "train")
    assert 255 in src.load(0)[1]  # the no-data corner
    val = open_source(tmp_path, tile_size=64, split="val")
    assert len(val) == 4
    assert all(r.tile_id.startswith("Val/Rural/images_png/11_r") for r in val.records)
    with pytest.raises(EmptySourceError, match=r"no split 'test'.*\['train', 'val'\]"):
        open_source(tmp_path, tile_size=64, split="test")


def test_records_stable_and_picklable(tmp_path: Path) -> None:
    _fake_loveda(tmp_path)
    a = open_source(tmp_path, layout="loveda", tile_size=64)
    b = open_source(tmp_path, layout="loveda", tile_size=64)
    assert a.records == b.records
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.load(5)[0], a.load(5)[0])


# --------------------------------------------------------------------------- Potsdam / DeepGlobe

POTSDAM_RGB = np.array(
    [[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]], np.uint8
)
DEEPGLOBE_RGB = np.array(
    [
        [0, 255, 255],
        [255, 255, 0],
        [255, 0, 255],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 255],
        [0, 0, 0],
    ],
    np.uint8,
)


def test_potsdam_overlap_last_and_colour_labels(tmp_path: Path) -> None:
    image, _ = _scene(3, 150)
    labels = np.random.default_rng(0).integers(0, 6, (150, 150)).astype(np.uint8)
    # plain (non-georeferenced) TIFFs written by PIL, read back through rasterio
    _png(tmp_path / "2_Ortho_RGB" / "top_potsdam_2_10_RGB.tif", image)
    _png(tmp_path / "5_Labels_all" / "top_potsdam_2_10_label.tif", POTSDAM_RGB[labels])
    src = open_source(tmp_path, tile_size=64)
    assert src.dataset == "potsdam" and src.num_classes == 6 and len(src) == 9
    starts = [0, 64, 86]  # 150 - 64 = 86: last window flush with the edge, no padding
    assert [r.window for r in src.records] == [(a, b, 64, 64) for a in starts for b in starts]
    for i, (r, c, h, w) in enumerate(r.window for r in src.records):
        got_img, got_mask = src.load(i)
        np.testing.assert_array_equal(got_img, image[r : r + h, c : c + w])
        np.testing.assert_array_equal(got_mask, labels[r : r + h, c : c + w])
    assert src.records[0].transform is None and src.records[0].crs is None


def test_deepglobe_pad_with_unknown(tmp_path: Path) -> None:
    image, _ = _scene(4, 150)
    labels = np.random.default_rng(1).integers(0, 7, (150, 150)).astype(np.uint8)
    colours = DEEPGLOBE_RGB[labels].astype(np.int16)
    colours = np.clip(colours + np.random.default_rng(2).integers(-20, 21, colours.shape), 0, 255)
    (tmp_path / "train").mkdir()
    Image.fromarray(image).save(tmp_path / "train" / "998_sat.jpg", quality=90)
    _png(tmp_path / "train" / "998_mask.png", colours.astype(np.uint8))
    src = open_source(tmp_path, tile_size=64)
    assert src.dataset == "deepglobe" and len(src) == 9
    assert {r.split for r in src.records} == {"train"}
    jpeg = np.asarray(Image.open(tmp_path / "train" / "998_sat.jpg"))  # decoded independently
    padded_img = np.zeros((192, 192, 3), np.uint8)
    padded_img[:150, :150] = jpeg
    padded_mask = np.full((192, 192), 6, np.uint8)
    padded_mask[:150, :150] = labels
    for i, rec in enumerate(src.records):
        r, c, h, w = rec.window
        got_img, got_mask = src.load(i)
        np.testing.assert_array_equal(got_img, padded_img[r : r + h, c : c + w])
        np.testing.assert_array_equal(got_mask, padded_mask[r : r + h, c : c + w])
    assert src.records[-1].window == (128, 128, 64, 64)


def test_colour_outside_palette(tmp_path: Path) -> None:
    image, _ = _scene(5, 64)
    bad = np.full((64, 64, 3), (255, 0, 255), np.uint8)  # magenta is not an ISPRS colour
    Image.fromarray(image).save(tmp_path / "top_potsdam_2_11_RGB.tif")
    Image.fromarray(bad).save(tmp_path / "top_potsdam_2_11_label.tif")
    with pytest.raises(MaskValueError, match=r"top_potsdam_2_11_label\.tif.*magenta.*potsdam"):
        open_source(tmp_path, tile_size=64)


# --------------------------------------------------------------------------- GeoTIFF


def _geotiff(path: Path, data: np.ndarray, crs: str = "EPSG:32631"):  # noqa: ANN202
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    transform = from_origin(500000.0, 5600000.0, 0.3, 0.3)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype="uint8",
        crs=crs,
        transform=transform,
    ) as ds:
        ds.write(data)
    return transform


@pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
def test_geotiff_windows_transforms(tmp_path: Path) -> None:
    rasterio = pytest.importorskip("rasterio")
    from rasterio.windows import Window

    data = np.random.default_rng(0).integers(0, 256, (3, 100, 90)).astype(np.uint8)
    _geotiff(tmp_path / "scene.tif", data)
    src = open_source(tmp_path / "scene.tif", tile_size=64)  # a single file: geotiff layout
    assert len(src) == 4 and src.records[0].crs == "EPSG:32631"
    with rasterio.open(tmp_path / "scene.tif") as ds:
        for i, rec in enumerate(src.records):
            r, c, h, w = rec.window
            expect = ds.window_transform(Window(c, r, w, h))
            assert rec.transform == pytest.approx(tuple(expect)[:6])
            pixels = ds.read(window=Window(c, r, min(w, 90 - c), min(h, 100 - r)))
            image, mask = src.load(i)
            assert mask is None
            np.testing.assert_array_equal(
                image[: pixels.shape[1], : pixels.shape[2]], np.moveaxis(pixels, 0, -1)
            )
            assert image[pixels.shape[1] :].sum() == 0 and image[:, pixels.shape[2] :].sum() == 0


@pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
def test_geotiff_bands(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, (4, 64, 64)).astype(np.uint8)
    _geotiff(tmp_path / "nir.tif", data)
    with pytest.raises(BandError, match=r"nir\.tif is 4-band.*--bands 1,2,3 \(bands=\(1,2,3\)\)"):
        open_source(tmp_path, tile_size=64)
    src = open_source(tmp_path, tile_size=64, bands=(4, 2, 1))
    np.testing.assert_array_equal(src.load(0)[0], np.moveaxis(data[[3, 1, 0]], 0, -1))
    with pytest.raises(BandError, match=r"bands=\(1, 5, 2\).*nir\.tif \(4 bands\)"):
        open_source(tmp_path, tile_size=64, bands=(1, 5, 2))


def test_geotiff_without_rasterio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.tif")
    monkeypatch.setitem(__import__("sys").modules, "rasterio", None)
    with pytest.raises(ImportError, match=r"featcache\[geo\]"):
        open_source(tmp_path, tile_size=64)


# --------------------------------------------------------------------------- generic + split files


def _folder(root: Path, n: int = 3, size: int = 64, classes: bool = True) -> list[np.ndarray]:
    images = []
    for i in range(n):
        image, mask = _scene(10 + i, size)
        _png(root / "images" / f"t{i}.png", image)
        _png(root / "masks" / f"t{i}.png", mask)
        images.append(image)
    if classes:
        (root / "classes.txt").write_text("\n".join(LOVEDA_CLASSES) + "\n")
        (root / "labels.json").write_text('{"reduce_zero_label": false}')  # values are ids
    return images


def test_generic_folder_classes(tmp_path: Path) -> None:
    _folder(tmp_path, classes=False)
    masks = [np.asarray(Image.open(tmp_path / "masks" / f"t{i}.png")) for i in range(3)]
    zeros = sum(int((m == 0).sum()) for m in masks)
    # the class count never comes from the largest mask value: no names, no source
    with pytest.raises(LabelConventionError, match=rf"Value histogram: 0: {zeros} px.*--classes"):
        open_source(tmp_path, tile_size=64)
    names = ",".join(LOVEDA_CLASSES)
    src = open_source(
        tmp_path, tile_size=64, split="val", class_names=names, reduce_zero_label=False
    )
    assert src.dataset == tmp_path.name and len(src) == 3
    assert src.class_names == LOVEDA_CLASSES
    assert {r.split for r in src.records} == {"val"}  # no split folders: split= labels the tiles
    assert [r.tile_id for r in src.records] == ["images/t0", "images/t1", "images/t2"]


def test_split_files(tmp_path: Path) -> None:
    images = _folder(tmp_path / "data")
    splits = tmp_path / "splits" / "demo" / "1%"
    splits.mkdir(parents=True)
    lines = "./images/t2.png ./masks/t2.png\nimages/t0.png masks/t0.png\n"
    (splits / "labeled.txt").write_text(lines)
    (splits / "unlabeled.txt").write_text("images/t1.png masks/nowhere.png\n")  # mask ignored
    src = open_source(
        tmp_path / "data",
        layout="loveda-folder",
        split_file=[splits / "labeled.txt", splits / "unlabeled.txt"],
        tile_size=64,
    )
    assert [(r.tile_id, r.split) for r in src.records] == [
        ("images/t0", "labeled"),
        ("images/t1", "unlabeled"),
        ("images/t2", "labeled"),
    ]
    np.testing.assert_array_equal(src.load(2)[0], images[2])
    assert src.load(1)[1] is None
    # paths relative to the split file's own folder also resolve
    (tmp_path / "data" / "val.txt").write_text("images/t1.png masks/t1.png\n")
    val = open_source(
        tmp_path, split_file=tmp_path / "data" / "val.txt", tile_size=64, reduce_zero_label=False
    )
    assert [r.split for r in val.records] == ["val"] and val.load(0)[1] is not None


def test_split_file_errors(tmp_path: Path) -> None:
    _folder(tmp_path)
    bad = tmp_path / "labeled.txt"
    bad.write_text("images/t0.png masks/t0.png\nimages/t9.png masks/t9.png\n")
    with pytest.raises(SplitFileError, match=r"labeled\.txt line 2: image 'images/t9\.png'"):
        open_source(tmp_path, split_file=bad, tile_size=64)
    bad.write_text("images/t0.png masks/t7.png\n")
    with pytest.raises(SplitFileError, match=r"line 1: mask 'masks/t7\.png' not found"):
        open_source(tmp_path, split_file=bad, tile_size=64)
    bad.write_text("images/t0.png masks/t0.png extra\n")
    with pytest.raises(SplitFileError, match="must not contain spaces"):
        open_source(tmp_path, split_file=bad, tile_size=64)
    bad.write_text("\n\n")
    with pytest.raises(EmptySourceError, match=r"labeled\.txt lists no images"):
        open_source(tmp_path, split_file=bad, tile_size=64)


# --------------------------------------------------------------------------- bad input


def test_all_errors_are_value_errors() -> None:
    for cls in (
        BandError,
        EmptySourceError,
        ImageReadError,
        LayoutError,
        MaskValueError,
        SizeMismatchError,
        SplitFileError,
    ):
        assert issubclass(cls, SourceError) and issubclass(cls, ValueError)


def test_truncated_and_non_image(tmp_path: Path) -> None:
    _folder(tmp_path)
    path = tmp_path / "images" / "t1.png"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageReadError, match=r"images/t1\.png.*re-download or remove"):
        open_source(tmp_path, tile_size=64)
    path.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match=r"images/t1\.png"):
        open_source(tmp_path, tile_size=64)


def test_mask_out_of_range(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(MaskValueError, match=r"masks/t0\.png has label values \[3, 4.*0\.\.2"):
        open_source(tmp_path, tile_size=64)
    raw = np.full((64, 64), 9, np.uint8)  # LoveDA raw labels stop at 7
    _png(tmp_path / "masks" / "t0.png", raw)
    with pytest.raises(MaskValueError, match=r"t0\.png has raw loveda values \[9\].*0\.\.7"):
        open_source(tmp_path, layout="loveda-folder", tile_size=64)


def test_size_mismatch(tmp_path: Path) -> None:
    _folder(tmp_path)
    _png(tmp_path / "masks" / "t1.png", np.zeros((64, 32), np.uint8))
    with pytest.raises(SizeMismatchError, match=r"t1\.png is 64x64 px.*masks/t1\.png is 64x32"):
        open_source(tmp_path, tile_size=64)


@pytest.mark.parametrize(("mode", "shape"), [("L", (64, 64)), ("RGBA", (64, 64, 4))])
def test_non_rgb_needs_bands(tmp_path: Path, mode: str, shape: tuple[int, ...]) -> None:
    _folder(tmp_path)
    arr = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    Image.fromarray(arr, mode).save(tmp_path / "images" / "t2.png")
    # A gray file has one band: only --bands 1,1,1 is a valid selection (issue 11, #10).
    hint = r"--bands 1,1,1 \(bands=\(1,1,1\)\)" if mode == "L" else r".*--bands 1,2,3"
    with pytest.raises(BandError, match=r"t2\.png is .*RGB is required: pass " + hint) as err:
        open_source(tmp_path, tile_size=64)
    assert mode != "L" or "1,2,3" not in str(err.value)
    if mode == "RGBA":
        src = open_source(tmp_path, tile_size=64, bands=(1, 2, 3))
        np.testing.assert_array_equal(src.load(2)[0], arr[..., :3])


def test_empty_unknown_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(EmptySourceError, match=f"no images found in {tmp_path}"):
        open_source(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(EmptySourceError, match="no images found"):
        open_source(tmp_path)
    with pytest.raises(LayoutError, match=r"unknown layout 'lovedaa'.*loveda-folder"):
        open_source(tmp_path, layout="lovedaa")
    with pytest.raises(EmptySourceError, match="does not exist"):
        open_source(tmp_path / "nope")
    _folder(tmp_path, n=1)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "images" / "t0.jpg")
    with pytest.raises(SourceError, match=r"same tile id 'images/t0'.*t0\.(jpg|png)"):
        open_source(tmp_path, tile_size=64)
