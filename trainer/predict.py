"""Teacher-free prediction from a training checkpoint.

Inputs: image files, a folder of images, or a feature store (its pixels and tile index). Output
per input: ``<name>.png``, a palette PNG whose pixel values are the class indices (readable as
raw indices by any reader, coloured in viewers), and ``<name>.tif``, a single-band GeoTIFF with
the tile's transform and CRS, when the input carries georeferencing (a GeoTIFF input, or a store
tile whose index has a transform). Needs neither a teacher nor a store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.checkpoint import load_student
from trainer.evaluate import predict_logits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# LoveDA-like colours for the first classes, then a deterministic pseudo-random palette.
_BASE_COLOURS = [(255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183),
                 (0, 255, 0), (255, 195, 128)]


class PredictError(ValueError):
    """An input cannot be read or an output cannot be written."""


@dataclass
class PredictInput:
    """One image to segment with its optional georeferencing."""

    name: str
    image: np.ndarray
    transform: tuple[float, ...] | None = None
    crs: str | None = None


def palette(num_classes: int) -> list[int]:
    """Flat 768-value PNG palette: fixed colours for the first classes, seeded ones after."""
    rng = np.random.default_rng(0)
    colours = list(_BASE_COLOURS) + [tuple(int(v) for v in rng.integers(0, 256, 3))
                                     for _ in range(max(256 - len(_BASE_COLOURS), 0))]
    colours[255] = (0, 0, 0)
    return [c for rgb in colours[:256] for c in rgb]


def _read_file(path: Path) -> PredictInput:
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import rasterio
        except ImportError as err:
            raise PredictError(f"{path}: reading GeoTIFF needs rasterio (pip install "
                               "rasterio)") from err
        with rasterio.open(path) as src:
            arr = src.read(indexes=[1, 2, 3] if src.count >= 3 else [1, 1, 1])
            transform = tuple(src.transform.to_gdal()) if src.transform else None
            crs = src.crs.to_string() if src.crs else None
        return PredictInput(path.stem, np.ascontiguousarray(arr.transpose(1, 2, 0)).astype(
            np.uint8), transform, crs)
    try:
        with Image.open(path) as im:
            return PredictInput(path.stem, np.array(im.convert("RGB")))
    except OSError as err:
        raise PredictError(f"cannot read image {path}: {err}") from err


def _store_inputs(url: str) -> Iterator[PredictInput]:
    from featstore import open_store

    store = open_store(url)
    done = store.done()
    for i, rec in enumerate(store.tiles):
        if done[i]:
            yield PredictInput(rec.tile_id.replace("/", "_"), store.read_image(i),
                               rec.transform, rec.crs)


def iter_inputs(inputs: Sequence[str | Path]) -> Iterator[PredictInput]:
    """Images from files, folders (sorted, image suffixes) and stores (``*.zarr`` or a store)."""
    for item in inputs:
        path = Path(item)
        if str(item).endswith(".zarr") or (path / "zarr.json").is_file():
            yield from _store_inputs(str(item))
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise PredictError(f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
            for f in files:
                yield _read_file(f)
        elif path.is_file():
            yield _read_file(path)
        else:
            raise PredictError(f"input {item} does not exist; give image files, a folder or a "
                               "store")


def _write_geotiff(path: Path, labels: np.ndarray, transform: tuple[float, ...],
                   crs: str | None) -> None:
    import rasterio
    from rasterio.transform import Affine

    profile = {"driver": "GTiff", "height": labels.shape[0], "width": labels.shape[1],
               "count": 1, "dtype": "uint8", "transform": Affine.from_gdal(*transform),
               "crs": crs, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(labels, 1)


def predict(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
            device: str = "cpu", weights: str = "ema", mode: str = "whole",
            crop: int | None = None, geotiff: bool = True) -> list[Path]:
    """Segment ``inputs`` with a checkpoint's student; returns the written files.

    Args:
        checkpoint: ``best.pt`` / ``latest.pt`` of a run.
        inputs: Image files, folders, or store URLs.
        out_dir: Output folder (created).
        device: Torch device.
        weights: ``"ema"`` or ``"student"``.
        mode: ``"whole"`` (resize to a multiple of 14) or ``"sliding"``.
        crop: Sliding window size (default: the run's crop size).
        geotiff: Also write GeoTIFFs for georeferenced inputs.
    """
    model, ckpt = load_student(checkpoint, weights, device)
    crop = crop or int(ckpt["config"]["crop_size"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pal = palette(int(model.cfg.num_classes))
    written: list[Path] = []
    for item in iter_inputs(inputs):
        x = torch.from_numpy(np.ascontiguousarray(item.image)).to(device)
        x = x.permute(2, 0, 1).unsqueeze(0).float() / 255.0
        labels = predict_logits(model, x, mode, crop).argmax(1)[0].to(torch.uint8).cpu().numpy()
        png = out / f"{item.name}.png"
        img = Image.fromarray(labels)
        img.putpalette(pal)  # "L" -> "P": values stay the class indices
        img.save(png)
        written.append(png)
        if geotiff and item.transform is not None:
            tif = out / f"{item.name}.tif"
            _write_geotiff(tif, labels, item.transform, item.crs)
            written.append(tif)
    return written


__all__ = ["PredictError", "PredictInput", "iter_inputs", "palette", "predict"]
