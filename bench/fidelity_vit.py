"""Benchmark 5b: fidelity audit of the cache options with the registry ViT teachers (issue #5).

Same protocol as ``bench/fidelity.py`` (LoveDA 512 tiles, extraction at
``pipelines.config.MULTI_SCALES`` + flip read at run time, a small exact view bank, then
``featcache.audit.audit_store`` with 1 scale / 1 scale + flip / all scales / all scales + flip,
a grid-aligned run and the view-bank check) for ``dinov2_vitb14`` (DINOv2-B/14, 518 px input for
the 518 canvas) and ``clip_vitl14`` (CLIP ViT-L/14, official RS-MTDF preprocessing: the 518
canvas is resized to 224 px, 16x16 tokens). The real architectures are built; without
``--weights`` they are random init (the registry's fixed seed), since no model hub is reachable.

Full-size ViTs are slow on a 2-core CPU, so ``--tiles``, ``--views``, ``--bank-k`` and
``--drop-largest`` cut the work; every cut is written to the JSON and the printed header. With
real weights and a GPU::

    python bench/fidelity_vit.py --teacher dinov2_vitb14 --weights dinov2_vitb14.pth --device cuda

Usage: ``python bench/fidelity_vit.py --teacher NAME [--quick] [--views N] [--tiles N]
[--drop-largest] [--weights PATH] [--device DEV]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from fidelity import dir_bytes, storage  # noqa: E402

TEACHERS = ("dinov2_vitb14", "clip_vitl14")
ALL_TILES = 12  # the LoveDA sample: 3 tiles of 1024 px -> 12 tiles of 512 px


def extract(
    out: str, name: str, weights: str | None, scales: tuple[float, ...], args: argparse.Namespace
) -> tuple[str, float]:
    """Run the real extraction into ``out``; return the URL and the wall seconds."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction

    cfg = ExtractConfig(
        source=str(C.LOVEDA),
        out=out,
        teachers=(name,),
        weights={name: weights} if weights else {},
        scales=scales,
        flip=True,
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
        tiles_per_shard=4,
        overwrite=True,
        tiny=args.tiny,
        random_weights=args.random_weights,
        limit=None if args.tiles >= ALL_TILES else args.tiles,
    )
    t0 = time.perf_counter()
    url = run_extraction(cfg, progress=False)
    return url, time.perf_counter() - t0


def level_sets(scales: tuple[float, ...]) -> dict[str, list[str]]:
    """The four cache options as level keys, labelled by the number of scales."""
    from featstore import LevelSpec

    plain = [LevelSpec(s).key for s in scales]
    n = len(scales)
    return {
        "1 scale": ["s1.00"],
        "1 scale + flip": ["s1.00", "s1.00f"],
        f"{n} scales": plain,
        f"{n} scales + flip": plain + [LevelSpec(s, True).key for s in scales],
    }


def teacher_facts(teacher: Any) -> dict[str, Any]:
    """Parameters, token sizes and the LayerScale gains of the built teacher.

    The gains matter for reading random-init figures: timm's DINOv2 starts every LayerScale at
    1e-5, so a random DINOv2's blocks barely touch the residual stream.
    """
    import torch

    gammas = [
        p.detach().abs().mean()
        for n, p in teacher.named_parameters()
        if n.endswith(".gamma") or ".ls" in n
    ]
    spec = teacher.spec
    return {
        "params_m": round(sum(p.numel() for p in teacher.parameters()) / 1e6, 1),
        "input_px_at_base": teacher.input_px(teacher.base_size),
        "grid_at_base": teacher.grid_size(teacher.base_size),
        "grid_at_2x": teacher.grid_size(2 * teacher.base_size),
        "stride": spec.stride,
        "channels": spec.channels,
        "resize": spec.resize.to_dict(),
        "layerscale_mean_abs": float(torch.stack(gammas).mean()) if gammas else None,
    }


