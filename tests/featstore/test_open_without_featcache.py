"""A store opens and decodes with zarr/xarray/numpy alone, following its attrs (issue 16).

The decoding runs in a subprocess in which ``featstore``, ``pipelines``, ``trainer``,
``featcache`` and ``featviews`` cannot be imported, and is compared with ``FeatureStore.read``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from featstore import open_store, verify_store
from featstore.layout import published_attr_problems
from tests.helpers import build_store

TEACHER, LEVEL, TILE = "dinov2_vitb14", "s0.50f", 1
CODECS = {
    "fp16": {"name": "fp16"},
    "int8": {"name": "int8"},
    "pca": {"name": "pca", "k": 4},
    "pca-int8": {"name": "pca-int8", "k": 4},
}

# Runs with only numpy/xarray/zarr: our packages are blocked before anything else is imported
# (a None entry in sys.modules makes `import name` and `import name.sub` raise ImportError).
SCRIPT = r"""
import sys
BLOCKED = ("featstore", "pipelines", "trainer", "featcache", "featviews", "tests")
for name in BLOCKED:
    sys.modules[name] = None
import json
import numpy as np
import xarray as xr

store, teacher, level, tile, out = sys.argv[1:6]
tile = int(tile)
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"the blocker failed: {name} imported")

tree = xr.open_datatree(store, engine="zarr")
group = tree[f"teachers/{teacher}"]
decode = group[level].attrs["decode"]
# Each named array; tile-indexed ones cut to the one tile (kept as a length-1 tile axis).
arrays = {}
for role, name in decode["arrays"].items():
    var = group[name]
    if var.dims[0] == "tile":
        var = var.isel(tile=slice(tile, tile + 1))
    arrays[role] = np.asarray(var.values)

# 1. The formula as written in words, implemented here by hand per codec name.
name = decode["codec"]["name"]
data = arrays["data"].astype(np.float32)
if name in ("int8", "pca-int8"):
    aux = arrays["aux"]
    data = data * aux[:, 0][:, None, None, :] + aux[:, 1][:, None, None, :]
if name in ("pca", "pca-int8"):
    data = data @ arrays["basis"].T + arrays["mean"]
by_hand = data[0]
# 2. The numpy expression the store carries.
by_expr = np.asarray(eval(decode["numpy"], {"np": np}, dict(arrays)), np.float32)[0]

np.save(out + "/by_hand.npy", by_hand)
np.save(out + "/by_expr.npy", by_expr)
info = {
    "stored_dtype": str(group[level].dtype),
    "dims": list(group[level].dims),
    "geometry": group[level].attrs["geometry"],
    "teacher": {k: group.attrs[k] for k in ("layer", "weights_sha256", "preprocessing")},
    "groups": sorted(tree.groups),
}
with open(out + "/info.json", "w") as f:
    json.dump(info, f)
"""


@pytest.fixture(scope="module", params=sorted(CODECS))
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny real extraction with two scales and flips, one per codec."""
    root = tmp_path_factory.mktemp(request.param)
    return build_store(root, n_images=3, scales=(1.0, 0.5), flip=True, codec=CODECS[request.param])


