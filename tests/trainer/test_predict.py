"""Teacher-free prediction: PNG masks equal a direct forward, GeoTIFFs keep the tile transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featstore import open_store
from tests.helpers import CROP, DINO, TILE, build_store, tiny_config
from trainer.checkpoint import CheckpointError, load_student
from trainer.config import TeacherConfig
from trainer.engine import train
from trainer.predict import predict
from trainer.student import Student, StudentConfig

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(checkpoint, store url, image folder) of a one-iteration tiny run."""
    root = tmp_path_factory.mktemp("predict")
    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    train(tiny_config(root, url, ids, [TeacherConfig(DINO)], iters=1))
    return root / "run" / "latest.pt", url, root / "syn" / "images"


def test_checkpoint_holds_no_teacher(run: tuple[Path, str, Path]) -> None:
    from trainer.online import load_teachers

    ckpt = torch.load(run[0], map_location="cpu", weights_only=True)
    teacher = load_teachers([TeacherConfig(DINO)], True, torch.device("cpu"), CROP)[DINO]
    t_keys = set(teacher.state_dict())
    for part in ("student", "ema"):
        keys = set(ckpt[part])
        assert {k.split(".")[0] for k in keys} <= {"backbone", "head", "translators", "projections"}
        assert not keys & t_keys
        n_student = sum(v.numel() for v in ckpt[part].values())
        assert n_student == sum(
            p.numel()
            for p in Student(StudentConfig(**ckpt["student_config"])).state_dict().values()
        )


def test_predict_png_equals_direct_forward(run: tuple[Path, str, Path], tmp_path: Path) -> None:
    ckpt_path, _, images = run
    files = predict(ckpt_path, [images], tmp_path / "out")
    pngs = sorted(p for p in files if p.suffix == ".png" and p.stem != "legend")
    assert [p.stem for p in pngs] == sorted(p.stem for p in images.glob("*.png"))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = Student(StudentConfig(**ckpt["student_config"])).eval()
    model.load_state_dict(ckpt["ema"])
    for png in pngs:
        img = np.array(Image.open(images / png.name).convert("RGB"))
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, (CROP, CROP), mode="bilinear", align_corners=True)
        with torch.no_grad():
            logits = model((x - MEAN) / STD).logits
        want = F.interpolate(logits, (TILE, TILE), mode="bilinear", align_corners=True).argmax(1)
        got = Image.open(png)
        assert got.mode == "P"
        assert np.array_equal(np.asarray(got), want[0].numpy().astype(np.uint8))


def test_predict_geotiff_keeps_the_tile_transform(tmp_path: Path) -> None:
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import Affine

    rng = np.random.default_rng(0)
    scene = tmp_path / "scene.tif"
    transform = Affine(0.5, 0.0, 300000.0, 0.0, -0.5, 5000000.0)
    with rasterio.open(
        scene,
        "w",
        driver="GTiff",
        height=TILE,
        width=2 * TILE,
        count=3,
        dtype="uint8",
        transform=transform,
        crs="EPSG:32631",
    ) as dst:
        dst.write(rng.integers(0, 256, (3, TILE, 2 * TILE), dtype=np.uint8))
    url = build_store(tmp_path, teachers=(DINO,), source=scene)
    st = open_store(url)
    assert len(st.tiles) == 2 and st.tiles[1].transform is not None
    # a checkpoint from a labeled run elsewhere; prediction needs no teacher and no training store
    root = tmp_path / "train"
    root.mkdir()
    src = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(src).tiles]
    train(tiny_config(root, src, ids, [TeacherConfig(DINO)], iters=1))
    files = predict(root / "run" / "latest.pt", [url], tmp_path / "out", use="student")
    tifs = sorted(p for p in files if p.suffix == ".tif")
    assert len(tifs) == 2
    for tif, rec in zip(tifs, st.tiles, strict=True):
        with rasterio.open(tif) as ds:
            assert ds.transform.to_gdal() == pytest.approx(rec.transform)
            assert ds.crs.to_string() == "EPSG:32631" and ds.count == 1
            png = np.asarray(Image.open(tif.with_suffix(".png")))
            assert np.array_equal(ds.read(1), png)


def test_wrong_or_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_student(tmp_path / "none.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a featcache training checkpoint"):
        load_student(tmp_path / "other.pt")


def test_a_run_with_pretrained_weights_loads_without_the_weight_file(tmp_path: Path) -> None:
    # A real run records the backbone file it started from and no permission for random init;
    # predicting from its checkpoint needs neither the file nor that permission.
    from trainer.checkpoint import save_checkpoint, student_config_dict

    kwargs = {"embed_dim": 32, "depth": 4, "num_heads": 2}
    cfg = StudentConfig(
        num_classes=3, layers=(0, 1, 2, 3), random_weights=True, model_kwargs=kwargs
    )
    src = Student(cfg)
    scfg = student_config_dict(src.cfg)
    scfg.update(backbone_weights=str(tmp_path / "gone" / "dinov2_vits14.pth"), random_weights=False)
    state = src.state_dict()
    save_checkpoint(
        tmp_path / "best.pt",
        {"student": state, "ema": state, "student_config": scfg, "config": {"crop_size": 70}},
    )
    model, _ = load_student(tmp_path / "best.pt", "student")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
