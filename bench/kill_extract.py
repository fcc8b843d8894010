"""SIGKILL an extraction at named points, re-run it, compare with an uninterrupted run.

Each case runs `featcache extract` in a subprocess with ``FEATCACHE_FAULT=<point>:<n>``
(``featstore.faults``: the process SIGKILLs itself the n-th time it reaches ``<point>``), checks
that it really died by SIGKILL, re-runs the same command without the fault, and then checks,
against an extraction that was never interrupted:

* ``featcache verify`` passes on the resumed store;
* every file of the resumed store is byte-identical to the uninterrupted one's (lock aside).

    python bench/kill_extract.py            # all points, prints the markdown table

tests/pipelines/test_kill_extract.py runs a subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corruption as C  # noqa: E402  (the suite's dataset, options and tree comparison)

# (point, n): where the kill lands. Per shard of the suite's store: 4 teacher forwards (4
# levels, one batch), 10 array writes (4 levels x data + aux, image, mask); 3 shards; 4 levels
# merged by finalize.
KILL_POINTS: list[tuple[str, int]] = [
    ("create.before_rename", 1),  # the store built beside its path, not yet renamed
    ("extract.after_create", 1),  # store created, no shard written
    ("shard.start", 1),
    ("shard.start", 3),
    ("shard.forward", 1),  # during the first teacher forward
    ("shard.forward", 6),  # during a forward of the second shard
    ("shard.forward", 12),  # the last forward
    ("shard.before_write", 1),  # features computed, nothing written
    ("shard.before_write", 3),
    ("write.array", 2),  # during a shard write: first array written, the rest not
    ("write.array", 6),
    ("write.array", 10),  # all but the mask of shard 0
    ("write.array", 17),  # mid shard 1
    ("write.before_checksum", 1),  # data and stats written, checksums not
    ("write.before_checksum", 3),
    ("write.before_done", 1),  # between data and done marker
    ("write.before_done", 2),
    ("write.before_done", 3),
    ("write.after_done", 1),
    ("write.after_done", 3),  # every shard done, not finalized
    ("shard.after_write", 2),
    ("extract.before_finalize", 1),
    ("finalize.merge", 1),  # during the stats merge
    ("finalize.merge", 4),
    ("finalize.before_header", 1),  # merged, header not yet written
    ("finalize.before_consolidate", 1),  # header written, metadata not yet consolidated
]


def cli_args(source: Path, store: Path) -> list[str]:
    """The `featcache extract` command line of the suite's store (corruption.TINY_OPTIONS)."""
    o = C.TINY_OPTIONS
    args = [sys.executable, "-m", "featcache.cli", "extract", str(source), str(store), "-q"]
    for teacher in o["teachers"]:
        args += ["--teacher", teacher]
    args += ["--tiny"] if o["tiny"] else []
    args += ["--tile-size", str(o["tile_size"]), "--base-size", str(o["base_size"])]
    args += ["--tiles-per-shard", str(o["tiles_per_shard"]), "--batch-size", str(o["batch_size"])]
    args += ["--scales", ",".join(f"{s:g}" for s in o["scales"])]
    args += ["--flip" if o["flip"] else "--no-flip", "--codec", o["codec"]["name"]]
    return args


@dataclasses.dataclass
class KillResult:
    point: str
    n: int
    killed: bool
    verified: bool
    identical: bool
    detail: str = ""

    @property
    def survived(self) -> bool:
        return self.killed and self.verified and self.identical


def _run(args: list[str], fault: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEATCACHE_FAULT"}
    if fault:
        env["FEATCACHE_FAULT"] = fault
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def kill_case(point: str, n: int, source: Path, reference: Path, work: Path) -> KillResult:
    """Kill at ``point:n``, resume with the same command, compare with ``reference``."""
    from featstore import verify_store

    store = work / f"kill-{point}-{n}.zarr"
    args = cli_args(source, store)
    first = _run(args, f"{point}:{n}")
    killed = first.returncode == -signal.SIGKILL
    if not killed:
        detail = f"not killed (exit {first.returncode}): {first.stderr[-300:]}"
        return KillResult(point, n, False, False, False, detail)
    second = _run(args, None)
    if second.returncode != 0:
        detail = f"resume failed (exit {second.returncode}): {second.stdout[-400:]}"
        return KillResult(point, n, True, False, False, detail)
    problems = verify_store(str(store))
    got, want = C.tree(store), C.tree(reference)
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    leftovers = sorted(p.name for p in work.glob(f"{store.name}.tmp-*"))
    detail = "; ".join(filter(None, [str(problems[:2] or ""), str(differ[:4] or ""), *leftovers]))
    shutil.rmtree(store, ignore_errors=True)
    return KillResult(point, n, True, not problems, not differ and not leftovers, detail)


def reference_store(source: Path, work: Path) -> Path:
    """The uninterrupted extraction, by the same command line as the killed runs."""
    store = work / "reference.zarr"
    done = _run(cli_args(source, store), None)
    if done.returncode != 0:
        raise RuntimeError(f"reference extraction failed: {done.stdout}{done.stderr}")
    return store


def run_suite(points: list[tuple[str, int]], work: Path) -> list[KillResult]:
    source = C.make_dataset(work)
    reference = reference_store(source, work)
    return [kill_case(point, n, source, reference, work) for point, n in points]


def table(results: list[KillResult]) -> str:
    lines = [
        "| kill point | n-th time reached | killed | verify passes | byte-identical |",
        "|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "**no**"}
    for r in results:
        lines.append(
            f"| {r.point} | {r.n} | {yes[r.killed]} | {yes[r.verified]} | {yes[r.identical]} |"
        )
    survived = sum(r.survived for r in results)
    lines.append(f"\n**{survived} / {len(results)} kills survived** (resumed, verified, identical)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated point:n subset")
    args = parser.parse_args()
    points = KILL_POINTS
    if args.only:
        points = [(p, int(n)) for p, _, n in (x.rpartition(":") for x in args.only.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        results = run_suite(points, Path(tmp))
    for r in results:
        if not r.survived:
            print(f"{r.point}:{r.n}: {r.detail}")
    print(table(results))


if __name__ == "__main__":
    main()
