"""`featcache publish`: a read-only, consolidated copy with a dataset card; train from it over HTTP.

The card is checked against the fixture's own numbers (tile count, fingerprint, teacher spec);
the run from the published copy over HTTP against the same seed trained from the source folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from featcache.cli import main
from featstore import layout as L
from featstore import open_store
from tests.featstore.rangeserver import serve
from tests.featstore.test_remote_train import assert_same_run, train
from tests.helpers import DINO, build_store, write_ids


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pub")
    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    write_ids(root / "l.txt", ids[:2])
    write_ids(root / "u.txt", ids[2:4])
    write_ids(root / "v.txt", ids[4:])
    return root


def _publish(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, ["publish", *args])
    return res.exit_code, res.output, res.stderr  # output: stdout and stderr interleaved


def test_publish_serve_train_evaluate(source: Path, tmp_path: Path) -> None:
    store = str(source / "store.zarr")
    out = tmp_path / "www" / "pub.zarr"
    code, stdout, stderr = _publish(store, str(out), "--licence", "CC BY 4.0")
    assert code == 0, stdout + stderr
    assert "WARNING" not in stderr
    # read-only copy (mode bits: os.access says yes to root)
    assert all(p.stat().st_mode & 0o222 == 0 for p in [out, *out.rglob("*")])
    group = zarr.open_group(out, mode="r")
    assert group.metadata.consolidated_metadata is not None
    assert L.consolidated_problem(group) is None
    want = train(store, source, tmp_path / "run_local", workers=0)
    with serve(tmp_path / "www") as (base, _):
        url = f"{base}/pub.zarr"
        assert open_store(url).fingerprint == open_store(store).fingerprint
        got = train(url, source, tmp_path / "run_http", workers=2)
        res = CliRunner().invoke(
            main, ["evaluate", str(tmp_path / "run_http" / "latest.pt"), "--store", url]
        )
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{") :])
    assert metrics["ema"]["miou"] == pytest.approx(want["metrics"]["ema"]["miou"])
    assert_same_run(got, want)


def test_card_says_what_the_store_holds(source: Path, tmp_path: Path) -> None:
    store = open_store(source / "store.zarr")
    out = tmp_path / "pub.zip"
    code, _, stderr = _publish(str(source / "store.zarr"), str(out), "--zip")
    assert code == 0, stderr
    assert "--licence" in stderr  # the warning names the option
    card = CliRunner().invoke(main, ["info", str(out)]).output
    spec = store.schema.teacher(DINO).spec
    for text in (
        "licence: not stated",
        f"fingerprint: {store.fingerprint}",
        "tiles: 6 (",  # build_store: 6 synthetic scenes of one tile each
        f"**{DINO}**",
        f"layer {spec.layer}",
        "levels: s1.00",
        "codec: {'name': 'fp16'}",
        'xr.open_datatree(STORE, engine="zarr")',
        "featcache train --store STORE",
    ):
        assert text in card, (text, card)
    assert open_store(out).read(DINO, 3).tolist() == store.read(DINO, 3).tolist()


def test_publish_refuses_existing_out_and_a_zip_without_suffix(
    source: Path, tmp_path: Path
) -> None:
    code, stdout, _ = _publish(str(source / "store.zarr"), str(tmp_path), "--licence", "x")
    assert code == 1 and "exists; choose a new path" in stdout
    code, stdout, _ = _publish(
        str(source / "store.zarr"), str(tmp_path / "p.zarr"), "--zip", "--licence", "x"
    )
    assert code == 1 and "name OUT with .zip" in stdout
