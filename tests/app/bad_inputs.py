"""The bad-input catalogue: kinds of bad input and faults a careful operator tries, per command.

Each `Case` builds its input in a fresh folder (`Env.tmp`), runs one `featcache` command line
in-process (click's `CliRunner`) and is judged on four things (`judge`): a message rather than a
traceback (and a non-zero exit for errors), the message names the file or option at fault, it
says a fix, and nothing is left behind (the folder tree is byte-identical afterwards, except what
the case declares as expected output). `tests/app/test_bad_inputs.py` runs every case;
`bench/reliability.py` writes the table of RELIABILITY.md from the same cases.

The catalogue is data, one short builder per case, hence the module's length. Shared tiny
artefacts (a synthetic dataset, a store with a saved partition, a 2-step run) are built once by
`build_shared` through the CLI itself; cases that corrupt them work on copies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner, Result
from PIL import Image


def _argv(text: str) -> list[str]:
    return text.split()


TEACHER = "dinov2_vitb14"
LEVEL = "s1.00"
# Extraction of the shared store: 3 tiles of 64 px, 2 per shard (shard 0 = tiles 0-1).
EXTRACT = _argv(
    f"--teacher {TEACHER} --tiny --tile-size 64 --base-size 70 --tiles-per-shard 2 "
    "--batch-size 4 --scales 1 --no-flip -q"
)


@dataclass(frozen=True)
class Shared:
    """Tiny artefacts built once and only read by cases (copy them before corrupting)."""

    root: Path
    data: Path  # synthetic images/ + masks/ + classes.txt (3 scenes of 64 px)
    store: Path  # extracted with EXTRACT; partition 'default' = 1 labeled, 1 unlabeled, 1 val
    run: Path  # `train` for 2 iterations on the store (best.pt, latest.pt, config.yaml)


@dataclass(frozen=True)
class Env:
    """The case's own folder (snapshotted) and the shared artefacts."""

    tmp: Path
    shared: Shared

    def copy(self, src: Path, name: str | None = None) -> Path:
        """A copy of a shared file or folder inside the case folder."""
        dst = self.tmp / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    def train(self, store: Path | None = None, out: Path | None = None) -> list[str]:
        """`train` on a store (default: the shared one) with the shared run's settings."""
        return [
            "train",
            "--store",
            str(store or self.shared.store),
            *TRAIN,
            "--out",
            str(out or self.tmp / "run"),
        ]


TRAIN = _argv(
    "--tiny --crop 70 --iters 2 --batch 1+1 --device cpu --workers 0 --no-progress "
    "--eval-interval 2 --log-interval 1"
)


@dataclass
class Setup:
    """What a case's builder returns: the command line and what to look for.

    Attributes:
        argv: Arguments after `featcache`.
        names: Strings of which one must appear in the output: the file or the option at fault.
        expected: Paths (relative to the case folder) that the command may create or change.
        forbid: Strings that must not appear in the output (a wrong hint).
        check: Extra condition after the run; returns a problem or None.
        patch: Context manager wrapped around the run (fault injection).
    """

    argv: list[str]
    names: tuple[str, ...]
    expected: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    check: Callable[[], str | None] | None = None
    patch: Callable[[], contextlib.AbstractContextManager[Any]] | None = None


@dataclass(frozen=True)
class Case:
    """One kind of bad input.

    Attributes:
        kind: Short unique id (the test id and the table's first column).
        command: The featcache command it exercises.
        build: Builds the input in `Env.tmp` and returns the `Setup`.
        fix: Keywords of which one must appear (case-insensitive): the message says a fix.
            Empty: no fix is asked for (a success that must only report something).
        error: The command must fail (exit code != 0); False: it must succeed.
        skip: Returns a reason to skip on this machine, or None.
    """

    kind: str
    command: str
    build: Callable[[Env], Setup]
    fix: tuple[str, ...]
    error: bool = True
    skip: Callable[[], str | None] | None = None


@dataclass
class Verdict:
    """How a case came out."""

    kind: str
    exit_code: int
    message: str
    output: str
    crashed: bool  # a Python exception escaped (traceback) or the exit code was wrong
    names: bool
    fix: bool | None  # None: not asked for
    clean: bool
    problems: list[str] = field(default_factory=list)

    @property
    def clear(self) -> bool:
        """All four checks hold."""
        return not self.problems


# ---------------------------------------------------------------- shared artefacts


def invoke(argv: list[str]) -> Result:
    """Run `featcache ARGV` in-process."""
    from featcache.cli import main

    return CliRunner().invoke(main, [str(a) for a in argv])


def _ok(argv: list[str]) -> None:
    result = invoke(argv)
    if result.exit_code != 0:
        raise RuntimeError(f"featcache {' '.join(map(str, argv))} failed:\n{result.output}")


def build_shared(root: Path) -> Shared:
    """Dataset, store (with partition) and run, made through the CLI as a user would."""
    data, store, run = root / "data", root / "s.zarr", root / "run"
    _ok(["synth", data, "--n-images", "3", "--size", "64", "--seed", "1"])
    _ok(["extract", data, store, *EXTRACT])
    _ok(["splits", store, "--labeled", "1", "--val", "1", "--seed", "0"])
    _ok(["train", "--store", store, *TRAIN, "--out", run])
    return Shared(root, data, store, run)


# ---------------------------------------------------------------- judging


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ROOT: a digest for files, 'dir' for folders."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _changed(before: dict[str, str], after: dict[str, str], expected: tuple[str, ...]) -> list[str]:
    def allowed(rel: str) -> bool:
        return any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in expected)

    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k) and not allowed(k))


def _message(result: Result, logs: str = "") -> str:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = result.exception
        return f"TRACEBACK {type(exc).__name__}: {str(exc).strip().splitlines()[:1]}"
    # the logged warnings (LOGS) after the output: what a user reads on stderr
    lines = [ln.strip() for ln in (result.output + logs).splitlines() if ln.strip()]
    for prefix in ("Error", "PROBLEM", "warning"):
        for line in lines:
            if line.startswith(prefix):
                return line
    return result.output.strip().splitlines()[-1] if result.output.strip() else ""


def _reports(case: Case, result: Result, logs: str) -> bool:
    """A success case that succeeded and warned of nothing: its table cell is what it reports."""
    return not case.error and result.exit_code == 0 and "warning" not in _message(result, logs)


def _success_line(setup: Setup, out: str) -> str:
    """The first output line holding what a success case is checked for (its ``names``)."""
    for line in out.splitlines():
        if any(n.lower() in line.lower() for n in setup.names):
            return line.strip()
    return out.strip().splitlines()[-1] if out.strip() else ""


def judge(case: Case, setup: Setup, result: Result, changed: list[str], logs: str = "") -> Verdict:
    """The four checks of the catalogue on one run (LOGS: its warnings logged, as text)."""
    out = result.output + logs
    raw = result.exception is not None and not isinstance(result.exception, SystemExit)
    wrong_exit = (result.exit_code == 0) if case.error else (result.exit_code != 0)
    crashed = raw or "Traceback (most recent call last)" in out
    low = out.lower()
    names = any(n.lower() in low for n in setup.names)
    # The fix must be in the prose: paths (which may contain a keyword, e.g. `.pth`) are cut.
    prose = low
    for arg in sorted((a for a in setup.argv if "/" in a), key=len, reverse=True):
        prose = prose.replace(arg.lower(), "")
    fix = any(f.lower() in prose for f in case.fix) if case.fix else None
    problems = []
    if crashed:
        problems.append(f"traceback: {_message(result)}")
    if wrong_exit:
        problems.append(f"exit code {result.exit_code}")
    if not names:
        problems.append(f"names none of {list(setup.names)}")
    if fix is False:
        problems.append(f"says no fix (none of {list(case.fix)})")
    problems += [f"says {f!r}" for f in setup.forbid if f in out]
    if changed:
        problems.append(f"left behind/changed: {changed[:4]}")
    extra = setup.check() if setup.check else None
    if extra:
        problems.append(extra)
    return Verdict(
        kind=case.kind,
        exit_code=result.exit_code,
        message=_success_line(setup, out)
        if _reports(case, result, logs)
        else _message(result, logs),
        output=out,
        crashed=crashed or wrong_exit,
        names=names,
        fix=fix,
        clean=not changed and not extra,
        problems=problems,
    )


def run_case(case: Case, tmp: Path, shared: Shared) -> Verdict:
    """Build CASE in TMP, run it with TMP as the working folder, and judge it."""
    tmp.mkdir(parents=True, exist_ok=True)
    setup = case.build(Env(tmp, shared))
    before, before_shared = snapshot(tmp), snapshot(shared.root)
    cwd = os.getcwd()
    os.chdir(tmp)  # stray relative outputs land in the snapshot
    try:
        with setup.patch() if setup.patch else contextlib.nullcontext(), _logged() as logs:
            result = invoke(setup.argv)
    finally:
        os.chdir(cwd)
    changed = _changed(before, snapshot(tmp), setup.expected)
    changed += [f"shared/{k}" for k in _changed(before_shared, snapshot(shared.root), ())]
    return judge(case, setup, result, changed, "".join(logs))


