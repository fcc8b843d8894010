"""``TileSource``: the tiles of a dataset with their records, and ``open_source``.

Opening a source finds its scenes (folder layout or split files), reads every header, cuts each
scene into windows, and loads every tile once to validate its mask and hash its pixels (the store
fingerprint needs all hashes). Tiles are ordered by ``tile_id``: the scene key (image path
relative to the root, without suffix), plus ``_rRRRRR_cCCCCC`` (window origin, zero-padded) when
the scene holds more than one tile.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from featstore.schema import TileRecord

from .conventions import (
    DEEPGLOBE,
    GENERIC,
    IGNORE_INDEX,
    LOVEDA,
    POTSDAM,
    POTSDAM_MMSEG,
    VAIHINGEN_MMSEG,
    Convention,
)
from .errors import (
    EmptySourceError,
    LabelConventionError,
    LayoutError,
    SizeMismatchError,
    SourceError,
)
from .imageio import SceneInfo, probe, read_window, select_bands
from .labels import (
    LabelOptions,
    check_zero_reading,
    convention_with_options,
    format_histogram,
    label_options,
    palette_convention,
    read_classes_txt,
    read_labels_file,
)
from .layouts import FINDERS, SceneRef, detect_layout, find_split_file, normalize_split
from .masks import decode_mask, index_plane
from .tiling import Window, tile_windows

LOG = logging.getLogger(__name__)

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
        _warn_small_scenes(scenes, tile_size)
        _warn_nodata(scenes)
        self._tiles = tiles
        # Per tile: pixels of each class id, then ignored pixels; -1 for unlabeled tiles.
        self._counts = np.full((len(tiles), self.num_classes + 1), -1, np.int64)
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

    @property
    def class_colors(self) -> tuple[tuple[int, int, int], ...]:
        """Display colour (r, g, b) of each class: the dataset's palette or a fixed default."""
        return self._conv.colors

    @property
    def class_sources(self) -> tuple[str, ...]:
        """What each class id is in the source masks (a value, or a colour)."""
        return self._conv.class_sources()

    @property
    def label_rule(self) -> str:
        """One line: how source masks became class ids (0 = ignore? colours? ...)."""
        return self._conv.label_rule()

    @property
    def protocol(self) -> Any:
        """The dataset's test protocol (`conventions.Protocol`): classes left out of the means."""
        return self._conv.protocol

    def label_stats(self, indices: Sequence[int] | None = None) -> dict[str, Any]:
        """Pixel counts of the stored masks of ``indices`` (default: every tile).

        Returns:
            ``{"class_pixels": [K ints], "ignore_pixels": int, "labeled_tiles": int,
            "unlabeled_tiles": int}``; counts include padded pixels, as stored.
        """
        counts = self._counts if indices is None else self._counts[list(indices)]
        labeled = counts[:, 0] >= 0
        total = counts[labeled].sum(axis=0)
        return {
            "class_pixels": [int(v) for v in total[:-1]],
            "ignore_pixels": int(total[-1]),
            "labeled_tiles": int(labeled.sum()),
            "unlabeled_tiles": int((~labeled).sum()),
        }

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
        image, mask = self.load(i)  # also validates the mask
        if mask is not None:  # every mask is decoded here once: count its classes now
            hist = np.bincount(mask.ravel(), minlength=256)
            self._counts[i, :-1] = hist[: self.num_classes]
            self._counts[i, -1] = hist[IGNORE_INDEX]
        return TileRecord(
            tile_id=tile_id,
            source=scene.ref.source,
            window=window,
            split=scene.ref.split,
            pixel_hash=pixel_hash(image),
            transform=scene.image.window_transform(window),
            crs=scene.image.crs,
        )


