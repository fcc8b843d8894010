"""Training from remote and zipped stores with DataLoader workers (issue 16).

Each worker reopens the store in its own process; a run from ``http://``, ``zip://``, a bare
``.zip`` or ``memory://`` with ``--workers 2`` must give the same weights and metrics as the
same seed trained from the local folder with ``--workers 0`` (the independent reference).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from featcache.cli import main
from featstore import open_store
from featstore.errors import StoreFormatError
from tests.featstore.rangeserver import serve
from tests.helpers import DINO, build_store, tiny_run_args, write_ids


def zip_store(folder: Path, out: Path) -> Path:
    """``folder``'s files in a zip, store root at the zip root, uncompressed (zarr's layout)."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return out


def train(url: str, root: Path, out: Path, workers: int) -> dict:
    """``featcache train`` for 2 steps; the checkpoint it wrote."""
    args = ["train", "--store", url, "--teacher", DINO, *tiny_run_args(root)]
    args[args.index("--workers") + 1] = str(workers)
    res = CliRunner().invoke(main, [*args, "--iters", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["step"] == 2
    return torch.load(out / "latest.pt", map_location="cpu", weights_only=True)


def assert_same_run(got: dict, want: dict) -> None:
    for part in ("student", "ema"):
        assert got[part].keys() == want[part].keys()
        differ = [k for k in want[part] if not torch.equal(got[part][k], want[part][k])]
        assert not differ, f"{part} weights differ from the local run: {differ[:3]}"
        for metric in ("miou", "oa", "pixels"):
            assert got["metrics"][part][metric] == want["metrics"][part][metric]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(root holding store.zarr, store.zip and the id lists; the local --workers 0 run)."""
    root = tmp_path_factory.mktemp("remote")
    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    write_ids(root / "l.txt", ids[:2])
    write_ids(root / "u.txt", ids[2:4])
    write_ids(root / "v.txt", ids[4:])
    zip_store(root / "store.zarr", root / "store.zip")
    return root, train(url, root, root / "run_local", workers=0)


def test_train_over_http_with_workers(local: tuple[Path, dict], tmp_path: Path) -> None:
    root, want = local
    with serve(root) as (base, requests):
        got = train(f"{base}/store.zarr", root, tmp_path / "run", workers=2)
        assert any("/store.zarr/teachers/" in r for r in requests)  # read over HTTP
    assert_same_run(got, want)


@pytest.mark.parametrize("form", ["zip-url", "bare-zip"])
def test_train_from_zip_with_workers(form: str, local: tuple[Path, dict], tmp_path: Path) -> None:
    root, want = local
    path = root / "store.zip"
    url = f"zip://::{path}" if form == "zip-url" else str(path)
    assert_same_run(train(url, root, tmp_path / "run", workers=2), want)


def test_train_from_memory_with_workers(local: tuple[Path, dict], tmp_path: Path) -> None:
    root, want = local
    fs, name = fsspec.filesystem("memory"), f"/remote-{uuid.uuid4().hex}/store.zarr"
    fs.put(str(root / "store.zarr"), name, recursive=True)
    try:
        got = train(f"memory://{name}", root, tmp_path / "run", workers=2)
    finally:
        fs.rm(name, recursive=True)
    assert_same_run(got, want)


def test_zipstore_object_and_pickled_store_read_like_the_folder(
    local: tuple[Path, dict],
) -> None:
    import pickle

    root, _ = local
    ref = open_store(root / "store.zarr")
    zstore = open_store(zarr.storage.ZipStore(root / "store.zip", mode="r"))
    spawned = pickle.loads(pickle.dumps(zstore))  # what a "spawn" worker receives
    for store in (zstore, spawned):
        for i in range(len(ref)):
            np.testing.assert_array_equal(store.read(DINO, i), ref.read(DINO, i))
            np.testing.assert_array_equal(store.read_image(i), ref.read_image(i))


def test_zip_is_read_only(local: tuple[Path, dict]) -> None:
    from featstore import layout as L

    with pytest.raises(StoreFormatError, match="read-only.*featcache publish"):
        L.open_root(str(local[0] / "store.zip"), "r+")


def test_http_without_its_packages_names_the_extra() -> None:
    # a fresh interpreter where aiohttp cannot be imported (as in an install without the extra)
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from featstore import open_store\n"
        "from featstore.errors import StoreFormatError\n"
        "try:\n    open_store('http://127.0.0.1:9/s.zarr')\n"
        "except StoreFormatError as err:\n    print(err)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert res.returncode == 0, res.stderr
    assert "pip install 'featcache[http]'" in res.stdout, res.stdout


def _open_and_read_requests(root: Path) -> int:
    """HTTP requests of ``open_store`` + reading tile 0 of the teacher and its image."""
    with serve(root) as (base, requests):
        store = open_store(f"{base}/store.zarr")
        store.read(DINO, 0)
        store.read_image(0)
        return len(requests)


def test_finished_store_is_consolidated_and_opens_in_fewer_requests(
    local: tuple[Path, dict], tmp_path: Path
) -> None:
    import shutil

    from featstore import layout as L

    root = tmp_path / "plain"
    shutil.copytree(local[0] / "store.zarr", root / "store.zarr")
    group = zarr.open_group(root / "store.zarr", mode="r")
    assert group.metadata.consolidated_metadata is not None  # written by finalize
    assert L.consolidated_problem(group) is None
    consolidated = _open_and_read_requests(root)
    # the same store without it: a root attrs write through the real metadata drops it
    plain = zarr.open_group(root / "store.zarr", mode="r+", use_consolidated=False)
    plain.attrs["note"] = "x"
    assert zarr.open_group(root / "store.zarr").metadata.consolidated_metadata is None
    unconsolidated = _open_and_read_requests(root)
    # each array's zarr.json is one request less: done, checksum, level, image, (aux: fp16 none)
    assert consolidated <= unconsolidated - 4, (consolidated, unconsolidated)
    L.consolidate(str(root / "store.zarr"))
    assert _open_and_read_requests(root) == consolidated


def test_stale_consolidated_metadata_is_not_used(local: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from featstore import layout as L

    path = tmp_path / "store.zarr"
    shutil.copytree(local[0] / "store.zarr", path)
    level = f"teachers/{DINO}/s1.00"
    # a child's metadata edited behind the consolidated copy...
    zarr.open_group(path, mode="r+", use_consolidated=False)[level].attrs["note"] = "edited"
    # ...then the header rewritten by a writer that kept the (now stale) consolidated copy
    group = zarr.open_group(path, mode="r+")
    group.attrs[L.ATTR_KEY] = dict(group.attrs[L.ATTR_KEY], package_version="edited")
    stale = zarr.open_group(path, mode="r")
    assert stale.metadata.consolidated_metadata is not None
    assert "note" not in stale[level].attrs  # what a reader trusting it would see
    assert L.consolidated_problem(stale) == "the header changed after the metadata was consolidated"
    assert L.open_root(str(path))[level].attrs["note"] == "edited"  # the real metadata
    assert open_store(path).package_version == "edited"
    L.consolidate(str(path))  # what finalize, bank and repair do
    fresh = zarr.open_group(path, mode="r")
    assert L.consolidated_problem(fresh) is None and fresh[level].attrs["note"] == "edited"


def test_verify_reports_a_child_edited_behind_the_consolidated_copy(
    local: tuple[Path, dict], tmp_path: Path
) -> None:
    import shutil

    from featstore import layout as L
    from featstore import verify_store

    path = tmp_path / "store.zarr"
    shutil.copytree(local[0] / "store.zarr", path)
    assert verify_store(str(path)) == []
    level = f"teachers/{DINO}/s1.00"
    zarr.open_group(path, mode="r+", use_consolidated=False)[level].attrs["note"] = "edited"
    stale = [p for p in verify_store(str(path)) if "consolidated" in p]
    assert len(stale) == 1 and stale[0].startswith(f"{level}: its consolidated metadata"), stale
    L.consolidate(str(path))
    assert not [p for p in verify_store(str(path)) if "consolidated" in p]