@contextlib.contextmanager
def _logged() -> Iterator[list[str]]:
    """Warnings logged during the run, as lines: a user reads them on stderr, but a handler
    bound to the real stderr before CliRunner swapped it (or pytest's capture) hides them from
    `Result.output`."""
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname.lower()}: {record.getMessage()}\n")

    handler = _Collect(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


# ---------------------------------------------------------------- input builders


def _file_names(path: Path) -> tuple[str, ...]:
    """Ways a message may name a file: its path, or folder/name."""
    return (str(path), f"{path.parent.name}/{path.name}")


def _data(env: Env) -> Path:
    return env.copy(env.shared.data, "data")


def _extract(env: Env, data: Path, *extra: str, store: str = "out.zarr") -> list[str]:
    return ["extract", str(data), str(env.tmp / store), *EXTRACT, *extra]


def _write_png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _flip(path: Path, offset: int = 64, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


def _garble_jpeg(src: Path, dst: Path) -> Path:
    """A JPEG whose entropy-coded data is overwritten with noise (markers kept intact)."""
    Image.open(src).convert("RGB").save(dst, quality=95)
    data = bytearray(dst.read_bytes())
    start = data.index(b"\xff\xda") + 40  # past the start-of-scan header
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 0xFE, size=len(data) - start - 2 - 40, dtype=np.uint8)
    data[start : start + len(noise)] = noise.tobytes()
    dst.write_bytes(bytes(data))
    return dst


def _level(store: Path, name: str = LEVEL) -> Path:
    return store / "teachers" / TEACHER / name


def _chunks(array: Path) -> list[Path]:
    """The chunk / shard files of a zarr array folder."""
    return sorted(p for p in (array / "c").rglob("*") if p.is_file())


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2))


