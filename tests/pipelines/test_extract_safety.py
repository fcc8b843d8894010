"""Extraction never destroys what is not its own, and says so in CLI words (issue 11).

Each test reproduces one defect through the CLI (click's CliRunner, in process) and checks the
result against an independent record: a hash of every file before and after, bytes written by
hand, a lock file written by hand.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner, Result
from PIL import Image

from featcache.cli import main
from featstore import open_store, verify_store
from featstore.errors import StoreLockedError
from featstore.lock import LOCK_FILE

TEACHER = "dinov2_vitb14"
TINY = [
    "--teacher",
    TEACHER,
    "--tiny",
    "--tile-size",
    "64",
    "--base-size",
    "70",
    "--tiles-per-shard",
    "3",
    "--batch-size",
    "3",
    "--limit",
    "6",
    "-q",
    "--scales",
    "1",
    "--no-flip",
]


def _run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the independent record of 'nothing changed')."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    result = _run("synth", out, "--n-images", "2", "--size", "128", "--seed", "7")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def data(synth: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic dataset (tests may delete or damage files)."""
    copy = tmp_path / "data"
    shutil.copytree(synth, copy)
    return copy


def _no_traceback(result: Result) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


# --- 1. --overwrite deletes only a featcache store ---------------------------------------------


def test_overwrite_refuses_a_folder_of_user_files(data: Path, tmp_path: Path) -> None:
    user = tmp_path / "thesis"
    (user / "chapters").mkdir(parents=True)
    (user / "a.txt").write_text("draft")
    (user / "chapters" / "b.tex").write_text("\\section{x}")
    before = _hashes(user)
    result = _run("extract", data, user, *TINY, "--overwrite")
    _no_traceback(result)
    assert "not a featcache store" in result.output and "a.txt" in result.output
    assert "choose another STORE" in result.output
    assert _hashes(user) == before


@pytest.mark.parametrize("target", ["source", "parent"])
def test_overwrite_never_touches_the_source(data: Path, target: str) -> None:
    store = data if target == "source" else data.parent
    before = _hashes(data.parent)
    result = _run("extract", data, store, *TINY, "--overwrite")
    _no_traceback(result)
    assert "source" in result.output and "choose a STORE path outside" in result.output
    assert _hashes(data.parent) == before