def _warn_small_scenes(scenes: list[_Scene], tile: int) -> None:
    """Say when whole scenes are narrower than a tile: their tiles are mostly padding, which
    the pad rule allows (DWL pads the last tile) but which is rarely meant for a whole scene."""
    small = [s.image for s in scenes if min(s.image.height, s.image.width) < tile]
    if not small:
        return
    side = min(min(s.height, s.width) for s in small)
    LOG.warning(
        "%d of %d scene(s) are smaller than --tile-size %d, e.g. %s (%dx%d px): their tiles are "
        "padded (image 0, mask = the pad label) to %d px; pass --tile-size %d or less to cut "
        "them without padding, if the padding is not intended",
        len(small),
        len(scenes),
        tile,
        small[0].path,
        small[0].height,
        small[0].width,
        tile,
        side,
    )


def _warn_nodata(scenes: list[_Scene]) -> None:
    """Say that declared nodata values have no meaning here (no silent convention)."""
    declaring = [s.image for s in scenes if s.image.nodata is not None]
    if not declaring:
        return
    LOG.warning(
        "%d image(s) declare a nodata value, e.g. %s (nodata %s per band): featcache has no "
        "nodata convention, those pixels are read as ordinary pixel values and their mask "
        "labels are used as they are. If they are not real ground, set their mask pixels to "
        "the ignore value (255, or your --ignore-index), or fill them before caching (e.g. "
        "gdal_fillnodata.py)",
        len(declaring),
        declaring[0].path,
        list(declaring[0].nodata or ()),
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
            "DeepGlobe tree, or .tif scenes; pass --layout NAME or --split-file FILE"
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
    "loveda": LOVEDA,
    "loveda-folder": LOVEDA,
    "loveda-mmseg": LOVEDA,
    "potsdam": POTSDAM,
    "potsdam-mmseg": POTSDAM_MMSEG,
    "vaihingen-mmseg": VAIHINGEN_MMSEG,
    "deepglobe": DEEPGLOBE,
}


def _value_histogram(scenes: list[_Scene], conv: Convention) -> np.ndarray:
    """256-bin histogram of the source values of every mask (index masks)."""
    hist = np.zeros(256, np.int64)
    for scene in scenes:
        if scene.mask is None:
            continue
        full = (0, 0, scene.mask.height, scene.mask.width)
        plane = index_plane(read_window(scene.mask, full), conv, scene.mask.path)
        hist += np.bincount(plane.ravel(), minlength=256)
    return hist


def _generic_convention(
    root: Path, split_files: list[Path], scenes: list[_Scene], opts: LabelOptions
) -> Convention:
    """Convention of a generic layout from the label options (rules: ``labels`` docstring)."""
    name = root.stem if root.is_file() else root.name
    if opts.palette is not None:
        return palette_convention(name, opts.palette, opts)
    folders = [root if root.is_dir() else root.parent, *(f.parent for f in split_files)]
    opts = read_labels_file(folders, opts)
    conv = replace(
        GENERIC,
        name=name,
        reduce_zero_label=bool(opts.reduce_zero_label),
        ignore_value=opts.ignore_index,
    )
    found = (opts.class_names, "--classes") if opts.class_names else read_classes_txt(folders)
    if not any(s.mask is not None for s in scenes):
        return conv.with_classes(found[0] if found else ())  # unlabeled: nothing to read
    zero_stated = opts.reduce_zero_label is not None or opts.ignore_index == 0
    if found is not None and zero_stated:
        return conv.with_classes(found[0])
    hist = _value_histogram(scenes, conv)
    if found is None:
        raise LabelConventionError(
            f"no class names for the masks in {root}: the class count is never taken from the "
            f"largest mask value. Value histogram: {format_histogram(hist)}. Pass --classes "
            "NAME,NAME,... (or --classes FILE, one name per line; or write classes.txt beside "
            "images/) in id order, and --reduce-zero-label if 0 means ignore; or name the "
            "dataset's layout, which states its classes (e.g. --layout loveda-folder for "
            "LoveDA's raw masks in images/ + masks/; see featcache extract --help)"
        )
    check_zero_reading(hist, found[0], found[1], opts, str(root))
    return conv.with_classes(found[0])