def chance_cosine(url: str, name: str, seed: int = 0, pairs: int = 20000) -> dict[str, float]:
    """Cosine of unrelated token pairs of ``s1.00`` (other tile, other place): the floor.

    A feature space where random tokens already agree (a shared mean direction, as random-init
    ViTs have) makes every audit cosine look high; this number is the zero point to read
    them against.
    """
    import numpy as np

    from featstore import open_store

    store = open_store(url)
    tiles = [int(i) for i in np.flatnonzero(store.done())]
    tok = np.stack([store.read(name, i, "s1.00") for i in tiles]).astype(np.float32)
    flat = tok.reshape(len(tiles), -1, tok.shape[-1])
    rng = np.random.default_rng(seed)
    t = rng.integers(0, len(tiles), (pairs, 2))
    t[:, 1] = (t[:, 0] + 1 + rng.integers(0, max(1, len(tiles) - 1), pairs)) % len(tiles)
    p = rng.integers(0, flat.shape[1], (pairs, 2))
    a, b = flat[t[:, 0], p[:, 0]], flat[t[:, 1], p[:, 1]]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    centred = flat - flat.reshape(-1, flat.shape[-1]).mean(0)
    ca, cb = centred[t[:, 0], p[:, 0]], centred[t[:, 1], p[:, 1]]
    ccos = (ca * cb).sum(1) / np.maximum(
        np.linalg.norm(ca, axis=1) * np.linalg.norm(cb, axis=1), 1e-12
    )
    return {"raw": float(cos.mean()), "mean_removed": float(ccos.mean()), "pairs": pairs}


