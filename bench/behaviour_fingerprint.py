"""Bit-level fingerprint of training behaviour, to prove a refactor changed nothing.

Runs short seeded trainings on a synthetic store (every target mode, online teachers, plain
FixMatch without teachers) and, when the LoveDA sample is present, the configuration of
``tests/trainer/test_engine_loveda.py``. For each run it records the exact losses, the metrics
and a SHA-256 of the final student and EMA weights. Run it before and after a change and compare
the two JSON files: equal files mean bit-identical training.

The stores are extracted on the first run into ``--stores DIR`` and reused after, so a change
to the trainer is compared on the very same cached features (pass a fresh folder to include
extraction in the comparison).

    python bench/behaviour_fingerprint.py --out before.json --stores /tmp/fp-stores [--no-loveda]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
from _common import LOVEDA


def _weights_hash(path: Path) -> str:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for part in ("student", "ema"):
        for k in sorted(ckpt[part]):
            h.update(k.encode())
            h.update(ckpt[part][k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _record(result: Any) -> dict[str, Any]:
    return {
        "losses": [float(x).hex() for x in result.losses],
        "metrics": json.loads(json.dumps(result.metrics, sort_keys=True, default=str)),
        "weights": _weights_hash(result.out_dir / "latest.pt"),
    }


def _store_once(stores: Path, name: str, build: Any) -> str:
    """A store extracted once into ``stores/name`` (reused by later runs)."""
    import shutil

    done = stores / name / "store.zarr"
    if not done.is_dir():
        tmp = stores / f"{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        built = Path(build(tmp))
        shutil.move(str(built), str(tmp / "built.zarr"))
        (stores / name).mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / "built.zarr"), str(done))
        shutil.rmtree(tmp, ignore_errors=True)
    return str(done)


def synthetic_runs(root: Path, stores: Path) -> dict[str, Any]:
    """Every training mode on one synthetic store (tiny teachers, 4 iterations)."""
    from featstore import open_store
    from pipelines.viewbank import build_view_bank
    from tests.helpers import CLIP, DINO, build_store, tiny_config
    from trainer.config import TeacherConfig
    from trainer.engine import train

    def build(tmp: Path) -> str:
        url = build_store(tmp, n_images=6, teachers=(DINO, CLIP), scales=(0.5, 1.0, 2.0), flip=True)
        build_view_bank(url, k=2, tiny=True)
        return url

    url = _store_once(stores, "synthetic", build)
    ids = [t.tile_id for t in open_store(url).tiles]
    teachers = [TeacherConfig(DINO), TeacherConfig(CLIP, "clip224")]
    variants: dict[str, dict[str, Any]] = {
        "warp": {},
        "warp_one_level": {"distill.scale_blend": 0.0},
        "grid_aligned": {"distill.target_mode": "grid_aligned"},
        "view_bank": {"distill.target_mode": "view_bank", "distill.p_bank": 0.5},
        "online": {"mode": "online"},
        "fixmatch_only": {"distill.enabled": False, "model.teachers": []},
        "unmasked": {"distill.masked": False},
    }
    out = {}
    for name, changes in variants.items():
        run_root = root / name
        run_root.mkdir()
        cfg = tiny_config(run_root, url, ids, teachers, iters=4)
        cfg.schedule.eval_interval = 4
        for key, value in changes.items():
            obj = cfg
            *path, last = key.split(".")
            for p in path:
                obj = getattr(obj, p)
            setattr(obj, last, value)
        torch.manual_seed(0)
        out[name] = _record(train(cfg))
        print(name, out[name]["weights"][:16], file=sys.stderr)
    return out


def loveda_run(root: Path, stores: Path) -> dict[str, Any]:
    """The LoveDA learning test's run (tests/trainer/test_engine_loveda.py), recorded."""
    from tests.trainer import test_engine_loveda as t
    from trainer.engine import train

    url = _store_once(stores, "loveda", lambda tmp: t.extract_loveda(LOVEDA, tmp))
    torch.set_num_threads(1)
    return _record(train(t.loveda_config(url, root)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--stores", required=True, help="folder of the extracted stores (reused)")
    ap.add_argument("--no-loveda", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "syn").mkdir()
        stores = Path(args.stores)
        record = {"synthetic": synthetic_runs(root / "syn", stores)}
        if not args.no_loveda and LOVEDA.is_dir():
            (root / "loveda").mkdir()
            record["loveda"] = loveda_run(root / "loveda", stores)
    Path(args.out).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
