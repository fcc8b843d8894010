"""Corruption suite: damage a sound store at random; `verify` must catch it, `repair` fix it.

Each case copies a freshly extracted store, injects one seeded fault (a bit flip in a chunk file,
a truncated / deleted / swapped shard file, an edited attribute in a zarr.json, a changed
data_type or fill_value), then checks, independently of the code under test:

* caught: ``featstore.verify_store`` reports at least one problem;
* repaired: ``pipelines.repair.repair_store`` with the extraction's own options returns, and every
  file of the store (array chunks, zarr.json metadata and attributes) is byte-identical to the
  uninterrupted extraction's (the lock file aside).

    python bench/corruption.py --cases 60 --seed 0      # prints the markdown table

tests/pipelines/test_repair.py runs a smaller seeded subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOCK_FILE = "featcache.lock"
META = "zarr.json"
# Tiny but complete: int8 (features + aux arrays), pixels and masks, 3 shards of 3,3,2 tiles.
TINY_OPTIONS = dict(
    teachers=("dinov2_vitb14",),
    tiny=True,
    tile_size=64,
    base_size=70,
    tiles_per_shard=3,
    batch_size=3,
    scales=(1.0, 0.5),
    flip=True,
    codec={"name": "int8"},
)
# Data types of the same size: the bytes still decode, only the metadata check can tell.
SAME_SIZE_DTYPE = {
    "uint8": "int8",
    "int8": "uint8",
    "float16": "int16",
    "float32": "int32",
    "uint32": "int32",
    "int64": "float64",
    "float64": "int64",
}


def make_dataset(root: Path) -> Path:
    """A synthetic folder dataset: 2 images of 128 px -> 8 tiles of 64 px."""
    from pipelines.synthetic import generate_synthetic

    out = root / "synth"
    generate_synthetic(str(out), n_images=2, size=128, seed=7)
    return out


def extract_config(source: Path, store: Path, **changes: Any) -> Any:
    """The extraction config of the suite's store (``changes`` override single options)."""
    from pipelines.config import ExtractConfig

    return ExtractConfig(source=str(source), out=str(store), **{**TINY_OPTIONS, **changes})


def extract(source: Path, store: Path, **changes: Any) -> Path:
    from pipelines.extract import run_extraction

    run_extraction(extract_config(source, store, **changes), progress=False)
    return store


def tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes by relative path (the writer lock aside)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def _chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and p.name not in (META, LOCK_FILE))


def _shard_files(store: Path) -> list[Path]:
    """Chunk files of the per-shard arrays (paths under a ``c`` folder with several files)."""
    by_array: dict[Path, list[Path]] = {}
    for f in _chunk_files(store):
        array = next(p for p in f.parents if p.name == "c").parent
        by_array.setdefault(array, []).append(f)
    return [f for files in by_array.values() if len(files) > 1 for f in files]


def _array_metas(store: Path) -> list[Path]:
    return sorted(
        p for p in store.rglob(META) if json.loads(p.read_text()).get("node_type") == "array"
    )


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


def bit_flip(store: Path, rng: random.Random) -> str:
    f = rng.choice(_chunk_files(store))
    data = bytearray(f.read_bytes())
    pos, bit = rng.randrange(len(data)), rng.randrange(8)
    data[pos] ^= 1 << bit
    f.write_bytes(bytes(data))
    return f"{f.relative_to(store)} byte {pos} bit {bit}"


def truncate(store: Path, rng: random.Random) -> str:
    f = rng.choice(_shard_files(store))
    size = f.stat().st_size
    keep = rng.randrange(size)
    f.write_bytes(f.read_bytes()[:keep])
    return f"{f.relative_to(store)} {size} -> {keep} bytes"


def delete(store: Path, rng: random.Random) -> str:
    f = rng.choice(_shard_files(store))
    f.unlink()
    return f"{f.relative_to(store)}"


def swap(store: Path, rng: random.Random) -> str:
    files = _shard_files(store)
    while True:
        a = rng.choice(files)
        peers = [f for f in files if f != a and f.parts[:-4] == a.parts[:-4]]
        peers = [f for f in peers if f.read_bytes() != a.read_bytes()]
        if peers:
            break
    b = rng.choice(peers)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    return f"{a.relative_to(store)} <-> {b.relative_to(store)}"


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [leaf for k in value for leaf in _leaves(value[k], (*path, k))]
    if isinstance(value, list) and value and not isinstance(value[0], dict | list):
        return [(*path, i) for i in range(len(value))]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*path, i))]
    return [path]


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1 if value == 0 else value * 1.5
    if isinstance(value, str):
        return value + "x"
    return "edited"


