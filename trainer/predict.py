"""Teacher-free prediction from a training checkpoint or an exported ``.safetensors``.

Inputs: image files, a folder of images, or a feature store (its pixels and tile index). Output
per input: ``<name>.png``, a palette PNG whose pixel values are the class indices (readable as
raw indices by any reader, coloured in viewers with the dataset's palette), and ``<name>.tif``, a
single-band GeoTIFF with the tile's transform and CRS, when the input carries georeferencing (a
GeoTIFF input, or a store tile whose index has a transform). Once per run: ``legend.json`` and
``legend.png`` (class id, name and colour). Class names and colours come from the checkpoint;
colours fall back to the fixed default palette (``featstore.schema.default_class_colors``) when
the dataset defined none. Needs neither a teacher nor a store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from featstore.constants import PATCH_SIZE
from featstore.errors import FeatcacheError
from featstore.schema import default_class_colors
from trainer.checkpoint import (
    CheckpointError,
    class_colors,
    class_names,
    default_weights,
    read_checkpoint,
    read_export,
    require_keys,
)
from trainer.config import METHOD_NAMES, METHOD_PATCH
from trainer.evaluate import predict_logits
from trainer.methods import METHODS, Method

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# --use values beyond one model's name: every model the checkpoint's method evaluates, and the
# student + EMA pair (`featcache evaluate`'s former default, kept for scripts).
USE_ALL, USE_BOTH = "all", "both"
USE_GROUPS = {USE_BOTH: ("student", "ema")}


class PredictError(FeatcacheError, ValueError):
    """An input cannot be read or an output cannot be written."""


@dataclass
class PredictInput:
    """One image to segment with its optional georeferencing."""

    name: str
    image: np.ndarray
    transform: tuple[float, ...] | None = None
    crs: str | None = None


def legend_colours(ckpt: dict[str, Any]) -> list[tuple[int, int, int]]:
    """One RGB per class: the dataset's palette from the checkpoint, the default for the rest."""
    n = int(ckpt["student_config"]["num_classes"])
    given = class_colors(ckpt) or []
    # the project's one fallback palette (also what `info` shows for such stores)
    return (list(given) + list(default_class_colors(n))[len(given) :])[:n]


def palette(colours: Sequence[tuple[int, int, int]]) -> list[int]:
    """Flat 768-value PNG palette: ``colours`` for the class ids, black for the rest (255 too)."""
    full = list(colours)[:256] + [(0, 0, 0)] * max(256 - len(colours), 0)
    return [c for rgb in full for c in rgb]


def write_legend(
    out: Path, names: Sequence[str], colours: Sequence[tuple[int, int, int]]
) -> list[Path]:
    """``legend.json`` (id, name, colour per class) and ``legend.png`` (swatches with names)."""
    from PIL import ImageDraw

    rows = [
        {"id": i, "name": n, "color": list(c)}
        for i, (n, c) in enumerate(zip(names, colours, strict=True))
    ]
    js = out / "legend.json"
    js.write_text(json.dumps({"classes": rows}, indent=1) + "\n")
    row_h, sw = 22, 16
    img = Image.new("RGB", (260, row_h * len(rows) + 6), "white")
    draw = ImageDraw.Draw(img)
    for k, row in enumerate(rows):
        y = 4 + k * row_h
        draw.rectangle((6, y, 6 + sw, y + sw), fill=tuple(row["color"]), outline=(0, 0, 0))
        draw.text((30, y + 2), f"{row['id']}  {row['name']}", fill=(0, 0, 0))
    png = out / "legend.png"
    img.save(png)
    return [js, png]


def _read_file(path: Path) -> PredictInput:
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import rasterio
        except ImportError as err:
            raise PredictError(
                f"{path}: reading GeoTIFF needs rasterio (pip install rasterio)"
            ) from err
        with rasterio.open(path) as src:
            arr = src.read(indexes=[1, 2, 3] if src.count >= 3 else [1, 1, 1])
            transform = tuple(src.transform.to_gdal()) if src.transform else None
            crs = src.crs.to_string() if src.crs else None
        return PredictInput(
            path.stem, np.ascontiguousarray(arr.transpose(1, 2, 0)).astype(np.uint8), transform, crs
        )
    try:
        with Image.open(path) as im:
            return PredictInput(path.stem, np.array(im.convert("RGB")))
    except OSError as err:
        raise PredictError(
            f"cannot read image {path}: {err}; the file is truncated or corrupt: restore it, or "
            "remove it from the inputs"
        ) from err


