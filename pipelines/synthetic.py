"""Synthetic aerial-like scenes with LoveDA classes, for tests, demos and benchmarks.

Each scene is built from numpy noise: warped Voronoi parcels of background / agriculture /
forest / barren land with class textures, a water body, curved roads and buildings (oriented
rectangles with roof shading and cast shadows) lined up along the roads. Output is the generic
folder layout (``images/NNN.png``, ``masks/NNN.png`` class indices, ``classes.txt``), which
``open_source(out_dir)`` reads. Same seed -> identical bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CLASS_NAMES", "generate_synthetic", "synthetic_scene"]

CLASS_NAMES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(7)
_LAND = (BACKGROUND, AGRICULTURE, FOREST, BARREN)
_LAND_P = (0.3, 0.35, 0.2, 0.15)
_BASE_RGB = {
    BACKGROUND: (112, 116, 96),
    AGRICULTURE: (132, 150, 84),
    FOREST: (46, 74, 42),
    BARREN: (172, 152, 122),
}
_CROP_RGB = ((120, 150, 70), (170, 160, 95), (150, 125, 85), (95, 135, 65))
_ROOF_RGB = ((168, 84, 62), (150, 150, 152), (204, 202, 196), (92, 106, 126), (120, 70, 60))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1): a random (cells+1)^2 grid, smoothstep-interpolated to size^2."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    pos = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    idx = pos.astype(np.int64)
    frac = pos - idx
    frac = frac * frac * (3 - 2 * frac)  # smoothstep hides the grid creases
    weights = np.zeros((size, cells + 1), np.float32)
    rows = np.arange(size)
    weights[rows, idx] = 1 - frac
    weights[rows, idx + 1] += frac
    return weights @ grid @ weights.T


def _fractal(rng: np.random.Generator, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for k in range(octaves):
        out += amp * _smooth_noise(rng, size, cells * 2**k)
        total += amp
        amp *= 0.5
    return out / total


def _land_cover(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Warped Voronoi parcels: (cell index [S,S], class per cell)."""
    n = int(rng.integers(10, 20))
    pts = rng.random((n, 2), dtype=np.float32) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amp = 0.08 * size  # boundary wiggle, so parcels are not perfect polygons
    yy += amp * (_fractal(rng, size, 3) - 0.5)
    xx += amp * (_fractal(rng, size, 3) - 0.5)
    best = np.full((size, size), np.inf, np.float32)
    cell = np.zeros((size, size), np.int64)
    for k, (py, px) in enumerate(pts):
        d = (yy - py) ** 2 + (xx - px) ** 2
        closer = d < best
        best[closer] = d[closer]
        cell[closer] = k
    classes = rng.choice(_LAND, size=n, p=_LAND_P)
    classes[: len(_LAND)] = _LAND  # every land class occurs in every scene
    return cell, classes