def edit_attrs(store: Path, rng: random.Random) -> str:
    """Change one leaf value of one node's attributes (header, groups or arrays)."""
    metas = [p for p in sorted(store.rglob(META)) if json.loads(p.read_text()).get("attributes")]
    f = rng.choice(metas)
    leaves = _leaves(json.loads(f.read_text())["attributes"])
    path = rng.choice(leaves)

    def edit(meta: dict[str, Any]) -> None:
        node = meta["attributes"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _changed(node[path[-1]])

    _edit_json(f, edit)
    return f"{f.relative_to(store)} attributes/{'/'.join(map(str, path))}"


def change_dtype(store: Path, rng: random.Random) -> str:
    metas = [p for p in _array_metas(store) if json.loads(p.read_text())["data_type"] != "string"]
    f = rng.choice(metas)
    old = json.loads(f.read_text())["data_type"]
    _edit_json(f, lambda m: m.update(data_type=SAME_SIZE_DTYPE.get(old, "float32")))
    return f"{f.relative_to(store)} data_type {old}"


def change_fill(store: Path, rng: random.Random) -> str:
    metas = [p for p in _array_metas(store) if json.loads(p.read_text())["data_type"] != "string"]
    f = rng.choice(metas)
    old = json.loads(f.read_text())["fill_value"]
    new = 7 if old in (0, 0.0) else 0
    _edit_json(f, lambda m: m.update(fill_value=new))
    return f"{f.relative_to(store)} fill_value {old!r} -> {new}"


FAULTS: dict[str, Callable[[Path, random.Random], str]] = {
    "bit flip": bit_flip,
    "truncated shard": truncate,
    "deleted shard": delete,
    "swapped shards": swap,
    "edited attrs": edit_attrs,
    "changed dtype": change_dtype,
    "changed fill_value": change_fill,
}


@dataclasses.dataclass
class CaseResult:
    kind: str
    fault: str
    caught: bool
    repaired: bool
    detail: str = ""


def run_case(kind: str, seed: int, source: Path, reference: Path, work: Path) -> CaseResult:
    """Damage a copy of ``reference`` with one fault, verify it, repair it, compare bytes."""
    from featstore import verify_store
    from pipelines.repair import repair_store

    store = work / f"case-{seed}.zarr"
    shutil.copytree(reference, store)
    fault = FAULTS[kind](store, random.Random(seed))
    before = tree(store)
    want = tree(reference)
    if before == want:  # e.g. a flip undone by a second one: not a fault at all
        return CaseResult(kind, fault, True, True, "no byte changed")
    problems = verify_store(str(store))
    try:
        repair_store(extract_config(source, store))
        got = tree(store)
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        detail = f"differs after repair: {differ[:4]}" if differ else ""
    except Exception as err:  # noqa: BLE001 - the suite reports, it does not stop
        differ, detail = ["(repair failed)"], f"{type(err).__name__}: {err}"
    shutil.rmtree(store, ignore_errors=True)
    return CaseResult(kind, fault, bool(problems), not differ, detail)


def run_suite(n_cases: int, seed: int, work: Path) -> list[CaseResult]:
    source = make_dataset(work)
    reference = extract(source, work / "reference.zarr")
    kinds = list(FAULTS)
    rng = random.Random(seed)
    results = []
    for i in range(n_cases):
        kind = kinds[i % len(kinds)]
        results.append(run_case(kind, rng.randrange(2**31), source, reference, work))
    return results


def table(results: list[CaseResult]) -> str:
    lines = ["| fault | tried | caught by verify | repaired byte-identical |", "|---|---|---|---|"]
    for kind in FAULTS:
        rows = [r for r in results if r.kind == kind]
        if rows:
            caught = sum(r.caught for r in rows)
            fixed = sum(r.repaired for r in rows)
            lines.append(f"| {kind} | {len(rows)} | {caught} | {fixed} |")
    lines.append(
        f"| **all** | {len(results)} | {sum(r.caught for r in results)} | "
        f"{sum(r.repaired for r in results)} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=56)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_suite(args.cases, args.seed, Path(tmp))
    for r in results:
        if args.verbose or not (r.caught and r.repaired):
            print(f"{r.kind}: {r.fault}: caught={r.caught} repaired={r.repaired} {r.detail}")
    print(table(results))


if __name__ == "__main__":
    main()