def test_overwrite_still_replaces_a_featcache_store(data: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert _run("extract", data, store, *TINY).exit_code == 0
    (store / "stray.txt").write_text("old")  # proves the folder was replaced, not merged
    result = _run("extract", data, store, *TINY, "--overwrite", "--codec", "int8")
    assert result.exit_code == 0, result.output
    assert not (store / "stray.txt").exists()
    assert open_store(store).schema.teachers[0].codec["name"] == "int8"


# --- 4. one writer at a time ---------------------------------------------------------------------


def _write_lock(store: Path, pid: int, host: str, run_id: str = "otherrun") -> None:
    record = {
        "owner": "alice",
        "pid": pid,
        "host": host,
        "started": "2026-01-01T00:00:00",
        "run_id": run_id,
        "pid_start": None,
    }
    (store / LOCK_FILE).write_text(json.dumps(record))


def _store(data: Path, tmp_path: Path) -> Path:
    store = tmp_path / "s.zarr"
    result = _run("extract", data, store, *TINY)
    assert result.exit_code == 0, result.output
    return store


def test_second_writer_is_refused_then_break_lock(data: Path, tmp_path: Path) -> None:
    store = _store(data, tmp_path)
    _write_lock(store, 4242, "gpu-node-7")  # another host: liveness cannot be checked
    before = _hashes(store)
    result = _run("extract", data, store, *TINY, "--overwrite")
    _no_traceback(result)
    for needle in ("locked by another writer", "PID 4242", "gpu-node-7", "alice", "--break-lock"):
        assert needle in result.output, result.output
    assert _hashes(store) == before  # --overwrite did not delete a locked store
    result = _run("extract", data, store, *TINY, "--break-lock")
    assert result.exit_code == 0, result.output
    assert not (store / LOCK_FILE).exists()
    assert open_store(store, require_complete=True).done().all()


def test_live_writer_on_this_host_is_refused(data: Path, tmp_path: Path) -> None:
    store = _store(data, tmp_path)
    _write_lock(store, os.getpid(), socket.gethostname())  # this test process: alive
    result = _run("extract", data, store, *TINY)
    _no_traceback(result)
    assert f"PID {os.getpid()}" in result.output and "--break-lock" in result.output


def test_stale_lock_of_a_dead_process_is_taken_over(data: Path, tmp_path: Path) -> None:
    store = _store(data, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID is now free: the lock holder is provably gone
    _write_lock(store, dead.pid, socket.gethostname())
    result = _run("extract", data, store, *TINY)
    assert result.exit_code == 0, result.output
    assert not (store / LOCK_FILE).exists()


def test_creation_race_never_replaces_the_other_store(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer A builds its store; meanwhile writer B creates the path. A must not replace B's
    store (today's code deleted it and renamed its own in place, leaving B writing into A's)."""
    import featstore.writer as W

    store = tmp_path / "s.zarr"
    real_build = W._build
    other = tmp_path / "other"

    def build_then_race(group: zarr.Group, *args: object) -> None:
        real_build(group, *args)
        monkeypatch.setattr(W, "_build", real_build)
        assert _run("extract", data, store, *TINY, "--codec", "int8").exit_code == 0
        shutil.copytree(store, other)

    monkeypatch.setattr(W, "_build", build_then_race)
    result = _run("extract", data, store, *TINY)
    _no_traceback(result)
    assert "while this run was creating it" in result.output
    assert _hashes(store) == _hashes(other)  # B's store, whole and untouched
    assert open_store(store).schema.teachers[0].codec["name"] == "int8"


def test_two_processes_started_apart_one_is_refused(data: Path, tmp_path: Path) -> None:
    """The issue's scenario: two extractions 0.4 s apart with different settings. One writes the
    store, the other stops with the lock message; the store is whole and of one extraction."""
    store = tmp_path / "s.zarr"
    repo = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        FEATCACHE_TEST_SLEEP_AFTER_SHARD="1",
        PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, "-m", "featcache.cli", "extract", str(data), str(store), *TINY]
    first = subprocess.Popen(
        [*cmd, "--codec", "fp16"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(0.4)
    second = subprocess.Popen(
        [*cmd, "--codec", "int8"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    codes = [first.returncode, second.returncode]
    assert sorted(codes) == [0, 1], (codes, outs)
    loser = outs[codes.index(1)]
    assert "Traceback" not in loser
    assert "locked by another writer" in loser or "while this run was creating it" in loser
    winner = ("fp16", "int8")[codes.index(0)]
    assert open_store(store).schema.teachers[0].codec["name"] == winner
    assert verify_store(store) == []


def _shard_files(store: Path, k: int) -> list[Path]:
    """Files of every per-tile or per-shard array that hold shard group k (chunk key c/k...)."""
    return [
        p
        for p in store.rglob("*")
        if p.is_file()
        and f"/c/{k}" in f"/{p.relative_to(store)}"
        and (p.relative_to(store).as_posix().split("/c/")[1].split("/")[0] == str(k))
    ]


def test_verify_flags_a_shard_written_by_another_extraction(synth: Path, tmp_path: Path) -> None:
    """Two writers' shards under one header with valid checksums passed verify before."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    other = tmp_path / "other"
    assert _run("synth", other, "--n-images", "2", "--size", "128", "--seed", "8").exit_code == 0
    assert _run("extract", synth, a, *TINY).exit_code == 0
    assert _run("extract", other, b, *TINY).exit_code == 0  # same shapes, other tiles
    moved = _shard_files(b, 1)
    assert any("teachers" in str(p) for p in moved) and any("checksum" in str(p) for p in moved)
    for path in moved:
        shutil.copyfile(path, a / path.relative_to(b))
    problems = verify_store(a)
    mixed = [p for p in problems if "another extraction" in p]
    assert len(mixed) == 1 and "shard 1 (tiles 3..5)" in mixed[0], problems
    result = _run("verify", a)
    assert result.exit_code == 1 and "shard 1 (tiles 3..5)" in result.output


# --- 7. corrupt image files are refused -------------------------------------------------------


def _folder_dataset(root: Path, files: dict[str, bytes]) -> Path:
    (root / "images").mkdir(parents=True)
    for name, payload in files.items():
        (root / "images" / name).write_bytes(payload)
    return root


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:128]
    img = np.stack([xx * 2, yy * 2, (xx + yy)], -1) % 256 + rng.integers(0, 20, (128, 128, 3))
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _garble_scan(jpeg: bytes, seed: int) -> bytes:
    """Overwrite 400 bytes in the middle of the entropy-coded scan data with random bytes."""
    data = bytearray(jpeg)
    sos = data.index(b"\xff\xda")
    mid = (sos + len(data)) // 2
    data[mid : mid + 400] = np.random.default_rng(seed).integers(0, 256, 400, np.uint8).tobytes()
    return bytes(data)


def test_garbled_jpeg_is_refused_with_its_name(tmp_path: Path) -> None:
    # Seed 2 garbles the byte syntax (a byte pair no JPEG scan may hold).
    good, bad = _jpeg(0), _garble_scan(_jpeg(1), seed=2)
    # Independent check of the premise: plain Pillow decodes the damaged file without a word,
    # with many pixels far off.
    lax = np.asarray(Image.open(io.BytesIO(bad)).convert("RGB"), np.int16)
    ref = np.asarray(Image.open(io.BytesIO(_jpeg(1))).convert("RGB"), np.int16)
    assert (np.abs(lax - ref).max(-1) > 30).mean() > 0.05
    src = _folder_dataset(tmp_path / "d", {"a.jpg": good, "b.jpg": bad})
    out = tmp_path / "s.zarr"
    result = _run("extract", src, out, *TINY)
    _no_traceback(result)
    assert "b.jpg" in result.output and "corrupt" in result.output
    assert "a.jpg" not in result.output
    assert not out.exists()


def test_jpeg_with_dropped_scan_bytes_is_refused(tmp_path: Path) -> None:
    """500 bytes cut from the scan: valid syntax, but libjpeg sees a premature end of the data
    segment (a warning Pillow drops)."""
    jpeg = bytearray(_jpeg(1))
    mid = (jpeg.index(b"\xff\xda") + len(jpeg)) // 2
    del jpeg[mid : mid + 500]
    Image.open(io.BytesIO(bytes(jpeg))).load()  # the premise: plain Pillow accepts it
    src = _folder_dataset(tmp_path / "d", {"cut.jpg": bytes(jpeg)})
    result = _run("extract", src, tmp_path / "s.zarr", *TINY)
    _no_traceback(result)
    assert "cut.jpg" in result.output and "corrupt" in result.output


@pytest.mark.parametrize("seed", [12, 14, 31])
def test_garbled_jpeg_with_valid_syntax_is_refused(tmp_path: Path, seed: int) -> None:
    """Noise that keeps every marker valid: only the decoder sees that the scan's coded length
    is wrong (libjpeg: "extraneous bytes before marker"), a warning Pillow drops."""
    bad = _garble_scan(_jpeg(1), seed=seed)
    lax = np.asarray(Image.open(io.BytesIO(bad)).convert("RGB"), np.int16)  # Pillow: no word
    ref = np.asarray(Image.open(io.BytesIO(_jpeg(1))).convert("RGB"), np.int16)
    assert (np.abs(lax - ref).max(-1) > 30).mean() > 0.05
    src = _folder_dataset(tmp_path / "d", {"n.jpg": bad})
    result = _run("extract", src, tmp_path / "s.zarr", *TINY)
    _no_traceback(result)
    assert "n.jpg" in result.output and "libjpeg" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_truncated_png_is_refused_with_its_name(tmp_path: Path) -> None:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    src = _folder_dataset(tmp_path / "d", {"t.png": buf.getvalue()[: len(buf.getvalue()) // 2]})
    out = tmp_path / "s.zarr"
    result = _run("extract", src, out, *TINY)
    _no_traceback(result)
    assert "t.png" in result.output and "truncated or corrupt" in result.output
    assert not out.exists()


# --- 10. faults users hit --------------------------------------------------------------------


def test_grayscale_hint_is_a_valid_selection(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, "PNG")
    src = _folder_dataset(tmp_path / "d", {"g.png": buf.getvalue()})
    result = _run("extract", src, tmp_path / "s.zarr", *TINY)
    _no_traceback(result)
    assert "grayscale" in result.output and "--bands 1,1,1" in result.output
    assert "--bands 1,2,3" not in result.output  # band 2 and 3 do not exist in a gray file
    # The hint, followed, works.
    result = _run("extract", src, tmp_path / "s.zarr", *TINY, "--bands", "1,1,1")
    assert result.exit_code == 0, result.output


def test_unusable_device_names_the_option(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    result = _run("extract", data, out, *TINY, "--device", "cuda:99")  # no machine has 100
    _no_traceback(result)
    assert "--device cuda:99" in result.output and "--device cpu" in result.output
    assert not out.exists()


def test_unreachable_scheduler_fails_fast_and_leaves_nothing(data: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "s.zarr"
    start = time.monotonic()
    result = _run("extract", data, out, *TINY, "--scheduler", f"tcp://127.0.0.1:{port}")
    elapsed = time.monotonic() - start
    _no_traceback(result)
    assert f"--scheduler tcp://127.0.0.1:{port}" in result.output
    assert elapsed < 20, elapsed  # was 30 s of connect timeout plus the work before it
    assert list(tmp_path.iterdir()) == [data]  # no store, no temporary folder


def test_image_deleted_mid_run_is_named(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.extract as E
    from pipelines.sources import imageio

    gone = sorted((data / "images").glob("*.png"))[-1]
    real_open = E.open_tiles

    def open_then_delete(cfg: object) -> object:
        opened = real_open(cfg)  # the source is read (and hashed) here
        gone.unlink()
        imageio._decode_pil.cache_clear()
        return opened

    monkeypatch.setattr(E, "open_tiles", open_then_delete)
    result = _run("extract", data, tmp_path / "s.zarr", *TINY, "--limit", "8")
    _no_traceback(result)
    assert gone.name in result.output and "deleted or moved" in result.output
    assert "re-run the same command" in result.output


def test_disk_full_names_the_store_and_resumes(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featstore.writer as W

    store = tmp_path / "s.zarr"
    real_write = W.StoreWriter._write_arrays
    calls = {"n": 0}

    def fill_disk_on_second_shard(self: W.StoreWriter, k: int, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, k, *args)

    monkeypatch.setattr(W.StoreWriter, "_write_arrays", fill_disk_on_second_shard)
    result = _run("extract", data, store, *TINY)
    _no_traceback(result)
    for needle in ("no space left", str(store), "free space", "re-run the same command"):
        assert needle in result.output, result.output
    assert not (store / LOCK_FILE).exists()  # the failed run released its lock
    done = open_store(store).done()
    assert done[:3].all() and not done[3:].any()  # shard 0 kept, shard 1 not marked
    monkeypatch.setattr(W.StoreWriter, "_write_arrays", real_write)
    result = _run("extract", data, store, *TINY)
    assert result.exit_code == 0, result.output
    assert verify_store(store) == []


def test_disk_full_inside_zarr_is_reported(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ENOSPC raised by zarr's own file write (not our wrapper) reaches the message."""
    from zarr.storage import LocalStore

    store = tmp_path / "s.zarr"
    assert _run("extract", data, store, *TINY, "--limit", "3").exit_code == 0
    shutil.rmtree(store)

    async def full(self: LocalStore, key: str, value: object) -> None:
        if "/c/" in key:  # chunk writes fail; creating the store's metadata succeeds
            raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)

    real_set = LocalStore.set
    monkeypatch.setattr(LocalStore, "set", full)
    result = _run("extract", data, store, *TINY)
    _no_traceback(result)
    assert "no space left" in result.output and "free space" in result.output


def test_disk_full_while_finishing_is_reported(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featstore.writer as W

    def full(self: W.StoreWriter) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(W.StoreWriter, "finalize", full)
    store = tmp_path / "s.zarr"
    result = _run("extract", data, store, *TINY)
    _no_traceback(result)
    assert "no space left" in result.output and str(store) in result.output
    assert "free space" in result.output and not (store / LOCK_FILE).exists()


def test_orphan_tmp_folders_of_dead_runs_are_removed(data: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    legacy = tmp_path / "s.zarr.tmp-0badf00d"  # named by the code before this change
    killed = tmp_path / f"s.zarr.tmp-{host}-{dead.pid}-12345678"
    live = tmp_path / f"s.zarr.tmp-{host}-{os.getpid()}-87654321"  # a creation in progress
    for folder in (legacy, killed, live):
        zarr.open_group(folder, mode="w")
    result = _run("extract", data, store, *TINY)
    assert result.exit_code == 0, result.output
    assert not legacy.exists() and not killed.exists()
    assert live.exists()


# --- 9. the LocalCluster stays on this host -------------------------------------------------


def test_local_cluster_binds_to_localhost() -> None:
    pytest.importorskip("distributed")
    from pipelines.distributed import _local_cluster

    cluster = _local_cluster(0)  # the scheduler (and its HTTP/dashboard server) in-process
    try:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        http = cluster.scheduler.http_server
        hosts = {sock.getsockname()[0] for sock in http._sockets.values()}
        assert hosts == {"127.0.0.1"}, hosts  # was 0.0.0.0: every interface
    finally:
        cluster.close()


# --- 5. masks that match nothing, labelled splits without masks ------------------------------


def test_unmatched_masks_and_unlabelled_train_split_warn(tmp_path: Path) -> None:
    img = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img, "PNG")
    mask = io.BytesIO()
    Image.fromarray(np.ones((64, 64), np.uint8)).save(mask, "PNG")
    src = tmp_path / "d"
    for split in ("train", "val"):
        (src / split / "images").mkdir(parents=True)
        (src / split / "images" / "tile1.png").write_bytes(img.getvalue())
    (src / "val" / "masks").mkdir()
    (src / "val" / "masks" / "tile1_mask.png").write_bytes(mask.getvalue())  # wrong name
    (src / "classes.txt").write_text("a\nb\n")
    result = _run("extract", src, tmp_path / "s.zarr", *TINY, "--no-reduce-zero-label")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert any("tile1_mask.png" in line and "match no image" in line for line in lines), lines
    train = [line for line in lines if str(src / "train" / "images") in line]
    assert train and "has no masks" in train[0] and "1 of 1" in train[0], lines
    assert "0 labelled tiles" in result.output.replace("labeled", "labelled")


# --- the lock, at library level ---------------------------------------------------------------


def test_lock_acquire_is_exclusive(tmp_path: Path) -> None:
    from featstore import lock

    held = lock.acquire(str(tmp_path), "run-a")
    assert held.pid == os.getpid()
    with pytest.raises(StoreLockedError, match="run run-a"):
        lock.acquire(str(tmp_path), "run-b")
    assert lock.acquire(str(tmp_path), "run-b", break_lock=True).run_id == "run-b"
    lock.remove_lock(str(tmp_path), "run-a")  # not the holder any more: no effect
    assert lock.read_lock(str(tmp_path)).run_id == "run-b"  # type: ignore[union-attr]
