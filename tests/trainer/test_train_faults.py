"""Issue 15, training faults: SIGKILL at random steps (also mid-checkpoint) and a full disk while
writing a checkpoint lose nothing; the resumed run equals an uninterrupted one bit for bit.

The kills use the test-only hook of `featstore.faults` (``FEATCACHE_FAULT=<point>:<n>``): the
engine's ``train.step`` (after an optimizer step) and `trainer.durable`'s ``checkpoint.write``
(every write call of ``torch.save``: mid-file), ``checkpoint.before_rename`` (the temporary file
whole, not yet renamed) and ``checkpoint.after_rename`` (renamed, folder not yet fsynced). Each
attempt runs the documented resume command (``featcache train ... --resume auto``) in a fresh
process and is killed once; a last attempt finishes. The reference is the same command run once,
uninterrupted, in a process with the same thread count.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.durable as durable
from featstore import open_store
from featstore.faults import FAULT_ENV
from tests.helpers import CROP, DINO, build_store, tiny_config, write_ids
from trainer.checkpoint import read_checkpoint
from trainer.config import TeacherConfig
from trainer.durable import RunWriteError
from trainer.engine import train

REPO = Path(__file__).resolve().parents[2]
ITERS = 30
# (point, largest n): each n is reached within one attempt, before the run could finish.
KILL_POINTS = (
    ("train.step", 5),
    ("checkpoint.write", 3000),  # one checkpoint of the tiny student is ~3200 write calls
    ("checkpoint.before_rename", 2),
    ("checkpoint.after_rename", 2),
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    write_ids(root / "l.txt", ids[:2])
    write_ids(root / "u.txt", ids[2:4])
    write_ids(root / "v.txt", ids[4:])
    # checkpoint every 3 steps (there is no CLI option for it); no TensorBoard (wall times)
    (root / "cfg.yaml").write_text(
        "schedule:\n  ckpt_interval: 3\nruntime:\n  tensorboard: false\n"
    )
    return url, root


def _command(url: str, root: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "featcache.cli", "train", "--config", str(root / "cfg.yaml"),
        "--store", url, "--teacher", DINO, "--tiny", "--crop", str(CROP), "--batch", "1+1",
        "--labeled", str(root / "l.txt"), "--unlabeled", str(root / "u.txt"),
        "--val", str(root / "v.txt"), "--device", "cpu", "--workers", "0", "--no-progress",
        "--iters", str(ITERS), "--eval-interval", "4", "--log-interval", "1",
        "--out", str(out), "--resume", "auto",
    ]  # fmt: skip


def _run(cmd: list[str], fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def kill_plan(seed: int, kills: int) -> list[str]:
    """``kills`` fault specs: every kind of point at least once, hit counts drawn by ``seed``."""
    rng = random.Random(seed)
    points = [KILL_POINTS[i % len(KILL_POINTS)] for i in range(kills)]
    rng.shuffle(points)
    return [f"{name}:{rng.randint(1, top)}" for name, top in points]


def _tensors_equal(a: Any, b: Any, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:  # json text: NaN metrics (classes never predicted) compare equal as text
        assert json.dumps(a) == json.dumps(b), f"{where}: {a!r} != {b!r}"


def compare_runs(resumed: Path, reference: Path) -> None:
    """Weights, optimizer, RNG, progress and metrics of both checkpoints, and both logs, equal."""
    for name in ("latest.pt", "best.pt"):
        a, b = read_checkpoint(resumed / name), read_checkpoint(reference / name)
        # not "rng": the global torch RNG differs by the draws of the DataLoader iterator the
        # resumed process makes for the epoch it resumes in (torch draws a base seed per
        # iterator); training never reads it, which the equal weights prove
        for key in ("student", "ema", "optimizer", "run", "metrics"):
            _tensors_equal(a[key], b[key], f"{name}[{key}]")
    for name in ("metrics.csv", "eval.jsonl"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(resumed.glob("*.tmp")), "a temporary checkpoint or log was left behind"


def _final_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"step"')][-1]
    record = json.loads(line)
    record.pop("out_dir")
    return record


def test_kill_plan_is_seeded_and_covers_every_point() -> None:
    plan = kill_plan(15, 6)
    assert plan == kill_plan(15, 6) and plan != kill_plan(16, 6)
    assert {p.rsplit(":", 1)[0] for p in plan} == {name for name, _ in KILL_POINTS}


def test_sigkill_at_random_steps_resumes_bit_identically(
    data: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = data
    reference = _run(_command(url, root, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    steps = []
    for fault in kill_plan(seed=15, kills=6):
        proc = _run(_command(url, root, out), fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-3000:])
        latest = out / "latest.pt"
        steps.append(read_checkpoint(latest)["run"]["step"] if latest.is_file() else 0)
    assert steps == sorted(steps) and steps[-1] < ITERS, steps  # progress, never past the end
    final = _run(_command(url, root, out))
    assert final.returncode == 0, final.stderr[-3000:]

    assert _final_json(final) == _final_json(reference)
    compare_runs(out, tmp_path / "reference")


# ------------------------------------------------------------------ a full disk


class _FullDisk:
    """``open`` of `trainer.durable` whose files take ``room`` bytes, then raise ENOSPC (the
    partial write lands first, as on a real disk), for the first ``after``-th file opened for
    writing a checkpoint onwards."""

    def __init__(self, after: int, room: int = 100_000) -> None:
        self.after, self.room, self.opened = after, room, 0

    def __call__(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller
        if "b" in mode and str(path).endswith(".pt.tmp"):
            self.opened += 1
            if self.opened >= self.after:
                return _Filling(fh, self.room)
        return fh


class _Filling:
    def __init__(self, fh: Any, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data: Any) -> int:
        take = min(len(data), self.room)
        self.fh.write(bytes(data[:take]))
        self.room -= take
        if take < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return take

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> _Filling:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def test_full_disk_while_checkpointing_keeps_the_previous_one(
    data: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = data
    ids = [t.tile_id for t in open_store(url).tiles]

    def config(name: str) -> Any:
        folder = tmp_path / name
        folder.mkdir()
        cfg = tiny_config(folder, url, ids, [TeacherConfig(DINO)], iters=6)
        cfg.schedule.ckpt_interval = 2
        cfg.schedule.eval_interval = 3
        return cfg

    reference = train(config("reference"))
    cfg = config("full")
    out = Path(cfg.runtime.out_dir)
    # checkpoints written: latest@2, best@3, latest@4 <- the disk fills during this one
    monkeypatch.setattr(durable, "open", _FullDisk(after=3), raising=False)
    with pytest.raises(RunWriteError) as info:
        train(cfg)
    message = str(info.value)
    for part in (str(out / "latest.pt"), "no space left", "free space", "--resume auto"):
        assert part in message, (part, message)
    assert "still holds the previous checkpoint" in message
    assert not list(out.glob("*.tmp")), "the temporary checkpoint was left behind"
    kept = read_checkpoint(out / "latest.pt")  # whole, and the one before the failed write
    assert kept["run"]["step"] == 2

    monkeypatch.undo()  # space freed: the documented resume finishes the run
    cfg.runtime.resume = "auto"
    resumed = train(cfg)
    assert resumed.step == reference.step == 6
    compare_runs(out, reference.out_dir)


def test_atomic_write_failure_of_a_first_file_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable, "open", _FullDisk(after=1, room=10), raising=False)
    target = tmp_path / "best.pt"
    with pytest.raises(RunWriteError, match="no checkpoint was written before"):
        durable.atomic_write(target, lambda fh: fh.write(b"x" * 100), what="checkpoint")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ a non-finite loss


def test_diverging_run_stops_naming_step_terms_and_tiles(
    data: tuple[str, Path], tmp_path: Path
) -> None:
    """An absurd learning rate through the real CLI: the loss of step 0 is computed with the
    initial weights (finite), so the first non-finite loss is at step 1 at the earliest."""
    from click.testing import CliRunner

    from featcache.cli import main

    url, root = data
    out = tmp_path / "run"
    argv = _command(url, root, out)[3:-2]  # featcache train ..., without --resume auto
    result = CliRunner().invoke(main, [*argv, "--lr", "1e30", "--iters", "6"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    message = result.output[result.output.index("non-finite loss") :]
    step = int(message.split("at step ")[1].split(":")[0])
    assert 1 <= step < 6, message
    for term in ("loss_x=", "loss_u=", f"distill/{DINO}=", "loss="):
        assert term in message, (term, message)
    named = message.split("batch ids ")[1].split("]")[0]
    labeled, unlabeled = ((root / f).read_text().split() for f in ("l.txt", "u.txt"))
    tiles = [t.strip(" '[") for t in named.split(",")]
    assert len(tiles) == 2 and tiles[0] in labeled and tiles[1] in unlabeled, named
    assert "Lower the learning rate" in message
    assert not out.exists()  # a new run that fails before its first checkpoint leaves nothing


def test_unwritable_out_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a non-root user gets for --out in a read-only folder (root passes any permission
    check, so the refusal of the probe is simulated here; the catalogue case
    `train-out-in-read-only-folder` runs the real thing as a non-root user)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(durable.tempfile, "TemporaryFile", refuse)
    out = tmp_path / "ro" / "run"
    with pytest.raises(RunWriteError) as info:
        durable.check_writable_folder(out, "--out")
    message = str(info.value)
    assert f"--out {out}: cannot write in {tmp_path}" in message and "writable" in message
    assert not out.parent.exists()


def test_full_disk_while_writing_config_yaml_leaves_no_half_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.config import TrainConfig

    target = tmp_path / "config.yaml"
    TrainConfig().dump(target)
    before = target.read_bytes()

    def any_tmp(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller
        return _Filling(fh, 10) if str(path).endswith(".tmp") else fh

    monkeypatch.setattr(durable, "open", any_tmp, raising=False)
    cfg = TrainConfig()
    cfg.optim.lr = 0.123
    with pytest.raises(RunWriteError, match=r"could not write run config .*free space"):
        cfg.dump(target)
    assert target.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
