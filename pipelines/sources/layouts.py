"""Finding the scenes of a source: folder layouts and RS-MTDF/DWL split files.

Each finder returns ``SceneRef`` entries. A scene's ``key`` is its image path relative to the
source root, POSIX style, without suffix (``Train/Urban/images_png/1366``), so a folder walk and
a DWL split line naming the same file give the same key, and tile ids stay stable across runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import EmptySourceError, LayoutError, SplitFileError

__all__ = [
    "FINDERS",
    "MMSEG_LAYOUTS",
    "SceneRef",
    "detect_layout",
    "find_split_file",
    "normalize_split",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SPLIT_ALIASES = {"valid": "val", "validation": "val", "training": "train", "testing": "test"}
_KNOWN_SPLITS = ("train", "val", "test")
_UNLABELED_SPLITS = ("unlabeled", "train_u", "unlabelled")


@dataclass(frozen=True)
class SceneRef:
    """One scene (an image file and its optional mask).

    Attributes:
        key: Image path relative to the root, POSIX, without suffix.
        source: Image path relative to the root, POSIX, with suffix (recorded per tile).
        image: Image file.
        mask: Mask file, or None for unlabeled scenes.
        split: Split name (``"train"``, ``"val"``, ``"test"``, a split-file stem, ...), or ""
            where the layout does not name it (the caller fills it in).
    """

    key: str
    source: str
    image: Path
    mask: Path | None
    split: str


def normalize_split(name: str) -> str:
    """Lower-case split name with common aliases folded (``Valid`` -> ``val``)."""
    low = name.lower()
    return _SPLIT_ALIASES.get(low, low)


def _ref(root: Path, image: Path, mask: Path | None, split: str) -> SceneRef:
    try:
        rel = PurePosixPath(image.relative_to(root).as_posix())
    except ValueError:  # a split line may point outside the root
        rel = PurePosixPath(image.as_posix().lstrip("/"))
    return SceneRef(str(rel.with_suffix("")), str(rel), image, mask, split)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def find_loveda(root: Path) -> list[SceneRef]:
    """LoveDA: ``{Train,Val,Test}/{Urban,Rural}/images_png/*.png`` + ``masks_png``."""
    refs = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for domain in sorted(p for p in split_dir.iterdir() if (p / "images_png").is_dir()):
            for image in _images_in(domain / "images_png"):
                mask = domain / "masks_png" / image.name
                split = normalize_split(split_dir.name)
                refs.append(_ref(root, image, mask if mask.is_file() else None, split))
    return refs


def find_potsdam(root: Path) -> list[SceneRef]:
    """ISPRS Potsdam: ``**/top_potsdam_*_RGB.tif`` + ``**/top_potsdam_*_label.tif``."""
    labels = {p.name[: -len("_label.tif")]: p for p in root.rglob("*_label.tif")}
    refs = []
    for image in sorted(root.rglob("*_RGB.tif")):
        mask = labels.get(image.name[: -len("_RGB.tif")])
        refs.append(_ref(root, image, mask, ""))
    return refs


def _folder_split(folder: Path, root: Path) -> str:
    name = normalize_split(folder.name)
    return name if folder != root and name in _KNOWN_SPLITS else ""


def find_deepglobe(root: Path) -> list[SceneRef]:
    """DeepGlobe land cover: ``**/<id>_sat.jpg`` + ``<id>_mask.png`` beside it.

    The split is the parent folder's name (``train``/``valid``/``test``) when it is one.
    """
    refs = []
    for image in sorted(root.rglob("*_sat.jpg")):
        mask = image.with_name(image.name[: -len("_sat.jpg")] + "_mask.png")
        split = _folder_split(image.parent, root)
        refs.append(_ref(root, image, mask if mask.is_file() else None, split))
    return refs


def _find_masks(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    masks: dict[str, Path] = {}
    for path in _images_in(folder):
        # prefer .png when a stem exists with several suffixes
        if path.stem not in masks or path.suffix.lower() == ".png":
            masks[path.stem] = path
    return masks


def find_folder(root: Path) -> list[SceneRef]:
    """Generic: ``images/`` + optional ``masks/`` (same stems), or ``<split>/images`` + masks.

    Images without a mask of the same stem are unlabeled.
    """
    groups = (
        [root]
        if (root / "images").is_dir()
        else [p for p in sorted(root.iterdir()) if (p / "images").is_dir()]
    )
    refs = []
    for group in groups:
        masks = _find_masks(group / "masks")
        split = normalize_split(group.name) if group != root else ""
        images = _images_in(group / "images")
        _warn_label_gaps(group, images, masks, split)
        for image in images:
            refs.append(_ref(root, image, masks.get(image.stem), split))
    return refs


def _warn_label_gaps(group: Path, images: list[Path], masks: dict[str, Path], split: str) -> None:
    """Warn when masks are silently unused or missing: such tiles are stored unlabelled, and a
    store whose labelled split has none trains on nothing (issue 11, #5)."""
    stems = {image.stem for image in images}
    orphans = sorted(path.name for stem, path in masks.items() if stem not in stems)
    unlabelled = [image.name for image in images if image.stem not in masks]
    if orphans:
        _warn(
            f"{group / 'masks'}: {len(orphans)} mask file(s) match no image in "
            f"{group / 'images'} by name, e.g. {', '.join(orphans[:3])}; they are ignored: "
            "give each mask its image's name (images/x.png <-> masks/x.png)"
        )
    if unlabelled and (masks or split in ("train", "val")):
        what = "has no masks" if len(unlabelled) == len(images) else "has images without a mask"
        _warn(
            f"{group / 'images'} {what}: {len(unlabelled)} of {len(images)} image(s) "
            f"will be stored unlabelled, e.g. {', '.join(unlabelled[:3])}; put their masks "
            f"in {group / 'masks'} under the same names"
        )


def _warn(message: str) -> None:
    import warnings

    from .errors import LabelConventionWarning

    warnings.warn(message, LabelConventionWarning, stacklevel=3)


def find_mmseg(root: Path) -> list[SceneRef]:
    """mmsegmentation's converted form: ``img_dir/<split>/*`` + ``ann_dir/<split>/<stem>.png``.

    Images without an annotation of the same stem (e.g. LoveDA's ``img_dir/test``) are
    unlabeled.
    """
    refs = []
    img_dir = root / "img_dir"
    if not img_dir.is_dir():
        return refs
    for split_dir in sorted(p for p in img_dir.iterdir() if p.is_dir()):
        masks = _find_masks(root / "ann_dir" / split_dir.name)
        split = normalize_split(split_dir.name)
        for image in _images_in(split_dir):
            refs.append(_ref(root, image, masks.get(image.stem), split))
    return refs


def find_geotiff(root: Path) -> list[SceneRef]:
    """One GeoTIFF file, or the ``*.tif`` / ``*.tiff`` files directly in a folder (unlabeled)."""
    if root.is_file():
        return [_ref(root.parent, root, None, "")]
    return [
        _ref(root, p, None, "") for p in _images_in(root) if p.suffix.lower() in (".tif", ".tiff")
    ]


FINDERS: dict[str, Callable[[Path], list[SceneRef]]] = {
    "loveda": find_loveda,
    "loveda-folder": find_folder,
    "potsdam": find_potsdam,
    "deepglobe": find_deepglobe,
    "folder": find_folder,
    "geotiff": find_geotiff,
    "potsdam-mmseg": find_mmseg,
    "vaihingen-mmseg": find_mmseg,
    "loveda-mmseg": find_mmseg,
    "mmseg": find_mmseg,
}
# Layouts that fit an img_dir/ + ann_dir/ tree: the tree does not say which dataset it holds.
MMSEG_LAYOUTS = ("potsdam-mmseg", "vaihingen-mmseg", "loveda-mmseg", "mmseg")


def detect_layout(root: Path) -> str | None:
    """Detect the layout of ``root`` from its files; None if nothing matches.

    Raises:
        LayoutError: An mmseg ``img_dir`` + ``ann_dir`` tree, whose files fit several datasets
            with different label conventions: the user must name one.
    """
    if root.is_file():
        return "geotiff" if root.suffix.lower() in (".tif", ".tiff") else None
    if (root / "img_dir").is_dir() and (root / "ann_dir").is_dir():
        raise LayoutError(
            f"{root} is an mmsegmentation img_dir/ + ann_dir/ tree, which does not say which "
            "dataset (and label convention) it holds; pass one of: --layout potsdam-mmseg, "
            "--layout vaihingen-mmseg (ISPRS tiles: 0 = boundary/ignore, 1..6 = classes), "
            "--layout loveda-mmseg (0 = no-data, 1..7 = classes), or --layout mmseg with "
            "--classes (and --reduce-zero-label / --no-reduce-zero-label) for other data"
        )
    if any(
        (d / dom / "images_png").is_dir()
        for d in root.iterdir()
        if d.is_dir()
        for dom in ("Urban", "Rural")
    ):
        return "loveda"
    if (root / "images").is_dir() or any((d / "images").is_dir() for d in root.iterdir()):
        return "folder"
    if next(root.rglob("*_RGB.tif"), None) is not None:
        return "potsdam"
    if next(root.rglob("*_sat.jpg"), None) is not None:
        return "deepglobe"
    if any(p.suffix.lower() in (".tif", ".tiff") for p in root.iterdir()):
        return "geotiff"
    return None


def _resolve(token: str, bases: Sequence[Path], split_file: Path, lineno: int, what: str) -> Path:
    path = Path(token)
    candidates = [path] if path.is_absolute() else [b / path for b in bases]
    for cand in candidates:
        if cand.is_file():
            return cand
    looked = ", ".join(str(c) for c in candidates)
    raise SplitFileError(
        f"{split_file} line {lineno}: {what} {token!r} not found (looked at {looked}); fix the "
        "line, or pass the dataset root the paths are relative to as the source path"
    )


def find_split_file(split_file: Path, root: Path, split: str | None = None) -> list[SceneRef]:
    """Scenes listed in an RS-MTDF/DWL split file (``<image> <mask>`` per line).

    Relative paths resolve against ``root`` first, then the split file's folder. The split name
    is ``split`` or the file's stem; for unlabeled lists (stem ``unlabeled`` / ``train_u``) the
    mask column is optional and ignored, as in RS-MTDF.

    Raises:
        SplitFileError: Missing file, unreadable file, or a malformed / dangling line.
        EmptySourceError: A split file without entries.
    """
    try:
        lines = split_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SplitFileError(f"cannot read split file {split_file}: {exc}") from exc
    name = normalize_split(split or split_file.stem)
    unlabeled = name in _UNLABELED_SPLITS
    bases = [root, split_file.parent] if root != split_file.parent else [root]
    refs = []
    for lineno, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if len(tokens) > 2:
            raise SplitFileError(
                f"{split_file} line {lineno}: expected '<image> <mask>' but got {len(tokens)} "
                "fields; paths must not contain spaces"
            )
        image = _resolve(tokens[0], bases, split_file, lineno, "image")
        mask = None
        if len(tokens) == 2 and not unlabeled:
            mask = _resolve(tokens[1], bases, split_file, lineno, "mask")
        rel = PurePosixPath(tokens[0])  # the key follows the line as written: stable across roots
        refs.append(SceneRef(str(rel.with_suffix("")), str(rel), image, mask, name))
    if not refs:
        raise EmptySourceError(
            f"split file {split_file} lists no images; expected '<image> <mask>' per line"
        )
    return refs