def _store_inputs(store: Any) -> Iterator[PredictInput]:
    done = store.done()
    for i, rec in enumerate(store.tiles):
        if done[i]:
            yield PredictInput(
                rec.tile_id.replace("/", "_"), store.read_image(i), rec.transform, rec.crs
            )


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path | Any]:
    """Image files and opened stores, in order; every bad input is reported before any work.

    Folders expand to their images (sorted, image suffixes); ``*.zarr`` or a folder holding
    ``zarr.json`` is a store.
    """
    from featstore import open_store

    out: list[Path | Any] = []
    for item in inputs:
        path = Path(item)
        if str(item).endswith(".zarr") or (path / "zarr.json").is_file():
            out.append(open_store(str(item)))
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise PredictError(f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
            out += files
        elif path.is_file():
            out.append(path)
        else:
            raise PredictError(
                f"input {item} does not exist; give image files, a folder or a store"
            )
    return out


def count_images(resolved: Sequence[Path | Any]) -> int:
    """Images `iter_inputs` will yield: one per file, one per done tile of a store."""
    return sum(1 if isinstance(r, Path) else int(r.done().sum()) for r in resolved)


def read_inputs(resolved: Sequence[Path | Any]) -> Iterator[PredictInput]:
    """The images of `resolve_inputs`' result, read one at a time."""
    for item in resolved:
        if isinstance(item, Path):
            yield _read_file(item)
        else:
            yield from _store_inputs(item)


def iter_inputs(inputs: Sequence[str | Path]) -> Iterator[PredictInput]:
    """Images from files, folders and stores (see `resolve_inputs`)."""
    yield from read_inputs(resolve_inputs(inputs))


def _write_geotiff(
    path: Path, labels: np.ndarray, transform: tuple[float, ...], crs: str | None
) -> None:
    import rasterio
    from rasterio.transform import Affine

    profile = {
        "driver": "GTiff",
        "height": labels.shape[0],
        "width": labels.shape[1],
        "count": 1,
        "dtype": "uint8",
        "transform": Affine.from_gdal(*transform),
        "crs": crs,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(labels, 1)


def checkpoint_method(ckpt: dict[str, Any], path: str | Path) -> type[Method]:
    """The method whose model a checkpoint holds: its model record's ``method`` (Co2S records
    one), else the run's ``config.method``, else the default (exports of the student)."""
    record = ckpt.get("student_config")
    name = record.get("method") if isinstance(record, dict) else None
    name = name or (ckpt.get("config") or {}).get("method") or METHOD_NAMES[0]
    if name not in METHODS:
        raise CheckpointError(
            f"checkpoint {path} holds a {name!r} model, which this featcache does not know "
            f"(methods: {sorted(METHODS)}); use the featcache version that trained it"
        )
    return METHODS[name]


def _names(ckpt: dict[str, Any], method: type[Method], use: str | None, path: Any) -> list[str]:
    """The models ``--use`` asks for, checked against what the method evaluates."""
    if use is None:
        return [default_weights(ckpt)]
    if use == USE_ALL:
        held = ckpt.get("export", {}).get("use")  # an export holds one weight set
        return [held] if held else list(method.evaluated_names)
    names = list(USE_GROUPS.get(use, (use,)))
    unknown = [n for n in names if n not in method.evaluated_names]
    if unknown:
        raise CheckpointError(
            f"--use {use}: checkpoint {path} holds a {method.name} model, which evaluates "
            f"{', '.join(method.evaluated_names)}; pass --use one of them (evaluate also takes "
            f"--use {USE_ALL})"
        )
    return names


def load_models(
    path: str | Path, use: str | None = None, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """Rebuild a checkpoint's (or an export's) models for evaluation and prediction, through
    its method (`trainer.methods.base.Method.load_models`): no teacher, store or text tower.

    Args:
        path: ``latest.pt`` / ``best.pt`` of a run, or a ``.safetensors`` export.
        use: A model name of the method (``student`` / ``ema``; Co2S: ``clip`` / ``dinov3`` /
            ``fused``), ``all`` (every model the method evaluates; an export: the set it
            holds), ``both`` (student and EMA), or None (the model ``best.pt`` was chosen on,
            `trainer.checkpoint.default_weights`).
        device: Target device.

    Returns:
        ``({name: model in eval mode}, checkpoint dict)``; the dict records ``weights_used``.
    """
    if Path(path).suffix == ".safetensors":
        single = use if use not in (USE_ALL, USE_BOTH) else None
        ckpt, state = read_export(path, single)
        ckpt[ckpt["export"]["use"]] = state  # where a checkpoint keeps that weight set
    else:
        ckpt = read_checkpoint(path)
        require_keys(ckpt, ("config", "student_config"), path, "rebuild its model")
    method = checkpoint_method(ckpt, path)
    method.check_checkpoint(ckpt, path)
    names = _names(ckpt, method, use, path)
    models = method.load_models(ckpt, names, path)
    ckpt["weights_used"] = names[0] if len(names) == 1 else names
    ckpt["method"] = method.name
    return {n: m.to(device).eval() for n, m in models.items()}, ckpt


@dataclass(frozen=True)
class InferenceProtocol:
    """How a checkpoint's model is run on whole images (`trainer.evaluate.predict_logits`)."""

    mode: str
    crop: int
    stride: int | None
    patch: int


def inference_protocol(
    ckpt: dict[str, Any], mode: str | None = None, crop: int | None = None
) -> InferenceProtocol:
    """``mode`` None: the protocol the run validated with (``eval.mode``; Co2S: sliding windows
    at stride 5/6 crop, the official one), ``whole`` for an export; the run's crop and stride;
    the method's input multiple in whole mode (`trainer.config.METHOD_PATCH`)."""
    run_eval = (ckpt.get("config") or {}).get("eval") or {}
    return InferenceProtocol(
        mode=mode or run_eval.get("mode") or "whole",
        crop=crop or int(ckpt["config"]["crop_size"]),
        stride=run_eval.get("stride"),
        patch=METHOD_PATCH.get(str(ckpt.get("method")), PATCH_SIZE),
    )


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    device: str = "cpu",
    use: str | None = None,
    mode: str | None = None,
    crop: int | None = None,
    geotiff: bool = True,
    progress: bool = False,
) -> list[Path]:
    """Segment ``inputs`` with a checkpoint's student; returns the written files.

    Args:
        checkpoint: ``best.pt`` / ``latest.pt`` of a run, or a ``featcache export`` file.
        inputs: Image files, folders, or store URLs.
        out_dir: Output folder (created).
        device: Torch device.
        use: The model (``--use``): ``"ema"`` or ``"student"`` weights; a Co2S checkpoint's
            ``"clip"``, ``"dinov3"`` or ``"fused"``; None: the model the run chose ``best.pt``
            on (``eval.best_model``: student, Co2S clip; an export: the set it holds).
        mode: ``"whole"`` (resize to the model's input multiple) or ``"sliding"``; None: the
            run's evaluation protocol (`inference_protocol`).
        crop: Sliding window size (default: the run's crop size).
        geotiff: Also write GeoTIFFs for georeferenced inputs.
        progress: Show a progress bar (one step per input image).
    """

    resolved = resolve_inputs(inputs)  # a bad input fails before the model is even loaded
    if use in (USE_ALL, USE_BOTH):
        raise PredictError(f"--use {use}: predict writes one model's masks; name one model")
    models, ckpt = load_models(checkpoint, use, device)
    (model,) = models.values()
    protocol = inference_protocol(ckpt, mode, crop)
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    colours = legend_colours(ckpt)
    written: list[Path] = []
    try:
        written += write_legend(out, class_names(ckpt), colours)
        _predict_all(
            model, resolved, out, palette(colours), protocol, device, geotiff, progress, written
        )
    except BaseException:
        # a failed call leaves nothing of its own behind (masks of earlier inputs included)
        for path in written:
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return written


def _predict_all(
    model: Any,
    resolved: Any,
    out: Path,
    pal: list[int],
    protocol: InferenceProtocol,
    device: Any,
    geotiff: bool,
    progress: bool,
    written: list[Path],
) -> None:
    """Segment every input into ``out``; appends each file to ``written`` as it is written."""
    from tqdm.auto import tqdm

    bar = tqdm(total=count_images(resolved), desc="predict", unit="img", disable=not progress)
    for item in read_inputs(resolved):
        if item.name == "legend":
            raise PredictError(
                f"an input named 'legend' would overwrite {out}/legend.png; rename that image"
            )
        x = torch.from_numpy(np.ascontiguousarray(item.image)).to(device)
        x = x.permute(2, 0, 1).unsqueeze(0).float() / 255.0
        p = protocol
        logits = predict_logits(model, x, p.mode, p.crop, p.stride, patch=p.patch)
        labels = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        png = out / f"{item.name}.png"
        img = Image.fromarray(labels)
        img.putpalette(pal)  # "L" -> "P": values stay the class indices
        img.save(png)
        written.append(png)
        if geotiff and item.transform is not None:
            tif = out / f"{item.name}.tif"
            _write_geotiff(tif, labels, item.transform, item.crs)
            written.append(tif)
        bar.update(1)
    bar.close()


__all__ = [
    "InferenceProtocol",
    "PredictError",
    "PredictInput",
    "USE_ALL",
    "USE_BOTH",
    "checkpoint_method",
    "inference_protocol",
    "load_models",
    "legend_colours",
    "count_images",
    "iter_inputs",
    "palette",
    "predict",
    "read_inputs",
    "resolve_inputs",
    "write_legend",
]