def _header(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["attributes"]["featstore"]


def _edit_header(store: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    _edit_json(store / "zarr.json", lambda d: edit(_header(d)))


def _store(env: Env) -> Path:
    return env.copy(env.shared.store)


def _run_copy(env: Env) -> Path:
    return env.copy(env.shared.run)


def _ckpt(env: Env, edit: Callable[[dict[str, Any]], None], name: str = "edited.pt") -> Path:
    import torch

    ckpt = torch.load(env.shared.run / "latest.pt", map_location="cpu", weights_only=False)
    edit(ckpt)
    path = env.tmp / name
    torch.save(ckpt, path)
    return path


def _text_file(env: Env, name: str, text: str = "not what you think\n") -> Path:
    path = env.tmp / name
    path.write_text(text)
    return path


def _yaml(env: Env, extra: str, name: str = "cfg.yaml") -> Path:
    """A train config over the shared store; EXTRA is appended (sections may repeat keys)."""
    body = (
        f"mode: cached\ncrop_size: 70\ndata:\n  store: {env.shared.store}\n"
        "  num_workers: 0\nmodel:\n  tiny: true\n"
        "schedule:\n  iters: 1\n  batch_labeled: 1\n  batch_unlabeled: 1\n"
        f"runtime:\n  out_dir: {env.tmp / 'run'}\n  device: cpu\n  progress: false\n"
        f"{extra}"
    )
    path = env.tmp / name
    path.write_text(body)
    return path


def _torchscript(path: Path) -> Path:
    import torch

    with warnings.catch_warnings():  # torch deprecates TorchScript; users still have such files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


def _no_cuda() -> str | None:
    import torch

    return "a GPU is present: --device cuda is valid here" if torch.cuda.is_available() else None


@contextlib.contextmanager
def _disk_full() -> Iterator[None]:
    """Every zarr chunk write fails with ENOSPC (metadata writes pass: the store gets created)."""
    import zarr.storage._local as local

    original = local._put

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        if "/c/" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, value, exclusive)

    local._put = put
    try:
        yield
    finally:
        local._put = original


def _deleting_reads(victim: Path) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The source image VICTIM disappears after being listed, before its pixels are read."""

    @contextlib.contextmanager
    def patch() -> Iterator[None]:
        from pipelines.sources import imageio

        original = imageio._decode_pil

        def decode(path_str: str, *args: Any, **kwargs: Any) -> Any:
            if Path(path_str) == victim and victim.exists():
                victim.unlink()
            return original(path_str, *args, **kwargs)

        imageio._decode_pil = decode
        try:
            yield
        finally:
            imageio._decode_pil = original

    return patch


@contextlib.contextmanager
def _fast_connect() -> Iterator[None]:
    """An unreachable scheduler is given up after 2 s instead of 30 s (keeps the test short)."""
    import dask
    import distributed  # noqa: F401  (its defaults must be in the config that set() restores)

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        yield


def _gone(path: Path) -> Callable[[], str | None]:
    return lambda: f"{path.name} still there" if path.exists() else None


# ---------------------------------------------------------------- the cases: synth, extract


def _c_synth_zero(env: Env) -> Setup:
    return Setup(["synth", str(env.tmp / "d"), "--n-images", "0"], ("--n-images",))


def _c_synth_size(env: Env) -> Setup:
    return Setup(["synth", str(env.tmp / "d"), "--size", "-5"], ("--size",))


def _c_synth_out_file(env: Env) -> Setup:
    f = _text_file(env, "taken")
    return Setup(["synth", str(f)], _file_names(f))


def _c_missing_source(env: Env) -> Setup:
    src = env.tmp / "nowhere"
    return Setup(_extract(env, src), _file_names(src))


def _c_empty_source(env: Env) -> Setup:
    src = env.tmp / "empty"
    src.mkdir()
    return Setup(_extract(env, src), _file_names(src))


def _c_source_is_file(env: Env) -> Setup:
    f = _text_file(env, "img.txt")
    return Setup(_extract(env, f), _file_names(f))


def _c_wrong_layout(env: Env) -> Setup:
    data = _data(env)
    return Setup(_extract(env, data, "--layout", "loveda"), ("--layout", *_file_names(data)))


def _c_no_masks(env: Env) -> Setup:
    data = _data(env)
    shutil.rmtree(data / "masks")
    return Setup(_extract(env, data), ("unlabel",), expected=("out.zarr",))


def _c_masks_match_nothing(env: Env) -> Setup:
    data = _data(env)
    for m in (data / "masks").iterdir():
        m.rename(m.with_name("x_" + m.name))
    return Setup(_extract(env, data), ("unlabel", "match no image"), expected=("out.zarr",))


def _c_mask_values(env: Env) -> Setup:
    data = _data(env)
    m = data / "masks" / "001.png"
    arr = np.array(Image.open(m))
    arr[:8, :8] = 200  # no class 200 among 7 classes, and not the ignore value 255
    return Setup(_extract(env, data), _file_names(_write_png(m, arr)))


def _c_colour_mask(env: Env) -> Setup:
    data = _data(env)
    m = data / "masks" / "001.png"
    rgb = np.stack([np.array(Image.open(m)) * 30] * 3, axis=-1).astype(np.uint8)
    return Setup(_extract(env, data), _file_names(_write_png(m, rgb)))


def _c_mask_size(env: Env) -> Setup:
    data = _data(env)
    m = data / "masks" / "001.png"
    return Setup(_extract(env, data), _file_names(_write_png(m, np.zeros((32, 32), np.uint8))))


def _c_truncated_png(env: Env) -> Setup:
    data = _data(env)
    return Setup(_extract(env, data), _file_names(_truncate(data / "images" / "001.png")))


def _c_garbled_jpeg(env: Env) -> Setup:
    data = _data(env)
    png = data / "images" / "001.png"
    jpg = _garble_jpeg(png, png.with_suffix(".jpg"))
    png.unlink()
    return Setup(_extract(env, data), _file_names(jpg))


def _c_not_an_image(env: Env) -> Setup:
    data = _data(env)
    f = _text_file(env, "data/images/001.png", "a text file named like a PNG\n")
    return Setup(_extract(env, data), _file_names(f))


def _c_grayscale(env: Env) -> Setup:
    data = _data(env)
    img = data / "images" / "001.png"
    Image.open(img).convert("L").save(img)
    return Setup(_extract(env, data), _file_names(img), forbid=("--bands 1,2,3",))


def _opt(option: str, value: str) -> Callable[[Env], Setup]:
    """A bad value of one extract option: the message must name the option."""

    def build(env: Env) -> Setup:
        return Setup(_extract(env, env.shared.data, option, value), (option,))

    return build


def _c_weights_missing_file(env: Env) -> Setup:
    w = env.tmp / "nope.pth"
    return Setup(_extract(env, env.shared.data, "--weights", f"{TEACHER}={w}"), _file_names(w))


def _c_weights_garbage(env: Env) -> Setup:
    w = _text_file(env, "w.pth", "garbage, not a checkpoint\n" * 10)
    return Setup(_extract(env, env.shared.data, "--weights", f"{TEACHER}={w}"), _file_names(w))


def _c_weights_bad_safetensors(env: Env) -> Setup:
    w = env.tmp / "w.safetensors"
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 32)
    return Setup(_extract(env, env.shared.data, "--weights", f"{TEACHER}={w}"), _file_names(w))


def _c_weights_torchscript(env: Env) -> Setup:
    w = _torchscript(env.tmp / "scripted.pt")
    return Setup(_extract(env, env.shared.data, "--weights", f"{TEACHER}={w}"), _file_names(w))


def _c_weights_other_teacher(env: Env) -> Setup:
    w = _text_file(env, "w.pth")
    return Setup(
        _extract(env, env.shared.data, "--weights", f"clip_vitl14={w}"),
        ("--weights", "clip_vitl14"),
    )


def _c_unknown_teacher(env: Env) -> Setup:
    return Setup(_extract(env, env.shared.data, "--teacher", "dinov9"), ("dinov9",))


def _c_scheduler_unreachable(env: Env) -> Setup:
    return Setup(
        _extract(env, env.shared.data, "--scheduler", "tcp://127.0.0.1:9"),
        ("tcp://127.0.0.1:9", "--scheduler"),
        patch=_fast_connect,
    )


def _c_overwrite_user_folder(env: Env) -> Setup:
    folder = env.tmp / "my-thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("months of work\n")
    return Setup(
        _extract(env, env.shared.data, "--overwrite", store="my-thesis"), _file_names(folder)
    )


def _c_overwrite_source(env: Env) -> Setup:
    data = _data(env)
    return Setup(["extract", str(data), str(data), *EXTRACT, "--overwrite"], _file_names(data))


def _c_overwrite_parent_of_source(env: Env) -> Setup:
    data = _data(env)
    return Setup(
        ["extract", str(data), str(env.tmp), *EXTRACT, "--overwrite"],
        (str(env.tmp), *_file_names(data)),
    )


def _lock(store: Path, pid: int) -> Path:
    """A writer lock as `extract --help` documents it: featcache.lock naming its holder."""
    path = store / "featcache.lock"
    holder = {
        "owner": "someone",
        "pid": pid,
        "host": socket.gethostname(),
        "started": "2026-01-01T00:00:00+0000",
        "run_id": "other-run",
        "pid_start": None,
    }
    path.write_text(json.dumps(holder))
    return path


def _dead_pid() -> int:
    return 2**22 + 1  # above Linux's PID_MAX_LIMIT (2**22): never a live process


def _c_locked_store(env: Env) -> Setup:
    store = _store(env)
    _lock(store, os.getpid())  # this very process: alive
    argv = ["extract", str(env.shared.data), str(store), *EXTRACT]
    return Setup(argv, (str(store), "featcache.lock"))


def _c_stale_lock(env: Env) -> Setup:
    store = _store(env)
    lock = _lock(store, _dead_pid())
    argv = ["extract", str(env.shared.data), str(store), *EXTRACT]
    return Setup(argv, ("wrote",), expected=("s.zarr/featcache.lock",), check=_gone(lock))


def _c_store_under_file(env: Env) -> Setup:
    f = _text_file(env, "afile")
    return Setup(_extract(env, env.shared.data, store="afile/s.zarr"), _file_names(f))


def _c_fingerprint_mismatch(env: Env) -> Setup:
    store = _store(env)
    argv = ["extract", str(env.shared.data), str(store), *EXTRACT, "--scales", "1,0.5"]
    return Setup(argv, ("--overwrite",))


def _c_split_file_missing(env: Env) -> Setup:
    f = env.tmp / "split.txt"
    return Setup(_extract(env, env.shared.data, "--split-file", str(f)), _file_names(f))


def _c_split_file_bad_line(env: Env) -> Setup:
    f = _text_file(env, "split.txt", "images/404.png masks/404.png\n")
    return Setup(
        _extract(env, env.shared.data, "--split-file", str(f)), (*_file_names(f), "404.png")
    )


def _c_palette_missing(env: Env) -> Setup:
    f = env.tmp / "palette.txt"
    return Setup(_extract(env, env.shared.data, "--palette", str(f)), _file_names(f))


def _c_palette_malformed(env: Env) -> Setup:
    f = _text_file(env, "palette.txt", "background 0 0\nroad red green blue\n")
    return Setup(_extract(env, env.shared.data, "--palette", str(f)), _file_names(f))


def _c_disk_full(env: Env) -> Setup:
    return Setup(
        _extract(env, env.shared.data),
        ("no space", "disk", str(env.tmp / "out.zarr")),
        expected=("out.zarr",),
        patch=_disk_full,
    )


def _c_source_deleted_mid_run(env: Env) -> Setup:
    data = _data(env)
    victim = data / "images" / "001.png"
    return Setup(
        _extract(env, data),
        _file_names(victim),
        expected=("out.zarr", "data/images"),
        patch=_deleting_reads(victim),
    )


def _c_orphan_tmp(env: Env) -> Setup:
    orphan = env.tmp / "out.zarr.tmp-deadbeef"
    orphan.mkdir()
    (orphan / "zarr.json").write_text("{}")
    return Setup(
        _extract(env, env.shared.data),
        ("wrote",),
        expected=("out.zarr", orphan.name),  # its removal is the point
        check=_gone(orphan),
    )


# ---------------------------------------------------------------- info, verify, splits, bank, audit


def _c_info_missing(env: Env) -> Setup:
    p = env.tmp / "none.zarr"
    return Setup(["info", str(p)], _file_names(p))


def _c_info_not_a_store(env: Env) -> Setup:
    d = _data(env)
    return Setup(["info", str(d)], _file_names(d))


def _c_info_no_header(env: Env) -> Setup:
    store = _store(env)
    (store / "zarr.json").unlink()
    return Setup(["info", str(store)], _file_names(store))


def _verify(edit: Callable[[Path], tuple[str, ...]]) -> Callable[[Env], Setup]:
    """`verify` on a copy of the store damaged by EDIT (which returns what must be named)."""

    def build(env: Env) -> Setup:
        store = _store(env)
        return Setup(["verify", str(store)], edit(store))

    return build


def _v_deleted_shard(store: Path) -> tuple[str, ...]:
    _chunks(_level(store))[0].unlink()
    return ("tiles 0..1", "shard")


def _v_flipped(store: Path) -> tuple[str, ...]:
    _flip(_chunks(_level(store))[0])
    return (f"teachers/{TEACHER}/{LEVEL} tile 0",)


def _v_stats(store: Path) -> tuple[str, ...]:
    def edit(h: dict[str, Any]) -> None:
        h["stats"][TEACHER][LEVEL]["mean"][0] += 1.0

    _edit_header(store, edit)
    return ("stats",)


def _v_dtype(store: Path) -> tuple[str, ...]:
    _edit_json(_level(store) / "zarr.json", lambda d: d.update(data_type="int16"))
    return ("data_type", "dtype", "int16")


def _v_fill(store: Path) -> tuple[str, ...]:
    _edit_json(_level(store) / "zarr.json", lambda d: d.update(fill_value=1.0))
    return ("fill_value", "fill value")


def _v_teacher_attrs(store: Path) -> tuple[str, ...]:
    def edit(d: dict[str, Any]) -> None:
        d["attributes"]["teacher"]["spec"]["stride"] = 16

    _edit_json(store / "teachers" / TEACHER / "zarr.json", edit)
    return ("stride",)


def _v_shard_stats(store: Path) -> tuple[str, ...]:
    _flip(_chunks(_level(store, f"{LEVEL}_stats"))[0], offset=0)
    return (f"{LEVEL}_stats", "_stats")


def _v_level_dir(store: Path) -> tuple[str, ...]:
    shutil.rmtree(_level(store))
    return (f"teachers/{TEACHER}/{LEVEL}", LEVEL)


def _v_tile_id(store: Path) -> tuple[str, ...]:
    for chunk in _chunks(store / "tiles" / "tile_id"):
        chunk.write_bytes(b"\x13" * max(8, chunk.stat().st_size))
    return ("tiles/tile_id", "tile_id")


def _v_class_names(store: Path) -> tuple[str, ...]:
    _edit_header(store, lambda h: h["schema"]["class_names"].__setitem__(1, "house"))
    return ("class_names", "class names")


def _v_weights_field(store: Path) -> tuple[str, ...]:
    def edit(h: dict[str, Any]) -> None:
        h["schema"]["teachers"][0]["spec"]["weights"] = "imagenet"

    _edit_header(store, edit)
    return ("weights",)


def _v_mixed_writers(store: Path) -> tuple[str, ...]:
    """Shard 0 (features, pixels, checksums) from another extraction: a second writer."""
    foreign = store.parent / "foreign"
    _ok(["synth", foreign / "data", "--n-images", "3", "--size", "64", "--seed", "2"])
    _ok(["extract", foreign / "data", foreign / "s.zarr", *EXTRACT])
    src = foreign / "s.zarr"
    for f in sorted(src.rglob("*")):
        parts = f.relative_to(src).parts
        # per-shard statistics stay: the header merges them, so they match the header
        stats = any(part.endswith("_stats") for part in parts)
        if (
            f.is_file()
            and "c" in parts
            and parts[0] in ("teachers", "checksum", "pixels")
            and not stats
        ):
            i = parts.index("c")
            if len(parts) > i + 1 and parts[i + 1] == "0":
                shutil.copy2(f, store / f.relative_to(src))
    shutil.rmtree(foreign)
    return (f"teachers/{TEACHER}/{LEVEL}", "tiles 0..1", "shard 0", "tile 0")


def _c_splits_bad_labeled(env: Env) -> Setup:
    return Setup(["splits", str(_store(env)), "--labeled", "lots"], ("--labeled",))


def _c_splits_val_too_big(env: Env) -> Setup:
    return Setup(["splits", str(_store(env)), "--labeled", "1", "--val", "2.5"], ("--val",))


def _c_splits_exists(env: Env) -> Setup:
    return Setup(
        ["splits", str(_store(env)), "--labeled", "1", "--val", "1", "--seed", "3"],
        ("default", "--name"),
    )


def _c_splits_file_matches_nothing(env: Env) -> Setup:
    f = _text_file(env, "lab.txt", "images/404.png\n")
    return Setup(
        ["splits", str(_store(env)), "--labeled-file", str(f), "--name", "p"],
        (*_file_names(f), "--labeled-file"),
    )


def _c_splits_not_store(env: Env) -> Setup:
    d = _data(env)
    return Setup(["splits", str(d)], _file_names(d))


def _c_bank_k0(env: Env) -> Setup:
    return Setup(["bank", str(_store(env)), "--tiny", "--k", "0"], ("--k",))


def _c_bank_teacher(env: Env) -> Setup:
    return Setup(
        ["bank", str(_store(env)), "--tiny", "--teacher", "clip_vitl14"],
        ("clip_vitl14", "--teacher"),
    )


def _c_bank_not_store(env: Env) -> Setup:
    d = _data(env)
    return Setup(["bank", str(d), "--tiny"], _file_names(d))


def _audit(*extra: str) -> list[str]:
    return ["--teacher", TEACHER, "--tiny", "--views", "2", "--no-ceiling", "-q", *extra]


def _c_audit_teacher(env: Env) -> Setup:
    return Setup(
        ["audit", str(_store(env)), *_audit("--teacher", "clip_vitl14")],
        ("clip_vitl14", "--teacher"),
    )


def _c_audit_levels(env: Env) -> Setup:
    return Setup(["audit", str(_store(env)), *_audit("--levels", "nolabel")], ("--levels",))


def _c_audit_views(env: Env) -> Setup:
    return Setup(["audit", str(_store(env)), *_audit("--views", "0")], ("--views",))


# ---------------------------------------------------------------- train


def _c_train_no_store(env: Env) -> Setup:
    p = env.tmp / "none.zarr"
    return Setup(env.train(p), _file_names(p))


def _c_train_existing_run(env: Env) -> Setup:
    run = _run_copy(env)
    return Setup(env.train(out=run), (str(run), "--out"))


def _c_train_out_is_file(env: Env) -> Setup:
    f = _text_file(env, "run")
    return Setup(env.train(out=f), (*_file_names(f), "--out"))


def _resume_with(*change: str) -> Callable[[Env], Setup]:
    def build(env: Env) -> Setup:
        run = _run_copy(env)
        argv = [*env.train(out=run), "--resume", "auto", "--iters", "3", *change]
        return Setup(argv, (change[0],))

    return build


def _c_resume_corrupt(env: Env) -> Setup:
    run = _run_copy(env)
    _truncate(run / "latest.pt")
    return Setup(
        [*env.train(out=run), "--resume", "auto", "--iters", "3"], _file_names(run / "latest.pt")
    )


def _c_resume_not_ckpt(env: Env) -> Setup:
    f = _text_file(env, "notes.pt", "just text\n")
    return Setup([*env.train(), "--resume", str(f)], _file_names(f))


def _train_on(edit: Callable[[Path], tuple[str, ...]], *extra: str) -> Callable[[Env], Setup]:
    """`train` on a copy of the store damaged by EDIT (which returns what must be named)."""

    def build(env: Env) -> Setup:
        store = _store(env)
        return Setup([*env.train(store), *extra], edit(store))

    return build


def _t_deleted_shard(store: Path) -> tuple[str, ...]:
    _chunks(_level(store))[0].unlink()
    return ("tile 0", "tiles 0..1", "shard")


def _t_flipped(store: Path) -> tuple[str, ...]:
    for shard in _chunks(_level(store)):
        _flip(shard)
    return ("tile",)


def _t_truncated(store: Path) -> tuple[str, ...]:
    for shard in _chunks(_level(store)):
        _truncate(shard)
    return ("tile",)


def _t_zero_std(store: Path) -> tuple[str, ...]:
    def edit(h: dict[str, Any]) -> None:
        s = h["stats"][TEACHER][LEVEL]
        s["std"] = [0.0] * len(s["std"])

    _edit_header(store, edit)
    return ("std", "standard deviation", "statistics")


def _t_corrupt_mask(store: Path) -> tuple[str, ...]:
    for chunk in _chunks(store / "pixels" / "mask"):
        _flip(chunk, offset=16, n=64)
    return ("tile", "mask")


def _t_incomplete(store: Path) -> tuple[str, ...]:
    _chunks(store / "done")[-1].unlink()
    return (str(store), "incomplete")


def _c_skip_bad_tiles(env: Env) -> Setup:
    """Under --skip-bad-tiles a corrupt tile is left out, and the log names it.

    Four tiles (shard 1 = tiles 2-3): labeled 000, unlabeled 001 + 002, val 003; tile 2's
    features are flipped, so the run trains on the rest.
    """
    store = env.tmp / "four.zarr"
    _ok(["synth", env.tmp / "four", "--n-images", "4", "--size", "64", "--seed", "3"])
    _ok(["extract", env.tmp / "four", store, *EXTRACT])
    _flip(_chunks(_level(store))[-1])  # offset 64: inside tile 2, the shard's first chunk
    sets = {"lab": "images/000\n", "unl": "images/001\nimages/002\n", "val": "images/003\n"}
    for name, text in sets.items():
        _text_file(env, f"{name}.txt", text)
    argv = [
        "train",
        "--store",
        str(store),
        *TRAIN,
        "--out",
        str(env.tmp / "run"),
        "--labeled",
        str(env.tmp / "lab.txt"),
        "--unlabeled",
        str(env.tmp / "unl.txt"),
        "--val",
        str(env.tmp / "val.txt"),
        "--skip-bad-tiles",
    ]
    return Setup(argv, ("images/002",), expected=("run",))


def _c_train_no_labels(env: Env) -> Setup:
    data = _data(env)
    shutil.rmtree(data / "masks")
    store = env.tmp / "nolab.zarr"
    _ok(["extract", data, store, *EXTRACT])
    _ok(["splits", store, "--labeled", "1", "--val", "1"])
    return Setup(env.train(store), ("labeled", "label"))


def _train_opt(option: str, value: str) -> Callable[[Env], Setup]:
    def build(env: Env) -> Setup:
        return Setup([*env.train(), option, value], (option,))

    return build


def _c_yaml_unknown_key(env: Env) -> Setup:
    cfg = _yaml(env, "optim:\n  lrr: 0.1\n")
    return Setup(["train", "--config", str(cfg)], ("lrr",))


def _c_yaml_word_for_number(env: Env) -> Setup:
    cfg = _yaml(env, "optim:\n  lr: fast\n")
    return Setup(["train", "--config", str(cfg)], ("lr",))


def _c_yaml_lr_1e3(env: Env) -> Setup:
    cfg = _yaml(env, "optim:\n  lr: 1e-3\n")  # PyYAML reads 1e-3 as a string
    return Setup(["train", "--config", str(cfg)], ('"step": 1',), expected=("run",))


def _c_yaml_syntax(env: Env) -> Setup:
    cfg = _text_file(env, "cfg.yaml", "data:\n  store: [unclosed\n")
    return Setup(["train", "--config", str(cfg)], _file_names(cfg))


def _c_pretrained_unreadable(env: Env) -> Setup:
    f = _text_file(env, "backbone.pth", "garbage\n" * 10)
    argv = [*env.train(), "--pretrained", str(f)]
    argv.remove("--tiny")
    return Setup(argv, _file_names(f))


def _c_pretrained_bad_safetensors(env: Env) -> Setup:
    f = env.tmp / "backbone.safetensors"
    f.write_bytes(b"\xff" * 64)
    argv = [*env.train(), "--pretrained", str(f)]
    argv.remove("--tiny")
    return Setup(argv, _file_names(f))


# ---------------------------------------------------------------- evaluate, predict, export, demo


def _corrupt_ckpt(env: Env) -> Path:
    return _truncate(env.copy(env.shared.run / "latest.pt", "broken.pt"))


def _c_eval_corrupt(env: Env) -> Setup:
    p = _corrupt_ckpt(env)
    return Setup(["evaluate", str(p), "--store", str(env.shared.store)], _file_names(p))


def _c_eval_wrong_kind(env: Env) -> Setup:
    p = env.copy(env.shared.data / "images" / "000.png", "model.pt")
    return Setup(["evaluate", str(p), "--store", str(env.shared.store)], _file_names(p))


def _c_eval_no_data(env: Env) -> Setup:
    return Setup(["evaluate", str(env.shared.run / "latest.pt")], ("--store",))


def _c_eval_bad_split(env: Env) -> Setup:
    return Setup(
        [
            "evaluate",
            str(env.shared.run / "latest.pt"),
            "--store",
            str(env.shared.store),
            "--split",
            "nosuchsplit",
        ],
        ("--split", "nosuchsplit"),
    )


def _c_eval_unknown_student_key(env: Env) -> Setup:
    p = _ckpt(env, lambda c: c["student_config"].update(wings=2))
    return Setup(["evaluate", str(p), "--store", str(env.shared.store)], (*_file_names(p), "wings"))


def _c_eval_no_ema(env: Env) -> Setup:
    p = _ckpt(env, lambda c: c.pop("ema"))
    return Setup(["evaluate", str(p), "--store", str(env.shared.store)], (*_file_names(p), "ema"))


def _c_predict_missing_input(env: Env) -> Setup:
    p = env.tmp / "nothing.png"
    return Setup(
        ["predict", str(env.shared.run / "latest.pt"), str(p), "--out", str(env.tmp / "pred")],
        _file_names(p),
    )


def _c_predict_out_file(env: Env) -> Setup:
    f = _text_file(env, "pred")
    return Setup(
        [
            "predict",
            str(env.shared.run / "latest.pt"),
            str(env.shared.data / "images" / "000.png"),
            "--out",
            str(f),
        ],
        (*_file_names(f), "--out"),
    )


def _c_predict_corrupt_image(env: Env) -> Setup:
    img = _truncate(env.copy(env.shared.data / "images" / "000.png", "broken.png"))
    return Setup(
        ["predict", str(env.shared.run / "latest.pt"), str(img), "--out", str(env.tmp / "pred")],
        _file_names(img),
    )


def _c_predict_corrupt_ckpt(env: Env) -> Setup:
    p = _corrupt_ckpt(env)
    return Setup(
        ["predict", str(p), str(env.shared.data / "images"), "--out", str(env.tmp / "pred")],
        _file_names(p),
    )


def _c_export_corrupt(env: Env) -> Setup:
    p = _corrupt_ckpt(env)
    return Setup(["export", str(p), str(env.tmp / "m.safetensors")], _file_names(p))


def _c_export_torchscript(env: Env) -> Setup:
    p = _torchscript(env.tmp / "scripted.pt")
    return Setup(["export", str(p), str(env.tmp / "m.safetensors")], _file_names(p))


def _c_demo_empty_data(env: Env) -> Setup:
    d = env.tmp / "empty"
    d.mkdir()
    return Setup(["demo", "--data", str(d), "--out", str(env.tmp / "demo")], _file_names(d))


def _c_demo_out_file(env: Env) -> Setup:
    f = _text_file(env, "demo-out")
    return Setup(["demo", "--out", str(f), "--quick"], (*_file_names(f), "--out"))


def _c_info_counts_unlabelled(env: Env) -> Setup:
    data = _data(env)
    shutil.rmtree(data / "masks")
    store = env.tmp / "nolab.zarr"
    _ok(["extract", data, store, *EXTRACT])
    return Setup(["info", str(store)], ("unlabel",))


def _unique_steps(metrics: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        steps = [ln.split(",")[0] for ln in metrics.read_text().splitlines()[1:] if ln]
        dup = sorted({s for s in steps if steps.count(s) > 1})
        return f"metrics.csv repeats step(s) {dup}" if dup else None

    return check


def _c_resume_duplicate_rows(env: Env) -> Setup:
    """A run killed after logging step 3 but before saving it: resuming redoes step 3."""
    run = _run_copy(env)
    metrics = run / "metrics.csv"
    last = metrics.read_text().splitlines()[-1].split(",")
    metrics.write_text(metrics.read_text() + ",".join(["3", *last[1:]]) + "\n")
    argv = [*env.train(out=run), "--resume", "auto", "--iters", "3"]
    return Setup(argv, ('"step": 3',), expected=("run",), check=_unique_steps(metrics))


def _c_resume_missing(env: Env) -> Setup:
    p = env.tmp / "gone.pt"
    return Setup([*env.train(), "--resume", str(p)], _file_names(p))


def _c_config_missing(env: Env) -> Setup:
    p = env.tmp / "nope.yaml"
    return Setup(["train", "--config", str(p)], _file_names(p))


def _c_view_bank_without_bank(env: Env) -> Setup:
    return Setup([*env.train(), "--target-mode", "view_bank"], ("view_bank", "--target-mode"))


def _c_export_out_dir(env: Env) -> Setup:
    d = env.tmp / "models"
    d.mkdir()
    return Setup(["export", str(env.shared.run / "latest.pt"), str(d)], (*_file_names(d), "OUT"))


def _c_eval_missing_ckpt(env: Env) -> Setup:
    p = env.tmp / "best.pt"
    return Setup(["evaluate", str(p), "--store", str(env.shared.store)], _file_names(p))


def _c_predict_cuda(env: Env) -> Setup:
    return Setup(
        [
            "predict",
            str(env.shared.run / "latest.pt"),
            str(env.shared.data / "images" / "000.png"),
            "--out",
            str(env.tmp / "pred"),
            "--device",
            "cuda",
        ],
        ("--device",),
    )


def _c_weights_dir(env: Env) -> Setup:
    d = env.tmp / "weights"
    d.mkdir()
    argv = _extract(env, env.shared.data, "--weights", f"{TEACHER}={d}")
    return Setup(argv, _file_names(d), forbid=("does not exist",))  # it does: as a folder


def _c_partition_unknown(env: Env) -> Setup:
    return Setup([*env.train(), "--partition", "nosuch"], ("--partition", "partition 'nosuch'"))


def _c_train_source_missing(env: Env) -> Setup:
    src = env.tmp / "nowhere"
    argv = [
        "train",
        "--source",
        str(src),
        "--mode",
        "online",
        "--no-distill",
        *TRAIN,
        "--out",
        str(env.tmp / "r"),
    ]
    return Setup(argv, _file_names(src))


def _c_demo_threads(env: Env) -> Setup:
    return Setup(["demo", "--out", str(env.tmp / "d"), "--threads", "0"], ("--threads",))


# ---------------------------------------------------------------- issue 15: the missing kinds


def _geotiff(path: Path, arr: np.ndarray, nodata: float | None = None) -> Path:
    """ARR [H, W, bands] as a plain GeoTIFF (any dtype), NODATA declared when given."""
    import rasterio

    profile = {
        "driver": "GTiff",
        "height": arr.shape[0],
        "width": arr.shape[1],
        "count": arr.shape[2],
        "dtype": arr.dtype.name,
        "nodata": nodata,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(np.moveaxis(arr, -1, 0))
    return path


def _tif_data(env: Env, image: np.ndarray, nodata: float | None = None) -> tuple[Path, Path]:
    """The shared dataset with scene 001 replaced by IMAGE as a GeoTIFF; (data, tif)."""
    data = _data(env)
    (data / "images" / "001.png").unlink()
    return data, _geotiff(data / "images" / "001.tif", image, nodata)


def _c_16bit_tiff(env: Env) -> Setup:
    rgb = np.asarray(Image.open(env.shared.data / "images" / "001.png"), np.uint16) * 257
    data, tif = _tif_data(env, rgb)
    return Setup(_extract(env, data), _file_names(tif))


def _c_16bit_png(env: Env) -> Setup:
    data = _data(env)
    img = data / "images" / "001.png"
    grey = np.asarray(Image.open(img).convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(img)  # mode I;16
    return Setup(_extract(env, data), _file_names(img))


def _c_nodata(env: Env) -> Setup:
    rgb = np.asarray(Image.open(env.shared.data / "images" / "001.png"), np.uint8).copy()
    rgb[:16] = 0  # a strip outside the scene's footprint, as nodata
    data, tif = _tif_data(env, rgb, nodata=0)
    return Setup(_extract(env, data), _file_names(tif), expected=("out.zarr",))


def _c_two_bands(env: Env) -> Setup:
    data = _data(env)
    img = data / "images" / "001.png"
    Image.open(img).convert("LA").save(img)
    return Setup(_extract(env, data), _file_names(img))


def _c_five_band_tiff(env: Env) -> Setup:
    rgb = np.asarray(Image.open(env.shared.data / "images" / "001.png"), np.uint8)
    data, tif = _tif_data(env, np.concatenate([rgb, rgb[..., :2]], axis=-1))
    return Setup(_extract(env, data), (*_file_names(tif), "--bands"))


def _resized(env: Env, size: tuple[int, int]) -> Path:
    """The shared dataset with every scene (image and mask) resized to SIZE (w, h)."""
    data = _data(env)
    for sub, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
        for f in sorted((data / sub).iterdir()):
            Image.open(f).resize(size, resample).save(f)
    return data


def _c_scenes_smaller_than_tile(env: Env) -> Setup:
    """The generic layout pads (DWL's rule): allowed, but said, with the tile size that fits."""
    data = _resized(env, (40, 40))
    return Setup(_extract(env, data), ("--tile-size 64",), expected=("out.zarr",))


def _c_non_square_scenes(env: Env) -> Setup:
    """96x64 px scenes, 64 px tiles, pad rule: ceil(96/64) * ceil(64/64) = 2 tiles per scene,
    the second half padding; 3 scenes -> 6 labeled tiles at columns 0 and 64."""
    data = _resized(env, (96, 64))
    return Setup(
        _extract(env, data),
        ("6 labeled tiles",),
        expected=("out.zarr",),
        check=_windows(env.tmp / "out.zarr", {(0, 0, 64, 64), (0, 64, 64, 64)}, 6),
    )


def _windows(store: Path, want: set[tuple[int, ...]], n: int) -> Callable[[], str | None]:
    def check() -> str | None:
        from featstore import open_store

        tiles = open_store(str(store)).tiles
        got = {tuple(t.window) for t in tiles}
        return None if len(tiles) == n and got == want else f"tiles {len(tiles)}, windows {got}"

    return check


def _c_tiles_smaller_than_crop(env: Env) -> Setup:
    """64 px tiles, --crop 518: the largest zoom (2 x 64 = 128 px) leaves >= 93 % padding."""
    argv = [*env.train(), "--crop", "518", "--iters", "1"]
    return Setup(argv, ("--crop 518",), expected=("run",))


def _c_overlapping_splits(env: Env) -> Setup:
    ids = [ln.split()[0] for ln in _store_ids(env.shared.store)]
    lab = _text_file(env, "lab.txt", f"{ids[0]}\n{ids[1]}\n")
    val = _text_file(env, "val.txt", f"{ids[1]}\n{ids[2]}\n")
    argv = [*env.train(), "--labeled", str(lab), "--val", str(val)]
    return Setup(argv, (ids[1], "--val"))


def _store_ids(store: Path) -> list[str]:
    from featstore import open_store

    return [t.tile_id for t in open_store(str(store)).tiles]


def _c_train_split_ids_nowhere(env: Env) -> Setup:
    lab = _text_file(env, "lab.txt", "images/404\nimages/405\n")
    return Setup([*env.train(), "--labeled", str(lab)], (*_file_names(lab), "images/404"))


def _c_extract_yaml_syntax(env: Env) -> Setup:
    cfg = _text_file(env, "extract.yaml", "scales: [1, 2\ncodec: fp16\n")
    return Setup([*_extract(env, env.shared.data), "--config", str(cfg)], _file_names(cfg))


def _c_extract_yaml_unknown_key(env: Env) -> Setup:
    cfg = _text_file(env, "extract.yaml", "scalez: [1]\n")
    return Setup([*_extract(env, env.shared.data), "--config", str(cfg)], ("scalez",))


def _c_train_yaml_not_mapping(env: Env) -> Setup:
    cfg = _text_file(env, "cfg.yaml", "- lr: 0.1\n- iters: 3\n")
    return Setup(["train", "--config", str(cfg)], _file_names(cfg))


def _random_bytes(env: Env, name: str, n: int = 4096) -> Path:
    path = env.tmp / name
    path.write_bytes(np.random.default_rng(15).bytes(n))
    return path


def _c_weights_random_bytes(env: Env) -> Setup:
    w = _random_bytes(env, "w.pth")
    return Setup(_extract(env, env.shared.data, "--weights", f"{TEACHER}={w}"), _file_names(w))


def _c_weights_random_bytes_safetensors(env: Env) -> Setup:
    w = _random_bytes(env, "w.safetensors")
    return Setup(_extract(env, env.shared.data, "--weights", f"{TEACHER}={w}"), _file_names(w))


def _c_eval_random_bytes(env: Env) -> Setup:
    p = _random_bytes(env, "model.pt")
    return Setup(["evaluate", str(p), "--store", str(env.shared.store)], _file_names(p))


def _c_resume_random_bytes(env: Env) -> Setup:
    run = _run_copy(env)
    (run / "latest.pt").write_bytes(np.random.default_rng(15).bytes(4096))
    return Setup(
        [*env.train(out=run), "--resume", "auto", "--iters", "3"], _file_names(run / "latest.pt")
    )


def _c_eval_use_unknown(env: Env) -> Setup:
    latest = env.shared.run / "latest.pt"
    return Setup(["evaluate", str(latest), "--store", str(env.shared.store), "--use", "best"],
                 ("--use",))  # fmt: skip


def _as_root() -> str | None:
    if os.geteuid() == 0:
        return "running as root: permissions do not stop root, a read-only folder is writable"
    return None


def _read_only(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    return folder


def _c_extract_read_only(env: Env) -> Setup:
    parent = _read_only(env.tmp / "ro")
    return Setup(_extract(env, env.shared.data, store="ro/out.zarr"), _file_names(parent))


def _c_train_read_only(env: Env) -> Setup:
    parent = _read_only(env.tmp / "ro")
    return Setup(env.train(out=parent / "run"), (*_file_names(parent), "--out"))


def _c_unicode_spaces(env: Env) -> Setup:
    data = env.copy(env.shared.data, "dätä mit Leerzeichen")
    store = "Ausgabe ünïcode ✓.zarr"
    argv = ["extract", str(data), str(env.tmp / store), *EXTRACT]
    return Setup(argv, (store,), expected=(store,), check=_is_store(store, env))


def _c_relative_paths(env: Env) -> Setup:
    """Relative paths, run from the case folder (not the repository): resolved against it."""
    env.copy(env.shared.data, "data")
    argv = ["extract", "data", "rel.zarr", *EXTRACT]
    return Setup(argv, ("rel.zarr",), expected=("rel.zarr",), check=_is_store("rel.zarr", env))


def _is_store(name: str, env: Env) -> Callable[[], str | None]:
    def check() -> str | None:
        from featstore import verify_store

        problems = verify_store(str(env.tmp / name))
        return f"{name}: {problems[:2]}" if problems else None

    return check


def _c_train_relative_paths(env: Env) -> Setup:
    env.copy(env.shared.store, "s.zarr")
    argv = ["train", "--store", "s.zarr", *TRAIN, "--out", "run"]
    return Setup(argv, ('"step": 2',), expected=("run", "s.zarr"))


def _other_classes(ckpt: dict[str, Any], n: int = 3) -> None:
    """A consistent checkpoint of an N-class student: the head's class rows cut to N."""
    ckpt["student_config"]["num_classes"] = n
    ckpt["config"]["model"]["num_classes"] = n
    for weights in ("student", "ema"):
        for key in ("head.output_conv.2.weight", "head.output_conv.2.bias"):
            ckpt[weights][key] = ckpt[weights][key][:n].clone()


def _other_size(ckpt: dict[str, Any]) -> None:
    """A checkpoint of another student size: features 16 recorded as 8 (weights unchanged)."""
    ckpt["student_config"]["features"] = 8


def _c_resume_other_classes(env: Env) -> Setup:
    p = _ckpt(env, _other_classes)
    return Setup([*env.train(), "--resume", str(p)], (*_file_names(p), "num_classes"))


def _c_resume_other_size(env: Env) -> Setup:
    p = _ckpt(env, _other_size)
    return Setup([*env.train(), "--resume", str(p)], (*_file_names(p), "features"))


def _c_eval_other_classes(env: Env) -> Setup:
    p = _ckpt(env, _other_classes)
    argv = ["evaluate", str(p), "--store", str(env.shared.store)]
    return Setup(argv, (*_file_names(p), "class"))


def _c_eval_other_size(env: Env) -> Setup:
    p = _ckpt(env, _other_size)
    return Setup(["evaluate", str(p), "--store", str(env.shared.store)], _file_names(p))


# ---------------------------------------------------------------- the catalogue

_OVERWRITE = ("refus", "not a featcache store", "--overwrite")
# Fix keywords shared by several cases: diagnoses ("corrupt", "truncated") do not count as fixes.
_LAYOUTFIX = ("--layout", "--split-file")
_FILEFIX = ("download", "replace", "remove", "restore", "again")
_CKPTFIX = (
    "best.pt",
    "latest.pt",
    "re-run",
    "replace",
    "re-export",
    "featcache export",
    "new --out",
)
# A missing path: saying that it does not exist is the fix (give one that does).
_PATHFIX = (
    "check the path",
    "give ",
    "pass ",
    "create",
    "does not exist",
    "no such file",
    "not found",
)

# fmt: off
CASES: list[Case] = [
    Case("synth-zero-images", "synth", _c_synth_zero, (">= 1", "x>=1", "at least", "positive")),
    Case("synth-negative-size", "synth", _c_synth_size, ("x>=32", "at least", "positive")),
    Case("synth-out-is-file", "synth", _c_synth_out_file, ("folder", "directory", "another")),
    Case("extract-missing-source", "extract", _c_missing_source, _PATHFIX),
    Case("extract-empty-source", "extract", _c_empty_source, _LAYOUTFIX),
    Case("extract-source-is-file", "extract", _c_source_is_file, _LAYOUTFIX),
    Case("extract-wrong-layout", "extract", _c_wrong_layout, ("--layout", "check the path")),
    Case("extract-no-masks", "extract", _c_no_masks, (), error=False),
    Case("extract-masks-match-no-image", "extract", _c_masks_match_nothing, ("mask",), error=False),
    Case("extract-mask-value-out-of-range", "extract", _c_mask_values,
         ("--ignore-index", "--classes", "--reduce-zero-label")),
    Case("extract-colour-mask", "extract", _c_colour_mask, ("--palette",)),
    Case("extract-mask-size-mismatch", "extract", _c_mask_size, ("same size", "resize", "must")),
    Case("extract-truncated-png", "extract", _c_truncated_png, _FILEFIX),
    Case("extract-garbled-jpeg", "extract", _c_garbled_jpeg, _FILEFIX),
    Case("extract-not-an-image", "extract", _c_not_an_image, ("replace", "remove", "not an image")),
    Case("extract-grayscale-image", "extract", _c_grayscale, ("--bands", "rgb", "convert")),
    Case("extract-tile-size-zero", "extract", _opt("--tile-size", "0"), ("positive", ">=", ">")),
    Case("extract-tile-size-negative", "extract", _opt("--tile-size", "-64"),
         ("positive", ">=", ">")),
    Case("extract-base-size-zero", "extract", _opt("--base-size", "0"),
         ("positive", ">=", "multiple")),
    Case("extract-scales-not-numbers", "extract", _opt("--scales", "1,x"), ("e.g.", "write")),
    Case("extract-scales-negative", "extract", _opt("--scales", "1,-2"),
         ("positive", "must be in", "e.g.")),
    Case("extract-codec-unknown", "extract", _opt("--codec", "zstd"), ("fp16",)),
    Case("extract-codec-pca-zero", "extract", _opt("--codec", "pca:0"), ("pca:K", ">=", "e.g.")),
    Case("extract-batch-size-zero", "extract", _opt("--batch-size", "0"), (">=", "positive")),
    Case("extract-tiles-per-shard-zero", "extract", _opt("--tiles-per-shard", "0"),
         (">=", "positive")),
    Case("extract-limit-negative", "extract", _opt("--limit", "-3"), (">=", "positive")),
    Case("extract-threads-zero", "extract", _opt("--threads", "0"), (">=", "positive")),
    Case("extract-bands-out-of-range", "extract", _opt("--bands", "5,6,7"), ("band", "e.g.")),
    Case("extract-bands-not-numbers", "extract", _opt("--bands", "r,g,b"), ("e.g.", "1-based")),
    Case("extract-weights-syntax", "extract", _opt("--weights", "nope"), ("NAME=PATH",)),
    Case("extract-weights-missing-file", "extract", _c_weights_missing_file, _PATHFIX),
    Case("extract-weights-garbage-file", "extract", _c_weights_garbage,
         ("state dict", "state_dict", "safetensors", ".pth")),
    Case("extract-weights-corrupt-safetensors", "extract", _c_weights_bad_safetensors, _FILEFIX),
    Case("extract-weights-torchscript", "extract", _c_weights_torchscript,
         ("state_dict", "state dict")),
    Case("extract-weights-other-teacher", "extract", _c_weights_other_teacher,
         ("--teacher", "NAME=")),
    Case("extract-unknown-teacher", "extract", _c_unknown_teacher, (TEACHER,)),
    Case("extract-device-cuda-no-gpu", "extract", _opt("--device", "cuda"),
         ("--device cpu",), skip=_no_cuda),
    Case("extract-scheduler-unknown", "extract", _opt("--scheduler", "mpi"), ("local", "tcp://")),
    Case("extract-scheduler-unreachable", "extract", _c_scheduler_unreachable,
         ("running", "--scheduler local", "start")),
    Case("extract-scheduler-negative-workers", "extract", _opt("--scheduler", "local:-1"),
         ("local:N", ">=", "positive")),
    Case("extract-overwrite-user-folder", "extract", _c_overwrite_user_folder, _OVERWRITE),
    Case("extract-overwrite-source", "extract", _c_overwrite_source, _OVERWRITE + ("source",)),
    Case("extract-overwrite-parent-of-source", "extract", _c_overwrite_parent_of_source,
         _OVERWRITE + ("source",)),
    Case("extract-store-under-a-file", "extract", _c_store_under_file,
         ("another", "folder", "directory")),
    Case("extract-store-locked-by-live-writer", "extract", _c_locked_store, ("--break-lock",)),
    Case("extract-stale-lock-of-dead-writer", "extract", _c_stale_lock, (), error=False),
    Case("extract-fingerprint-mismatch", "extract", _c_fingerprint_mismatch, ("--overwrite",)),
    Case("extract-split-file-missing", "extract", _c_split_file_missing, _PATHFIX),
    Case("extract-split-file-names-missing-image", "extract", _c_split_file_bad_line,
         ("check", "fix", "relative")),
    Case("extract-palette-missing", "extract", _c_palette_missing, _PATHFIX),
    Case("extract-palette-malformed", "extract", _c_palette_malformed, ("NAME R G B",)),
    Case("extract-disk-full", "extract", _c_disk_full, ("free", "space", "re-run")),
    Case("extract-source-deleted-mid-run", "extract", _c_source_deleted_mid_run,
         ("re-run", "restore", "resume", *_FILEFIX)),
    Case("extract-orphan-tmp-store", "extract", _c_orphan_tmp, (), error=False),
    Case("info-missing-store", "info", _c_info_missing, _PATHFIX),
    Case("info-not-a-store", "info", _c_info_not_a_store, ("featcache extract", "extract")),
    Case("info-store-header-deleted", "info", _c_info_no_header, ("extract", "--overwrite")),
    Case("verify-deleted-shard", "verify", _verify(_v_deleted_shard), ("re-run", "extract")),
    Case("verify-flipped-bytes", "verify", _verify(_v_flipped), ("re-run", "extract")),
    Case("verify-edited-stats", "verify", _verify(_v_stats), ("re-run", "extract")),
    Case("verify-dtype-int16", "verify", _verify(_v_dtype), ("re-run", "extract")),
    Case("verify-edited-fill-value", "verify", _verify(_v_fill), ("re-run", "extract")),
    Case("verify-edited-teacher-attrs", "verify", _verify(_v_teacher_attrs), ("re-run", "extract")),
    Case("verify-corrupt-shard-stats", "verify", _verify(_v_shard_stats), ("re-run", "extract")),
    Case("verify-deleted-level-dir", "verify", _verify(_v_level_dir), ("re-run", "extract")),
    Case("verify-corrupt-tile-id-chunk", "verify", _verify(_v_tile_id), ("re-run", "extract")),
    Case("verify-edited-class-names", "verify", _verify(_v_class_names), ("re-run", "extract")),
    Case("verify-edited-weights-field", "verify", _verify(_v_weights_field), ("re-run", "extract")),
    Case("verify-mixed-writers", "verify", _verify(_v_mixed_writers), ("re-run", "extract")),
    Case("splits-bad-labeled", "splits", _c_splits_bad_labeled, ("1/8", "e.g.")),
    Case("splits-val-too-big", "splits", _c_splits_val_too_big, ("1/8", "0.1", "e.g.", "fewer")),
    Case("splits-partition-exists", "splits", _c_splits_exists, ("--overwrite",)),
    Case("splits-file-matches-nothing", "splits", _c_splits_file_matches_nothing,
         ("tile id", "image", "check")),
    Case("splits-not-a-store", "splits", _c_splits_not_store, ("extract",)),
    Case("bank-k-zero", "bank", _c_bank_k0, (">=", "positive")),
    Case("bank-teacher-not-in-store", "bank", _c_bank_teacher, (TEACHER,)),
    Case("bank-not-a-store", "bank", _c_bank_not_store, ("extract",)),
    Case("audit-teacher-not-in-store", "audit", _c_audit_teacher, (TEACHER,)),
    Case("audit-levels-syntax", "audit", _c_audit_levels, ("LABEL=KEY",)),
    Case("audit-views-zero", "audit", _c_audit_views, (">=", "positive")),
    Case("train-missing-store", "train", _c_train_no_store, _PATHFIX + ("extract",)),
    Case("train-existing-run", "train", _c_train_existing_run, ("--resume auto",)),
    Case("train-out-is-file", "train", _c_train_out_is_file, ("folder", "directory", "--out")),
    Case("train-resume-other-lr", "train", _resume_with("--lr", "0.5"),
         ("--overwrite", "new --out", "drop")),
    Case("train-resume-other-batch", "train", _resume_with("--batch", "2+2"),
         ("--overwrite", "new --out", "drop")),
    Case("train-resume-other-seed", "train", _resume_with("--seed", "7"),
         ("--overwrite", "new --out", "drop")),
    Case("train-resume-corrupt-checkpoint", "train", _c_resume_corrupt, _CKPTFIX),
    Case("train-resume-not-a-checkpoint", "train", _c_resume_not_ckpt, _CKPTFIX),
    Case("train-deleted-shard", "train", _train_on(_t_deleted_shard),
         ("re-run", "featcache extract", "verify")),
    Case("train-flipped-feature-bytes", "train", _train_on(_t_flipped),
         ("re-run", "featcache extract", "verify", "skip")),
    Case("train-truncated-shard", "train", _train_on(_t_truncated),
         ("re-run", "featcache extract", "verify", "skip")),
    Case("train-dtype-int16", "train", _train_on(lambda s: _v_dtype(s)),
         ("re-run", "featcache extract", "verify")),
    Case("train-standardize-zero-std", "train", _train_on(_t_zero_std, "--standardize"),
         ("--no-standardize", "re-run", "verify")),
    Case("train-corrupt-mask", "train", _train_on(_t_corrupt_mask),
         ("re-run", "featcache extract", "verify", "skip")),
    Case("train-skip-bad-tiles-logs-the-tile", "train", _c_skip_bad_tiles, (), error=False),
    Case("train-incomplete-store", "train", _train_on(_t_incomplete), ("re-run", "resume")),
    Case("train-labeled-split-without-labels", "train", _c_train_no_labels,
         ("masks", "--labeled", "--no-distill")),
    Case("train-workers-negative", "train", _train_opt("--workers", "-1"), (">= 0", "0 or more")),
    Case("train-device-cuda-no-gpu", "train", _train_opt("--device", "cuda"),
         ("--device cpu", "auto"), skip=_no_cuda),
    Case("train-batch-syntax", "train", _train_opt("--batch", "a+b"), ("LABELED+UNLABELED",)),
    Case("train-batch-zero", "train", _train_opt("--batch", "0+2"), ("LABELED >= 1",)),
    Case("train-crop-not-multiple-of-14", "train", _train_opt("--crop", "64"), ("multiple of 14",)),
    Case("train-iters-zero", "train", _train_opt("--iters", "0"), (">= 1", "positive")),
    Case("train-lr-negative", "train", _train_opt("--lr", "-1"), ("> 0", "positive")),
    Case("train-unknown-split", "train", _train_opt("--labeled", "nosuch"), ("splits", "split")),
    Case("train-teacher-not-in-store", "train", _train_opt("--teacher", "clip_vitl14"), (TEACHER,)),
    Case("train-num-classes-mismatch", "train", _train_opt("--num-classes", "3"), ("7",)),
    Case("train-yaml-unknown-key", "train", _c_yaml_unknown_key, ("lr", "known", "allowed")),
    Case("train-yaml-word-for-number", "train", _c_yaml_word_for_number,
         ("number", "float", "e.g.")),
    Case("train-yaml-lr-1e-3", "train", _c_yaml_lr_1e3, (), error=False),
    Case("train-yaml-syntax-error", "train", _c_yaml_syntax, ("line", "yaml")),
    Case("train-pretrained-unreadable", "train", _c_pretrained_unreadable,
         ("state dict", "state_dict", ".pth", "safetensors")),
    Case("train-pretrained-corrupt-safetensors", "train", _c_pretrained_bad_safetensors, _FILEFIX),
    Case("evaluate-corrupt-checkpoint", "evaluate", _c_eval_corrupt, _CKPTFIX),
    Case("evaluate-not-a-checkpoint", "evaluate", _c_eval_wrong_kind, _CKPTFIX),
    Case("evaluate-no-data", "evaluate", _c_eval_no_data, ("--source",)),
    Case("evaluate-unknown-split", "evaluate", _c_eval_bad_split,
         ("featcache splits", "name existing splits", "give a file")),
    Case("evaluate-unknown-student-config-key", "evaluate", _c_eval_unknown_student_key,
         ("version", "upgrade", "re-export", "known", "remove")),
    Case("evaluate-checkpoint-without-ema", "evaluate", _c_eval_no_ema, ("--use student",)),
    Case("predict-missing-input", "predict", _c_predict_missing_input, _PATHFIX),
    Case("predict-out-is-file", "predict", _c_predict_out_file, ("folder", "directory")),
    Case("predict-corrupt-image", "predict", _c_predict_corrupt_image, _FILEFIX),
    Case("predict-corrupt-checkpoint", "predict", _c_predict_corrupt_ckpt, _CKPTFIX),
    Case("export-corrupt-checkpoint", "export", _c_export_corrupt, _CKPTFIX),
    Case("export-torchscript", "export", _c_export_torchscript,
         ("best.pt", "latest.pt", "state dict", "state_dict")),
    Case("demo-empty-data", "demo", _c_demo_empty_data, ("images/", "--layout", "expected")),
    Case("demo-out-is-file", "demo", _c_demo_out_file, ("folder", "directory", "--out")),
    Case("demo-threads-zero", "demo", _c_demo_threads, ("range", ">=")),
    Case("info-reports-unlabelled-tiles", "info", _c_info_counts_unlabelled, (), error=False),
    Case("extract-ignore-index-out-of-range", "extract", _opt("--ignore-index", "300"),
         ("range", "0..255", "<=")),
    Case("train-resume-duplicate-metric-rows", "train", _c_resume_duplicate_rows, (), error=False),
    Case("train-resume-missing-checkpoint", "train", _c_resume_missing, _PATHFIX),
    Case("train-config-missing", "train", _c_config_missing, _PATHFIX),
    Case("train-target-mode-unknown", "train", _train_opt("--target-mode", "exact"),
         ("one of", "warp")),
    Case("train-scale-blend-negative", "train", _train_opt("--scale-blend", "-1"),
         (">= 0", "0 or more", "0:")),
    Case("train-p-bank-out-of-range", "train", _train_opt("--p-bank", "2"),
         ("[0, 1]", "0..1", "between")),
    Case("train-view-bank-without-bank", "train", _c_view_bank_without_bank, ("featcache bank",)),
    Case("export-out-is-directory", "export", _c_export_out_dir, (".safetensors", "file")),
    Case("extract-weights-is-a-folder", "extract", _c_weights_dir, ("file", ".pth", "safetensors")),
    Case("train-partition-unknown", "train", _c_partition_unknown, ("featcache splits",)),
    Case("train-source-missing", "train", _c_train_source_missing, _PATHFIX),
    Case("evaluate-missing-checkpoint", "evaluate", _c_eval_missing_ckpt, _PATHFIX),
    Case("predict-device-cuda-no-gpu", "predict", _c_predict_cuda,
         ("--device cpu",), skip=_no_cuda),
    # issue 15: the kinds the issue lists that were missing
    Case("extract-16-bit-geotiff", "extract", _c_16bit_tiff, ("8-bit", "gdal_translate")),
    Case("extract-16-bit-png", "extract", _c_16bit_png, ("8-bit", "convert")),
    Case("extract-nodata-geotiff", "extract", _c_nodata, ("--ignore-index", "fill"),
         error=False),
    Case("extract-two-band-image", "extract", _c_two_bands, ("--bands", "rgb", "convert")),
    Case("extract-five-band-geotiff", "extract", _c_five_band_tiff, ("--bands",)),
    Case("extract-scenes-smaller-than-tile", "extract", _c_scenes_smaller_than_tile,
         ("--tile-size 40",), error=False),
    Case("extract-non-square-scenes", "extract", _c_non_square_scenes, (), error=False),
    # the largest multiple of the patch 14 that fits the 64 px tiles: 56
    Case("train-tiles-smaller-than-crop", "train", _c_tiles_smaller_than_crop, ("--crop 56",),
         error=False),
    Case("train-overlapping-splits", "train", _c_overlapping_splits,
         ("remove", "disjoint", "featcache splits")),
    Case("train-split-ids-point-nowhere", "train", _c_train_split_ids_nowhere,
         ("featcache splits", "tile id", "check")),
    Case("extract-config-yaml-syntax", "extract", _c_extract_yaml_syntax, ("line", "yaml")),
    Case("extract-config-unknown-key", "extract", _c_extract_yaml_unknown_key,
         ("known", "allowed", "scales")),
    Case("train-config-yaml-not-a-mapping", "train", _c_train_yaml_not_mapping,
         ("mapping", "key: value", "e.g.")),
    Case("extract-weights-random-bytes", "extract", _c_weights_random_bytes,
         ("state dict", "state_dict", "safetensors", ".pth")),
    Case("extract-weights-random-bytes-safetensors", "extract",
         _c_weights_random_bytes_safetensors, _FILEFIX),
    Case("evaluate-random-bytes-checkpoint", "evaluate", _c_eval_random_bytes, _CKPTFIX),
    Case("train-resume-random-bytes-checkpoint", "train", _c_resume_random_bytes, _CKPTFIX),
    Case("evaluate-use-unknown", "evaluate", _c_eval_use_unknown, ("one of", "ema")),
    Case("extract-layout-unknown", "extract", _opt("--layout", "sentinel"), ("one of",)),
    Case("extract-edge-rule-unknown", "extract", _opt("--edge-rule", "wrap"), ("one of",)),
    Case("train-method-unknown", "train", _train_opt("--method", "mean-teacher"), ("one of",)),
    Case("train-eval-mode-unknown", "train", _train_opt("--eval-mode", "tiles"), ("one of",)),
    Case("extract-store-in-read-only-folder", "extract", _c_extract_read_only,
         ("permission", "writable", "another"), skip=_as_root),
    Case("train-out-in-read-only-folder", "train", _c_train_read_only,
         ("permission", "writable", "another"), skip=_as_root),
    Case("extract-unicode-and-spaces-in-paths", "extract", _c_unicode_spaces, (), error=False),
    Case("extract-relative-paths-from-another-folder", "extract", _c_relative_paths, (),
         error=False),
    Case("train-relative-paths-from-another-folder", "train", _c_train_relative_paths, (),
         error=False),
    Case("train-resume-checkpoint-other-class-count", "train", _c_resume_other_classes,
         ("same model options", "use a checkpoint", "--num-classes")),
    Case("train-resume-checkpoint-other-student-size", "train", _c_resume_other_size,
         ("same model options", "use a checkpoint")),
    Case("evaluate-checkpoint-other-class-count", "evaluate", _c_eval_other_classes,
         ("use a checkpoint", "another store", "--store")),
    Case("evaluate-checkpoint-other-student-size", "evaluate", _c_eval_other_size,
         ("use a checkpoint", "re-export", "best.pt")),
]
# fmt: on

# Cases that fail today, with why: strict xfails in tests/app/test_bad_inputs.py (a fix turns one
# into a failure that asks for its line here to be removed). bench/reliability.py ignores this.
KNOWN_FAILURES: dict[str, str] = {}