def _paint_land(rng: np.random.Generator, cell: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per-cell base colours with class textures, float32 [S,S,3]."""
    size = cell.shape[0]
    n = classes.size
    base = np.array([_BASE_RGB[int(c)] for c in classes], np.float32)
    crops = np.array(_CROP_RGB, np.float32)[rng.integers(0, len(_CROP_RGB), n)]
    base = np.where((classes == AGRICULTURE)[:, None], crops, base)
    base *= rng.uniform(0.85, 1.15, (n, 1)).astype(np.float32)
    img = base[cell]
    cls = classes[cell]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi, n).astype(np.float32)[cell]
    period = rng.uniform(5, 14, n).astype(np.float32)[cell]
    stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    crowns = _fractal(rng, size, max(4, size // 10), octaves=2)
    grain = _smooth_noise(rng, size, max(4, size // 3))
    texture = np.ones((size, size), np.float32)
    texture = np.where(cls == AGRICULTURE, 1 + 0.1 * stripes, texture)
    texture = np.where(cls == FOREST, 0.55 + 0.9 * crowns, texture)
    texture = np.where(cls == BARREN, 0.9 + 0.2 * grain, texture)
    texture = np.where(cls == BACKGROUND, 0.8 + 0.4 * crowns, texture)
    return img * texture[..., None]


def _water(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> None:
    size = mask.shape[0]
    field = _fractal(rng, size, int(rng.integers(2, 4)))
    water = field >= np.quantile(field, 1 - rng.uniform(0.04, 0.15))
    shade = 0.85 + 0.3 * _smooth_noise(rng, size, 8)[..., None]
    img[water] = (np.array([34, 56, 74], np.float32) * shade)[water]
    mask[water] = WATER


def _curve(rng: np.random.Generator, size: int) -> np.ndarray:
    """A quadratic Bezier road from one scene border to another, as [K,2] (y, x) points."""

    def border_point() -> np.ndarray:
        t = rng.uniform(0.1, 0.9) * size
        side = int(rng.integers(4))
        return np.array([(0, t), (size, t), (t, 0), (t, size)][side], np.float32)

    a, b = border_point(), border_point()
    while np.hypot(*(a - b)) < 0.5 * size:
        b = border_point()
    ctrl = (a + b) / 2 + rng.normal(0, 0.15 * size, 2).astype(np.float32)
    t = np.linspace(0, 1, 24, dtype=np.float32)[:, None]
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * ctrl + t**2 * b


def _stroke(path: np.ndarray, width: float, size: int) -> np.ndarray:
    """Boolean [S,S]: pixels within width/2 of the polyline (distance to each segment)."""
    out = np.zeros((size, size), bool)
    r = width / 2
    for p, q in zip(path[:-1], path[1:], strict=False):
        y0, x0 = np.maximum(np.floor(np.minimum(p, q) - r), 0).astype(int)
        y1, x1 = np.minimum(np.ceil(np.maximum(p, q) + r) + 1, size).astype(int)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        d = q - p
        t = np.clip(((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
        dist2 = (yy - p[0] - t * d[0]) ** 2 + (xx - p[1] - t * d[1]) ** 2
        out[y0:y1, x0:x1] |= dist2 <= r * r
    return out


def _roads(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    size = mask.shape[0]
    paths = []
    for _ in range(int(rng.integers(1, 4))):
        path = _curve(rng, size)
        width = float(rng.uniform(4, 10)) * size / 512
        road = _stroke(path, width, size)
        edge = road & ~_stroke(path, max(width - 2, 1), size)
        grey = float(rng.uniform(105, 150))
        img[road] = grey
        img[edge] *= 0.8  # darker kerbs
        mask[road] = ROAD
        paths.append(path)
    return paths


def _building(
    rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, path: np.ndarray
) -> None:
    """One oriented building beside a road, with a cast shadow; skipped if it would overlap."""
    size = mask.shape[0]
    k = int(rng.integers(0, len(path) - 1))
    direction = path[k + 1] - path[k]
    direction /= max(float(np.hypot(*direction)), 1e-6)
    normal = np.array([-direction[1], direction[0]], np.float32) * rng.choice([-1, 1])
    half_u, half_v = rng.uniform(5, 16) * size / 512, rng.uniform(5, 12) * size / 512
    centre = path[k] + rng.uniform(0, 1) * (path[k + 1] - path[k])
    centre = centre + normal * (half_v + rng.uniform(8, 30) * size / 512)
    reach = int(np.ceil(np.hypot(half_u, half_v))) + 5
    y0, x0 = (centre - reach).astype(int)
    y1, x1 = (centre + reach).astype(int)
    if y0 < 0 or x0 < 0 or y1 > size or x1 > size:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    u = (yy - centre[0]) * direction[0] + (xx - centre[1]) * direction[1]
    v = (yy - centre[0]) * normal[0] + (xx - centre[1]) * normal[1]
    roof = (np.abs(u) <= half_u) & (np.abs(v) <= half_v)
    region = mask[y0:y1, x0:x1]
    if np.isin(region[roof], (BUILDING, ROAD, WATER)).any():
        return
    shift = max(2, round(4 * size / 512))  # sun from the top-left: shadow to the bottom-right
    shadow = np.zeros_like(roof)
    shadow[shift:, shift:] = roof[:-shift, :-shift]
    patch = img[y0:y1, x0:x1]
    patch[shadow & ~roof & (region != WATER)] *= 0.5
    colour = np.array(_ROOF_RGB[int(rng.integers(len(_ROOF_RGB)))], np.float32)
    ridge = np.where(v > 0, 0.82, 1.0)[..., None]  # gable roof: one slope darker
    patch[roof] = (colour * ridge)[roof]
    region[roof] = BUILDING


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable 3x3 box blur with edge replication (a soft sensor PSF)."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = (p[:-2] + p[1:-1] + p[2:]) / 3
    return (p[:, :-2] + p[:, 1:-1] + p[:, 2:]) / 3


def synthetic_scene(rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """One aerial-like scene.

    Returns:
        ``(image uint8 [S,S,3], mask uint8 [S,S])`` with mask values 0..6 (``CLASS_NAMES``).
    """
    cell, classes = _land_cover(rng, size)
    mask = classes[cell].astype(np.uint8)
    img = _paint_land(rng, cell, classes)
    _water(rng, img, mask)
    paths = _roads(rng, img, mask)
    n_buildings = int(rng.integers(15, 60) * (size / 512) ** 2) + 1
    for _ in range(n_buildings * 2):  # some placements are rejected
        _building(rng, img, mask, paths[int(rng.integers(len(paths)))])
    img = _blur3(img) + rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask


def generate_synthetic(
    out_dir: str | Path,
    n_images: int = 8,
    size: int = 512,
    seed: int = 0,
    tile_size: int | None = None,
) -> Path:
    """Write a synthetic dataset in the generic folder layout.

    Args:
        out_dir: Output folder (created; existing files of the same names are overwritten).
        n_images: Number of scenes.
        size: Scene side in pixels.
        seed: Random seed; scene ``i`` uses ``default_rng((seed, i))``.
        tile_size: If given, ``size`` must be a multiple of it (scenes tile exactly).

    Returns:
        ``out_dir`` as a Path.
    """
    if n_images < 1 or size < 32:
        raise ValueError(f"n_images ({n_images}) must be >= 1 and size ({size}) >= 32")
    if tile_size is not None and (tile_size <= 0 or size % tile_size):
        raise ValueError(f"size {size} is not a multiple of tile_size {tile_size}; change either")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(n_images - 1)))
    for i in range(n_images):
        image, mask = synthetic_scene(np.random.default_rng((seed, i)), size)
        Image.fromarray(image).save(out / "images" / f"{i:0{width}d}.png")
        Image.fromarray(mask).save(out / "masks" / f"{i:0{width}d}.png")
    (out / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    # mask value = class id (0 = background is a class): stated, so no reading is guessed
    (out / "labels.json").write_text('{"reduce_zero_label": false}\n')
    return out