def run_plain_reader(store: str, out: Path) -> dict[str, Any]:
    """Run SCRIPT in a fresh interpreter; returns its info and leaves the .npy files in out."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, store, TEACHER, LEVEL, str(TILE), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "info.json").read_text())


def test_plain_xarray_decodes_like_the_reader(store: str, tmp_path: Path) -> None:
    info = run_plain_reader(store, tmp_path)
    fs = open_store(store)
    want = fs.read(TEACHER, TILE, LEVEL)
    for what in ("by_hand", "by_expr"):
        got = np.load(tmp_path / f"{what}.npy")
        assert got.shape == want.shape, what
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=what)
    codec = fs.schema.teacher(TEACHER).codec["name"]
    # xarray must not mask the zarr fill value (0) of the stored data: the dtype stays as stored.
    want_dtype = {"fp16": "float16", "int8": "int8", "pca": "float16", "pca-int8": "int8"}
    assert info["stored_dtype"] == want_dtype[codec]
    channel_dim = "component" if codec.startswith("pca") else "channel"
    assert info["dims"] == ["tile", f"y_{LEVEL}", f"x_{LEVEL}", channel_dim]
    assert {"/tiles", "/pixels", f"/teachers/{TEACHER}"} <= set(info["groups"])


def test_level_and_teacher_attrs(store: str, tmp_path: Path) -> None:
    info = run_plain_reader(store, tmp_path)
    geo = info["geometry"]
    fs = open_store(store)
    spec = fs.schema.teacher(TEACHER).spec
    # Written out for helpers.build_store: 64 px tiles, base (canvas at scale 1) 70 px, the tiny
    # DINOv2 at stride 14 with input snapped to a stride multiple; LEVEL is scale 0.5, flipped.
    assert (geo["scale"], geo["flipped"], geo["tile_px"], geo["stride"]) == (0.5, True, 64, 14)
    assert geo["render_px"] == 35 and geo["canvas_px"] == 70
    assert geo["input_px"] == 70 // 14 * 14 and geo["grid"] == math.ceil(70 / 14)
    assert geo["tokens_per_tile_px"] == pytest.approx(35 / 64 * 70 / 70 / 14)
    y = np.asarray(zarr.open_group(store, mode="r")[f"teachers/{TEACHER}/{LEVEL}"]).shape[1]
    assert y == geo["grid"]
    teacher = info["teacher"]
    assert teacher["layer"] == spec.layer
    assert teacher["weights_sha256"] == spec.weights_sha256
    assert teacher["preprocessing"]["mean"] == list(spec.mean)
    assert teacher["preprocessing"]["std"] == list(spec.std)
    assert teacher["preprocessing"]["resize"] == spec.resize.to_dict()


def _strip_new_metadata(path: Path) -> int:
    """Make a store look written before issue 16: no dimension names, no decode/layout attrs."""
    new_attrs = ("decode", "geometry", "layout", "layer", "weights", "weights_sha256")
    new_attrs += ("preprocessing", "channels", "featstore_consolidated")
    stripped = 0
    for meta in path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        had = "dimension_names" in doc
        doc.pop("dimension_names", None)
        doc.pop("consolidated_metadata", None)  # consolidated metadata came later too
        attrs = doc.get("attributes", {})
        had |= any(k in attrs for k in new_attrs)
        doc["attributes"] = {k: v for k, v in attrs.items() if k not in new_attrs}
        meta.write_text(json.dumps(doc))
        stripped += had
    return stripped


def test_old_store_without_names_or_attrs_still_reads(tmp_path: Path) -> None:
    store = build_store(tmp_path, n_images=3, scales=(1.0, 0.5), flip=True, codec=CODECS["int8"])
    before = open_store(store)
    want = before.read(TEACHER, TILE, LEVEL)
    fingerprint = before.fingerprint
    assert _strip_new_metadata(Path(store)) > 10
    after = open_store(store)
    np.testing.assert_array_equal(after.read(TEACHER, TILE, LEVEL), want)
    # Attrs and dimension names are not part of the store's identity.
    assert after.fingerprint == fingerprint
    assert verify_store(store) == []
    assert published_attr_problems(zarr.open_group(store, mode="r"), after.schema) == []


def test_edited_decode_attrs_are_reported(tmp_path: Path) -> None:
    store = build_store(tmp_path, n_images=2, scales=(1.0, 0.5), flip=True, codec=CODECS["int8"])
    schema = open_store(store).schema
    group = zarr.open_group(store, mode="r+")
    assert published_attr_problems(group, schema) == []
    path = f"teachers/{TEACHER}/{LEVEL}"
    decode = dict(group[path].attrs["decode"])
    # scale and offset swapped: a plain reader would decode garbage without noticing.
    decode["numpy"] = "data * aux[..., 1, None, None, :] + aux[..., 0, None, None, :]"
    group[path].attrs["decode"] = decode
    geometry = dict(group[path].attrs["geometry"], grid=99)
    group[path].attrs["geometry"] = geometry
    problems = published_attr_problems(group, schema)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"attrs of {path}: 'geometry' is ")
    assert problems[1].startswith(f"attrs of {path}: 'decode' is ")
    # and `featcache verify` says so
    from featstore.verify import verify_store

    found = verify_store(store)
    assert any("'decode' is " in p for p in found), found


def _arrays(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    out = []
    for name, node in group.members():
        path = f"{prefix}{name}"
        if isinstance(node, zarr.Group):
            out += _arrays(node, path + "/")
        else:
            out.append((path, node))
    return out


def test_every_array_named_and_bank_decodes_by_its_attrs(tmp_path: Path) -> None:
    """Two teachers with different grids, int8, plus a view bank: the whole tree opens."""
    import xarray as xr

    from pipelines.viewbank import build_view_bank

    clip = "clip_vitl14"
    store = build_store(tmp_path, n_images=3, teachers=(TEACHER, clip), codec=CODECS["int8"])
    build_view_bank(store, tiny=True, k=2, seed=3, batch_size=4)
    arrays = _arrays(zarr.open_group(store, mode="r"))
    assert len(arrays) > 20
    for path, arr in arrays:
        names = arr.metadata.dimension_names
        assert names is not None and len(names) == arr.ndim, path
    tree = xr.open_datatree(store, engine="zarr", consolidated=False)  # none written yet
    fs = open_store(store)
    for teacher in (TEACHER, clip):
        group = tree[f"teachers/{teacher}"]
        decode = group["bank"].attrs["decode"]
        named = {
            r: np.asarray(group[n].values[TILE : TILE + 1]) for r, n in decode["arrays"].items()
        }
        got = eval(decode["numpy"], {"np": np}, named)[0]
        np.testing.assert_allclose(got, fs.bank.read_views(teacher, TILE), rtol=1e-6, atol=1e-6)