def open_configured(path: str | Path, options: Any) -> TileSource:
    """`open_source` with the source options of a config: ``ExtractConfig`` or the trainer's
    ``DataConfig`` (fields ``layout``, ``split_file``, ``tile_size``, ``edge_rule``, ``bands``,
    ``classes``, ``reduce_zero_label``, ``ignore_index``, ``palette``), read the same way."""
    return open_source(
        path,
        layout=options.layout,
        split_file=options.split_file,
        tile_size=options.tile_size,
        edge_rule=options.edge_rule,
        bands=options.bands,
        class_names=options.classes,
        reduce_zero_label=options.reduce_zero_label,
        ignore_index=options.ignore_index,
        palette=options.palette,
    )


def open_source(
    path: str | Path,
    layout: str = "auto",
    split_file: str | Path | Sequence[str | Path] | None = None,
    tile_size: int = 512,
    bands: Sequence[int] | None = None,
    split: str | None = None,
    edge_rule: str | None = None,
    class_names: Sequence[str] | str | None = None,
    reduce_zero_label: bool | None = None,
    ignore_index: int | None = None,
    palette: str | Path | None = None,
) -> TileSource:
    """Open a dataset as a list of ``tile_size`` tiles.

    Dataset layouts fix their label convention: ``loveda`` (``Train|Val|Test/Urban|Rural/
    images_png`` + ``masks_png``, raw 0 = no-data -> ignore, 1..7 -> ids 0..6),
    ``loveda-folder`` (``images/`` + ``masks/`` with LoveDA raw labels), ``loveda-mmseg``
    (mmseg's ``img_dir/<split>`` + ``ann_dir/<split>``, LoveDA raw labels), ``potsdam``
    (``*_RGB.tif`` + ``*_label.tif``, ISPRS colours), ``potsdam-mmseg`` / ``vaihingen-mmseg``
    (mmseg's converted ISPRS tiles: 0 = boundary -> ignore, 1..6 -> ids 0..5), ``deepglobe``
    (``*_sat.jpg`` + ``*_mask.png``, DeepGlobe colours). Generic layouts take their convention
    from the label options (see ``pipelines.sources.labels``): ``folder`` (``images/`` +
    ``masks/``, or ``<split>/images`` + ``masks``), ``mmseg`` (``img_dir`` + ``ann_dir``),
    ``geotiff`` (one ``.tif`` or a folder of them, unlabeled). ``auto`` detects the layout, except
    for an ``img_dir`` + ``ann_dir`` tree, which fits several datasets (an error lists them).

    Args:
        path: Dataset root (or one GeoTIFF file).
        layout: Layout name, or ``"auto"``. With ``split_file``, the layout only sets the label
            convention (``"auto"`` = generic).
        split_file: RS-MTDF/DWL split file(s) (``<image> <mask>`` per line, paths relative to
            ``path`` or to the split file's folder); replaces the folder walk.
        tile_size: Tile side T in pixels.
        bands: Three 1-based band indices for non-RGB imagery, e.g. ``(1, 2, 3)``.
        split: Keep only this split where folders or split files name it; otherwise the split
            recorded for every tile (default ``"train"``).
        edge_rule: ``"exact"``, ``"overlap_last"`` or ``"pad"``; default: the layout's rule
            (LoveDA exact, Potsdam overlap_last, others pad).
        class_names: Class names in id order, or one string: comma-separated names or a file
            with one name per line (dataset layouts: a renaming, same count).
        reduce_zero_label: Generic index masks: True = 0 is ignore and v -> v-1; False = values
            are ids; None = not stated (warned about or refused when the masks are ambiguous).
        ignore_index: Generic index masks: a source value that means ignore (255 always does).
        palette: Generic colour-coded masks: palette file (``NAME R G B`` lines, or JSON).

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
    opts = label_options(class_names, reduce_zero_label, ignore_index, palette)
    layout = _resolve_layout(root, layout, bool(files))
    refs = _find_scenes(root, layout, files, split)
    scenes = [_open_scene(ref, bands) for ref in refs]
    base = _LAYOUT_CONVENTIONS.get(layout)
    if base is not None:
        conv = convention_with_options(base, opts, layout)
    else:
        conv = _generic_convention(root, files, scenes, opts)
    return TileSource(scenes, conv, tile_size, edge_rule or conv.edge_rule)
