"""``TileSource``: the tiles of a dataset with their records, and ``open_source``.

Opening a source finds its scenes (folder layout or split files), reads every header, cuts each
scene into windows, and loads every tile once to validate its mask and hash its pixels (the store
fingerprint needs all hashes). Tiles are ordered by ``tile_id``: the scene key (image path
relative to the root, without suffix), plus ``_rRRRRR_cCCCCC`` (window origin, zero-padded) when
the scene holds more than one tile.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featstore.schema import TileRecord

from .conventions import CONVENTIONS, GENERIC, IGNORE_INDEX, Convention, decode_mask
from .errors import EmptySourceError, LayoutError, SizeMismatchError, SourceError
from .imageio import SceneInfo, probe, read_window, select_bands
from .layouts import FINDERS, SceneRef, detect_layout, find_split_file, normalize_split
from .tiling import Window, tile_windows

__all__ = ["LAYOUTS", "TileSource", "open_source", "pixel_hash"]

LAYOUTS = ("auto", *FINDERS)


def pixel_hash(image: np.ndarray) -> str:
    """First 16 hex chars of the sha256 of a tile's uint8 image bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class _Scene:
    ref: SceneRef
    image: SceneInfo
    mask: SceneInfo | None
    bands: tuple[int, ...] | None


class TileSource:
    """Tiles of one dataset, each ``T x T`` uint8 RGB with an optional class-index mask.

    Attributes:
        records: One ``TileRecord`` per tile, sorted by ``tile_id``.
        class_names: Class names in label order.
        ignore_index: Mask value of ignored pixels (255).
        dataset: Dataset name (``loveda``, ``potsdam``, ``deepglobe`` or the folder's name).
        tile_size: T.
        edge_rule: Tiling edge rule in use.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self, scenes: list[_Scene], conv: Convention, tile_size: int, edge_rule: str
    ) -> None:
        self._scenes = scenes
        self._conv = conv
        self.tile_size = tile_size
        self.edge_rule = edge_rule
        tiles: list[tuple[str, int, Window]] = []
        for s_idx, scene in enumerate(scenes):
            windows = tile_windows(scene.image.height, scene.image.width, tile_size, edge_rule)
            for window in windows:
                suffix = "" if len(windows) == 1 else f"_r{window[0]:05d}_c{window[1]:05d}"
                tiles.append((scene.ref.key + suffix, s_idx, window))
        tiles.sort(key=lambda t: t[0])
        _check_unique([t[0] for t in tiles], scenes, [t[1] for t in tiles])
        self._tiles = tiles
        self.records = [self._record(i) for i in range(len(tiles))]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in label order."""
        return self._conv.class_names

    @property
    def num_classes(self) -> int:
        """Number of classes K (mask values 0..K-1)."""
        return len(self._conv.class_names)

    @property
    def dataset(self) -> str:
        """Dataset name."""
        return self._conv.name

    def __len__(self) -> int:
        return len(self._tiles)

    def __repr__(self) -> str:
        return (
            f"TileSource(dataset={self.dataset!r}, tiles={len(self)}, "
            f"scenes={len(self._scenes)}, tile_size={self.tile_size})"
        )

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels of tile ``i``.

        Returns:
            ``(image, mask)``: uint8 [T, T, 3] and uint8 [T, T] class indices (255 = ignore),
            or None for unlabeled tiles; both C-contiguous and freshly allocated. Pixels past the
            scene edge (``"pad"`` rule) are image 0 and mask = the dataset's pad label.
        """
        _, s_idx, window = self._tiles[i]
        scene = self._scenes[s_idx]
        t = self.tile_size
        raw = read_window(scene.image, window, scene.bands)
        image = raw if raw.shape[:2] == (t, t) else _pad(raw, t, 0)
        if scene.mask is None:
            return image, None
        labels = decode_mask(
            read_window(scene.mask, window), self._conv, self.num_classes, scene.mask.path
        )
        mask = labels if labels.shape == (t, t) else _pad(labels, t, self._conv.pad_label)
        return image, mask

    def _record(self, i: int) -> TileRecord:
        tile_id, s_idx, window = self._tiles[i]
        scene = self._scenes[s_idx]
        image, _ = self.load(i)  # also validates the mask
        return TileRecord(
            tile_id=tile_id,
            source=scene.ref.source,
            window=window,
            split=scene.ref.split,
            pixel_hash=pixel_hash(image),
            transform=scene.image.window_transform(window),
            crs=scene.image.crs,
        )


def _pad(arr: np.ndarray, tile: int, fill: int) -> np.ndarray:
    out = np.full((tile, tile, *arr.shape[2:]), fill, np.uint8)
    out[: arr.shape[0], : arr.shape[1]] = arr
    return out


def _check_unique(ids: list[str], scenes: list[_Scene], scene_of: list[int]) -> None:
    for a, b, sa, sb in zip(ids, ids[1:], scene_of, scene_of[1:], strict=False):
        if a == b:
            raise SourceError(
                f"two scenes give the same tile id {a!r}: {scenes[sa].image.path} and "
                f"{scenes[sb].image.path}; rename one (ids come from the image path without "
                "suffix) or list it in only one split file"
            )


def _open_scene(ref: SceneRef, bands: Sequence[int] | None) -> _Scene:
    image = probe(ref.image)
    selected = select_bands(image, bands)
    mask = probe(ref.mask, mask=True) if ref.mask is not None else None
    if mask is not None and (mask.height, mask.width) != (image.height, image.width):
        raise SizeMismatchError(
            f"image {ref.image} is {image.height}x{image.width} px but its mask {ref.mask} is "
            f"{mask.height}x{mask.width}; the mask must cover the image pixel for pixel"
        )
    return _Scene(ref, image, mask, selected)


def _resolve_layout(root: Path, layout: str, has_split_file: bool) -> str:
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    if has_split_file:
        return "folder"
    found = detect_layout(root)
    if found is None:
        raise EmptySourceError(
            f"no images found in {root}: expected images/ + masks/, a LoveDA, Potsdam or "
            "DeepGlobe tree, or .tif scenes; pass layout= or a split_file"
        )
    return found


def _find_scenes(
    root: Path, layout: str, split_files: list[Path], split: str | None
) -> list[SceneRef]:
    if split_files:
        base = root if root.is_dir() else root.parent
        return [ref for f in split_files for ref in find_split_file(f, base, split)]
    refs = FINDERS[layout](root)
    if not refs:
        raise EmptySourceError(
            f"no images found in {root} for layout {layout!r}; check the path and the layout"
        )
    wanted = normalize_split(split) if split else None
    # finders leave split "" where no folder names it: then split= labels every tile
    refs = [r if r.split else replace(r, split=wanted or "train") for r in refs]
    if wanted is None:
        return refs
    kept = [r for r in refs if r.split == wanted]
    if not kept:
        have = sorted({r.split for r in refs})
        raise EmptySourceError(f"{root} has no split {split!r}; it has {have}; fix split=")
    return kept


_LAYOUT_CONVENTIONS = {
    "loveda": "loveda",
    "loveda-folder": "loveda",
    "potsdam": "potsdam",
    "deepglobe": "deepglobe",
}


def _read_classes_txt(folders: Sequence[Path]) -> tuple[str, ...] | None:
    for folder in folders:
        path = folder / "classes.txt"
        if path.is_file():
            names = tuple(n.strip() for n in path.read_text().splitlines() if n.strip())
            if not names:
                raise SourceError(f"{path} lists no class names; write one name per line")
            return names
    return None


def _scan_num_classes(scenes: list[_Scene]) -> int:
    """K = 1 + the largest label (255 = ignore excluded) over all masks."""
    top = -1
    for scene in scenes:
        if scene.mask is None:
            continue
        full = (0, 0, scene.mask.height, scene.mask.width)
        counts = np.bincount(read_window(scene.mask, full).ravel(), minlength=256)
        counts[IGNORE_INDEX] = 0
        nonzero = np.flatnonzero(counts)
        top = max(top, int(nonzero[-1]) if nonzero.size else -1)
    return top + 1


def _generic_convention(
    root: Path, split_files: list[Path], scenes: list[_Scene], names: Sequence[str] | None
) -> Convention:
    folder = root if root.is_dir() else root.parent
    class_names = (
        tuple(names) if names else _read_classes_txt([folder, *(f.parent for f in split_files)])
    )
    if class_names is None:
        class_names = tuple(f"class_{k}" for k in range(_scan_num_classes(scenes)))
    return GENERIC.with_classes(class_names, name=root.stem if root.is_file() else root.name)


def open_source(
    path: str | Path,
    layout: str = "auto",
    split_file: str | Path | Sequence[str | Path] | None = None,
    tile_size: int = 512,
    bands: Sequence[int] | None = None,
    split: str | None = None,
    edge_rule: str | None = None,
    class_names: Sequence[str] | None = None,
) -> TileSource:
    """Open a dataset as a list of ``tile_size`` tiles.

    Layouts: ``loveda`` (``Train|Val|Test/Urban|Rural/images_png`` + ``masks_png``, raw labels
    minus 1, 0 -> 255), ``loveda-folder`` (``images/`` + ``masks/`` with LoveDA raw labels),
    ``potsdam`` (``*_RGB.tif`` + ``*_label.tif``, ISPRS colours), ``deepglobe`` (``*_sat.jpg`` +
    ``*_mask.png``, DeepGlobe colours), ``folder`` (``images/`` + ``masks/`` class indices,
    names from ``classes.txt``; or ``<split>/images`` + ``masks``), ``geotiff`` (one ``.tif`` or
    a folder of them, unlabeled). ``auto`` detects the layout.

    Args:
        path: Dataset root (or one GeoTIFF file).
        layout: Layout name, or ``"auto"``. With ``split_file``, the layout only sets the label
            convention (``"auto"`` = class-index masks).
        split_file: RS-MTDF/DWL split file(s) (``<image> <mask>`` per line, paths relative to
            ``path`` or to the split file's folder); replaces the folder walk.
        tile_size: Tile side T in pixels.
        bands: Three 1-based band indices for non-RGB imagery, e.g. ``(1, 2, 3)``.
        split: Keep only this split where folders or split files name it; otherwise the split
            recorded for every tile (default ``"train"``).
        edge_rule: ``"exact"``, ``"overlap_last"`` or ``"pad"``; default: the layout's rule
            (LoveDA exact, Potsdam overlap_last, others pad).
        class_names: Override the class names (generic layouts).

    Raises:
        SourceError: A subclass naming the file and the fix, for any bad input.
        ImportError: ``.tif`` scenes without rasterio installed.
    """
    root = Path(path)
    if not root.exists():
        raise EmptySourceError(f"source path {root} does not exist; check the path")
    files = (
        []
        if split_file is None
        else (
            [Path(split_file)]
            if isinstance(split_file, (str, Path))
            else [Path(f) for f in split_file]
        )
    )
    layout = _resolve_layout(root, layout, bool(files))
    refs = _find_scenes(root, layout, files, split)
    scenes = [_open_scene(ref, bands) for ref in refs]
    conv_name = _LAYOUT_CONVENTIONS.get(layout)
    if conv_name is not None:
        conv = CONVENTIONS[conv_name]
        if class_names:
            conv = conv.with_classes(tuple(class_names))
    else:
        conv = _generic_convention(root, files, scenes, class_names)
    return TileSource(scenes, conv, tile_size, edge_rule or conv.edge_rule)
