"""SIGKILL a tiny training run at random points and resume it: kills survived / tried.

Each trial starts a fresh run of `featcache train` (tiny CPU student, checkpoint every 3 steps,
evaluation every 4) in its own process with ``FEATCACHE_FAULT=<point>:<n>`` (`featstore.faults`),
so the process SIGKILLs itself the n-th time it reaches the point: after an optimizer step
(``train.step``), in the middle of writing a checkpoint (``checkpoint.write``, one of ~3200 write
calls), with the temporary checkpoint whole but not renamed (``checkpoint.before_rename``), or
renamed but the folder not fsynced (``checkpoint.after_rename``). The documented resume command
(the same command, ``--resume auto``) then finishes the run. A kill is *survived* when the
finished run's weights (student, EMA), optimizer state, progress, metrics, ``metrics.csv`` and
``eval.jsonl`` equal those of an uninterrupted run bit for bit, and no temporary file is left.
The same comparison as `tests/trainer/test_train_faults.py`, over more points.

Usage: ``python bench/train_kills.py [--trials 5] [--seed 15]`` (about 10 s per trial on 2
cores); prints a markdown table and writes ``bench/out/train_kills.json``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.ROOT))
from tests.trainer.test_train_faults import (  # noqa: E402
    ITERS,
    KILL_POINTS,
    _command,
    _run,
    compare_runs,
)


def _data(root: Path) -> tuple[str, Path]:
    """The test's synthetic store, split files and config, built in ROOT."""
    from featstore import open_store
    from tests.helpers import DINO, build_store, write_ids

    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    for name, part in (("l", ids[:2]), ("u", ids[2:4]), ("v", ids[4:])):
        write_ids(root / f"{name}.txt", part)
    (root / "cfg.yaml").write_text(
        "schedule:\n  ckpt_interval: 3\nruntime:\n  tensorboard: false\n"
    )
    return url, root


def trial(url: str, root: Path, reference: Path, out: Path, fault: str) -> dict[str, Any]:
    """One kill at FAULT, the resume, and the comparison."""
    killed = _run(_command(url, root, out), fault)
    record: dict[str, Any] = {"fault": fault, "killed": killed.returncode == -signal.SIGKILL}
    if not record["killed"]:
        record["error"] = f"exit {killed.returncode}: {killed.stderr[-500:]}"
        return record
    resumed = _run(_command(url, root, out))
    if resumed.returncode != 0:
        record["error"] = f"resume exit {resumed.returncode}: {resumed.stderr[-500:]}"
        return record
    try:
        compare_runs(out, reference)
    except AssertionError as err:
        record["error"] = f"differs: {str(err)[:300]}"
        return record
    record["survived"] = True
    return record


def main(argv: list[str] | None = None) -> None:
    """Run the trials and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="Kills per point.")
    parser.add_argument("--seed", type=int, default=15, help="Seed of the hit counts.")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="featcache-train-kills-") as tmp:
        url, root = _data(Path(tmp))
        reference = root / "reference"
        done = _run(_command(url, root, reference))
        if done.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{done.stderr[-3000:]}")
        for name, top in KILL_POINTS:
            for _ in range(args.trials):
                fault = f"{name}:{rng.randint(1, top)}"
                out = root / "killed"
                shutil.rmtree(out, ignore_errors=True)
                record = trial(url, root, reference, out, fault)
                print(f"{'survived' if record.get('survived') else 'FAILED  '} {fault}", flush=True)
                records.append({"point": name, **record})
    seconds = time.perf_counter() - t0
    rows = []
    for name, _ in KILL_POINTS:
        mine = [r for r in records if r["point"] == name]
        rows.append(
            [
                f"`{name}`",
                str(len(mine)),
                str(sum(r["killed"] for r in mine)),
                str(sum(bool(r.get("survived")) for r in mine)),
                ", ".join(r["fault"].rsplit(":", 1)[1] for r in mine),
            ]
        )
    survived = sum(bool(r.get("survived")) for r in records)
    header = ["kill point", "tried", "killed", "survived (bit-identical)", "hit counts n"]
    print()
    print(C.markdown_table(header, rows))
    print(
        f"\n**{survived} of {len(records)} kills survived**, {ITERS} iterations, seed "
        f"{args.seed}, {seconds:.0f} s"
    )
    payload = {"seconds": seconds, "seed": args.seed, "records": records}
    print(f"wrote {C.write_json('train_kills', payload)}")


if __name__ == "__main__":
    main()
