"""``featcache publish``: a read-only, consolidated copy of a finished store with a dataset card.

The copy is a folder or a zip (stored uncompressed, store root at the zip root: what zarr's
``ZipStore`` and fsspec's ``zip://`` read). The card (``README.md`` at the store root, ignored by
zarr) says where the data comes from, under which licence, which teachers made it and how to
open it without featcache and how to train from it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from featstore import layout as L
from featstore import open_store, verify_store
from featstore.errors import StoreError
from featstore.reader import FeatureStore

CARD_NAME = "README.md"
NOT_STATED = "not stated"
# Files of a working store that a published copy leaves out (the writer's lock).
_LEFT_OUT = ("featcache.lock",)


class PublishError(StoreError):
    """The store cannot be published (incomplete, damaged, remote, or OUT exists)."""


@dataclass(frozen=True)
class PublishConfig:
    """What ``featcache publish`` was asked for.

    Args:
        store: a finished local store folder.
        out: the folder (or ``.zip`` with ``as_zip``) to write; must not exist.
        as_zip: write one zip file instead of a folder.
        licence: the licence of the source imagery and labels; None: the card says "not stated".
        source: where the imagery comes from (URL or citation); None: "not stated".
    """

    store: str
    out: str
    as_zip: bool = False
    licence: str | None = None
    source: str | None = None


def publish_store(cfg: PublishConfig) -> Path:
    """Write the published copy; returns its path."""
    out = Path(cfg.out)
    _check_paths(cfg, out)
    store = open_store(cfg.store, require_complete=True)
    problems = verify_store(cfg.store)
    if problems:
        raise PublishError(
            f"store {cfg.store!r} does not verify ({len(problems)} problems, first: "
            f"{problems[0]}); run `featcache verify {cfg.store}` and repair it before publishing"
        )
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        folder = Path(tmp) / "store.zarr"
        shutil.copytree(L.local_path(cfg.store), folder, ignore=shutil.ignore_patterns(*_LEFT_OUT))
        (folder / CARD_NAME).write_text(dataset_card(store, cfg, _bytes(folder)))
        L.consolidate(str(folder))
        if cfg.as_zip:
            _zip_folder(folder, out)
        else:
            os.replace(folder, out)
    _make_read_only(out)
    return out


def read_card(url: str) -> str | None:
    """The dataset card of a published store (None when it has none)."""
    fs, root = L.store_fs(url)
    path = f"{root.rstrip('/')}/{CARD_NAME}" if root else CARD_NAME
    try:
        return fs.cat_file(path).decode()
    except (FileNotFoundError, KeyError):
        return None


def _check_paths(cfg: PublishConfig, out: Path) -> None:
    if not L.is_local(cfg.store) or L.is_zip_path(cfg.store):
        raise PublishError(
            f"publish copies a local store folder; {cfg.store!r} is not one: publish where the "
            "store was extracted"
        )
    if out.exists():
        raise PublishError(f"OUT {out} exists; choose a new path (publish never overwrites)")
    if cfg.as_zip and out.suffix.lower() != ".zip":
        raise PublishError(f"--zip writes one file: name OUT with .zip (got {out})")
    out.parent.mkdir(parents=True, exist_ok=True)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _zip_folder(folder: Path, out: Path) -> None:
    # uncompressed: the chunks are read by byte range, and features barely compress
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())


def _make_read_only(out: Path) -> None:
    paths = [out] if out.is_file() else [*out.rglob("*"), out]  # directories last
    for p in paths:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def dataset_card(store: FeatureStore, cfg: PublishConfig, n_bytes: int) -> str:
    """The card's markdown text."""
    schema = store.schema
    splits: dict[str, int] = {}
    for t in store.tiles:
        splits[t.split or "-"] = splits.get(t.split or "-", 0) + 1
    lines = [
        f"# Teacher-feature store: {schema.dataset}",
        "",
        f"- source dataset: {schema.dataset}; imagery from: {cfg.source or NOT_STATED}",
        f"- licence: {cfg.licence or NOT_STATED}",
        f"- tiles: {len(store)} ({', '.join(f'{k}={v}' for k, v in sorted(splits.items()))}), "
        f"{schema.tile_size} px, base size {schema.base_size} px",
        f"- classes: {', '.join(schema.class_names)} (ignore index {schema.ignore_index})",
        f"- bytes: {n_bytes}",
        f"- fingerprint: {store.fingerprint}",
        f"- written by featcache {store.package_version}",
        "",
        "## Teachers",
        "",
    ]
    for entry in schema.teachers:
        spec = entry.spec
        levels = ", ".join(lv.key for lv in entry.levels)
        lines += [
            f"- **{spec.name}**: {spec.family} `{spec.arch}`, layer {spec.layer}, "
            f"{spec.channels} channels",
            f"  - weights: {spec.weights}, sha256 {spec.weights_sha256 or NOT_STATED}",
            f"  - codec: {entry.codec}",
            f"  - levels: {levels}",
        ]
    return "\n".join(lines + ["", *_usage(schema.teacher_names)]) + "\n"


def _usage(teachers: tuple[str, ...]) -> list[str]:
    first = teachers[0] if teachers else "NAME"
    return [
        "## Open it without featcache",
        "",
        "```python",
        "import xarray as xr",
        'tree = xr.open_datatree(STORE, engine="zarr")  # STORE: this folder, zip or URL',
        f'data = tree["teachers/{first}"]',
        "# each level's attrs['decode'] gives the formula, a numpy expression and the arrays it",
        "# uses; attrs['geometry'] where its tokens sit on the tile",
        "```",
        "",
        "A zip opens with `zarr.storage.ZipStore(PATH, mode='r')`; over HTTP the server must",
        "answer byte ranges (also suffix ranges).",
        "",
        "## Train from it",
        "",
        "```",
        "pip install 'featcache[http]'",
        "featcache train --store STORE --out runs/a   # STORE: a folder, a .zip or http://...",
        "```",
        "",
    ]


__all__ = [
    "CARD_NAME",
    "PublishConfig",
    "PublishError",
    "dataset_card",
    "publish_store",
    "read_card",
]