def parse_args() -> argparse.Namespace:
    """Command-line options (``--quick`` fills in whatever was not given)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", choices=TEACHERS, required=True)
    ap.add_argument(
        "--weights",
        default=None,
        help="checkpoint file or pretrained tag (default: random init of the real architecture)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--quick", action="store_true", help="4 tiles, 8 views, 4 grid-aligned views, bank K=2"
    )
    ap.add_argument("--views", type=int, default=None, help="audit views (default 32)")
    ap.add_argument(
        "--aligned-views",
        type=int,
        default=None,
        help="grid-aligned audit views (default: --views)",
    )
    ap.add_argument("--tiles", type=int, default=None, help=f"tiles used (default {ALL_TILES})")
    ap.add_argument("--bank-k", type=int, default=None, help="bank views per tile (default 4)")
    ap.add_argument(
        "--drop-largest",
        action="store_true",
        help="extract without the largest of MULTI_SCALES (its cost dominates)",
    )
    ap.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip the exact-scale ceiling (one more teacher pass per view)",
    )
    ap.add_argument("--identity-tiles", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random teachers (smoke runs only)")
    ap.add_argument(
        "--random-weights",
        action="store_true",
        help="accept a full-size teacher with random init when --weights is absent",
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    q = args.quick
    args.views = args.views or (8 if q else 32)
    args.aligned_views = args.aligned_views or (4 if q else args.views)
    args.tiles = args.tiles or (4 if q else ALL_TILES)
    args.bank_k = args.bank_k or (2 if q else 4)
    return args


def run_audits(
    url: str, name: str, args: argparse.Namespace, sets: dict[str, list[str]], n_tiles: int
) -> tuple[Any, Any, dict[str, Any]]:
    """Main audit (teacher grid, bank check) and grid-aligned audit with one built teacher."""
    from featcache.audit import audit_store
    from featstore import open_store
    from pipelines.teachers import create_teacher

    teacher = create_teacher(
        name,
        weights=args.weights,
        tiny=args.tiny,
        device=args.device,
        random_weights=args.random_weights,
        base_size=open_store(url).schema.base_size,
    )
    kw = dict(
        teacher=teacher,
        seed=0,
        batch_size=args.batch_size,
        level_sets=sets,
        device=args.device,
        identity_tiles=args.identity_tiles,
    )
    main_res = audit_store(
        url,
        name,
        n_views=args.views,
        ceiling=not args.no_ceiling,
        bank_views=n_tiles * args.bank_k,
        **kw,
    )
    aligned = audit_store(
        url, name, n_views=args.aligned_views, grid_aligned=True, ceiling=False, bank_views=0, **kw
    )
    return main_res, aligned, teacher_facts(teacher)


def above_floor(cos: float, floor: float) -> float:
    """``(cos - floor) / (1 - floor)``: the cosine rescaled so unrelated tokens read 0.

    A linear rescale, not a centred cosine; it makes teachers with different floors (random
    ViTs share a large mean direction) comparable at a glance.
    """
    return (cos - floor) / max(1e-12, 1.0 - floor)


def storage_key(label: str) -> str:
    """The level set behind an audit config label (the audit may add a nearest-level twin)."""
    return label.split(" (")[0]


def option_rows(
    res: Any, aligned: Any, bpt: dict[str, float], bank_disk: float, k: int, floor: float
) -> list[list[Any]]:
    """One row per cache option: cosines on both grids, rescaled cosine and storage."""
    overall = res.row("all views", "overall").cosine
    other = res.factors[[r.factor for r in res.factors].index("other grid")].cosine
    rows = [
        [
            label,
            C.fmt(overall[label], 3),
            C.fmt(other[label], 3),
            C.fmt(above_floor(overall[label], floor), 2),
            C.fmt(bpt[storage_key(label)] / 1024, 0),
        ]
        for label in res.configs
    ]
    last = res.configs[-1]
    al = aligned.row("all views", "overall").cosine[last]
    al_o = aligned.factors[[r.factor for r in aligned.factors].index("other grid")].cosine[last]
    rows.append(
        [
            f"grid-aligned views ({last})",
            C.fmt(al, 3),
            C.fmt(al_o, 3),
            C.fmt(above_floor(al, floor), 2),
            C.fmt(bpt[last] / 1024, 0),
        ]
    )
    bank = {c.name: c.cosine for c in res.bank}
    if bank:
        rows.append(
            [
                f"view bank K={k} (its own views)",
                C.fmt(bank["bank grid vs teacher on the bank view (teacher grid)"], 4),
                C.fmt(bank["bank grid vs teacher on the bank view (student grid)"], 4),
                "1.00",
                f"{bank_disk / 1024:.0f}",
            ]
        )
    return rows


def main() -> None:
    args = parse_args()
    from featstore import open_store
    from pipelines.config import MULTI_SCALES

    scales = tuple(MULTI_SCALES)
    if args.drop_largest:
        scales = tuple(s for s in scales if s != max(scales))
    sets = level_sets(scales)
    name = args.teacher
    load0, t_start = os.getloadavg(), time.perf_counter()
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url, times["extract all scales + flip"] = extract(
            f"{tmp}/{name}.zarr", name, args.weights, scales, args
        )
        store = open_store(url)
        n_tiles = int(store.done().sum())
        from pipelines.viewbank import build_view_bank

        t0 = time.perf_counter()
        build_view_bank(
            url,
            [name],
            weights={name: args.weights},
            tiny=args.tiny,
            k=args.bank_k,
            seed=0,
            random_weights=args.random_weights,
            batch_size=args.batch_size,
            device=args.device,
            threads=args.threads,
        )
        times["view bank"] = time.perf_counter() - t0
        bpt = storage(url, name, sets, n_tiles)
        bank_disk = dir_bytes(Path(url) / "teachers" / name / "bank") / n_tiles
        chance = chance_cosine(url, name)
        t0 = time.perf_counter()
        main_res, aligned, facts = run_audits(url, name, args, sets, n_tiles)
        times["audits"] = time.perf_counter() - t0
    cuts = (
        f"{n_tiles} tiles, {args.views} views ({args.aligned_views} grid-aligned), bank "
        f"K={args.bank_k}, scales {list(scales)}"
        + (f" (largest of MULTI_SCALES {list(MULTI_SCALES)} dropped)" if args.drop_largest else "")
        + (", no exact-scale ceiling" if args.no_ceiling else "")
    )
    rows = option_rows(main_res, aligned, bpt, bank_disk, args.bank_k, chance["raw"])
    text = (
        f"Teacher `{name}` ({'weights ' + args.weights if args.weights else 'random init'}"
        f"): {cuts}. Unrelated-token cosine (floor): {chance['raw']:.3f} raw, "
        f"{chance['mean_removed']:.3f} mean removed.\n\n"
        + C.markdown_table(
            [
                "option",
                "cosine (teacher grid)",
                "cosine (student grid)",
                "above floor (teacher grid)",
                "storage KiB/tile",
            ],
            rows,
        )
        + "\n\n"
        + main_res.to_markdown()
        + "\n\nGrid-aligned views:\n\n"
        + aligned.to_markdown()
    )
    print(text)
    short = {"dinov2_vitb14": "dinov2", "clip_vitl14": "clip"}[name]
    C.write_json(
        f"fidelity_vit_{short}{'_tiny' if args.tiny else ''}",
        {
            "teacher": name,
            "weights": args.weights or "random",
            "tiny": args.tiny,
            "audit": main_res.to_dict(),
            "aligned": aligned.to_dict(),
            "markdown": text,
            "seconds": times,
            "total_seconds": time.perf_counter() - t_start,
            "n_tiles": n_tiles,
            "bytes_per_tile": bpt,
            "bank_disk_bytes_per_tile": bank_disk,
            "bank_k": args.bank_k,
            "scales": scales,
            "multi_scales": MULTI_SCALES,
            "cuts": cuts,
            "chance_cosine": chance,
            "teacher_facts": facts,
            "load_avg_start": load0,
            "load_avg_end": os.getloadavg(),
        },
    )


if __name__ == "__main__":
    main()
