"""Dask-distributed extraction writes exactly what the single-process run writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from featstore import open_store, verify_store
from pipelines.config import ExtractConfig, ExtractConfigError, parse_scheduler
from pipelines.extract import run_extraction
from pipelines.synthetic import generate_synthetic


def _walk(group: zarr.Group) -> list[tuple[str, zarr.Array]]:
    out = list(group.arrays())
    for name, sub in group.groups():
        out += [(f"{name}/{p}", a) for p, a in _walk(sub)]
    return out


def _arrays(url: Path) -> dict[str, np.ndarray]:
    """Every array of a store, read whole (raw stored values, before decoding)."""
    return {path: arr[...] for path, arr in _walk(zarr.open_group(str(url), mode="r"))}


@pytest.mark.dask
def test_local_cluster_matches_single_process(tmp_path: Path) -> None:
    source = generate_synthetic(tmp_path / "src", n_images=2, size=128, seed=5)
    common = dict(
        source=str(source),
        tile_size=64,
        teachers=("dinov2_vitb14",),
        tiny=True,
        base_size=70,
        scales=(1.0, 2.0),
        flip=True,
        tiles_per_shard=2,
        batch_size=2,
        limit=7,
    )
    local = run_extraction(ExtractConfig(out=str(tmp_path / "a.zarr"), **common), progress=False)
    dist = run_extraction(
        ExtractConfig(out=str(tmp_path / "b.zarr"), scheduler="local:2", **common), progress=False
    )
    a, b = _arrays(Path(local)), _arrays(Path(dist))
    assert sorted(a) == sorted(b) and "done" in a and "teachers/dinov2_vitb14/s2.00f" in a
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    assert open_store(dist).complete and verify_store(dist) == []
    # merged statistics are summed in shard order: identical, not just close
    assert zarr.open_group(local).attrs["featstore"] == zarr.open_group(dist).attrs["featstore"]


def test_scheduler_spec_parsing() -> None:
    assert parse_scheduler("local") == ("local", None)
    assert parse_scheduler("local:3") == ("cluster", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("tcp", "tcp://10.0.0.1:8786")
    for bad in ("local:0", "cluster", "tcp://host", "local:x"):
        with pytest.raises(ExtractConfigError, match="--scheduler"):
            parse_scheduler(bad)
