"""Bytes per 512 px tile with and without stored padding (paper teachers, default levels).

Command: ``python bench/padding_bytes.py`` (a few seconds; the real teachers' specs, random
weights: only the shapes matter). Figures in BENCHMARKS.md §4, "No stored padding".
"""

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
from break_even import (
    ITEMS_PER_STEP,
    TILE,
    CacheConfig,
    parse_codec,
    simulate_reads,
    teacher_specs,  # create_teacher(n, tiny=False, random_weights=True)
)

from featstore import StoreSchema, TeacherEntry
from featstore.constants import DEFAULT_CROP, MULTI_SCALES
from featstore.layout import stored_geometry

MiB = 2**20
specs = teacher_specs()
cfg = CacheConfig("default", MULTI_SCALES, True, 0.25, "fp16")  # 9 scales + flips, blend 0.25
levels = cfg.levels()


def schema(padding: str) -> StoreSchema:
    entries = tuple(TeacherEntry(s, levels) for s in specs.values())
    return StoreSchema("x", TILE, DEFAULT_CROP, teachers=entries, padding_tokens=padding)


kept, cropped = schema("kept"), schema("cropped")


def nbytes(sch, name, lv, codec) -> int:
    """Stored bytes of one level of one tile (uncompressed chunk + float32 codec aux)."""
    g = stored_geometry(sch, specs[name], lv).grid
    aux = codec.aux_shape(specs[name].channels)
    aux_b = int(np.prod(aux)) * 4 if aux is not None else 0
    per_token = codec.stored_channels(specs[name].channels) * np.dtype(codec.stored_dtype).itemsize
    return g * g * per_token + aux_b


print("| teacher | level | render px | canvas grid | stored grid | tokens saved |")
print("|---|---|---:|---:|---:|---:|")
for name in specs:
    for lv in (lv for lv in levels if not lv.flipped):
        gk, gc = (stored_geometry(s, specs[name], lv) for s in (kept, cropped))
        print(
            f"| {name} | {lv.key} (+f) | {gk.render} | {gk.grid}x{gk.grid} | "
            f"{gc.grid}x{gc.grid} | {1 - gc.grid**2 / gk.grid**2:.1%} |"
        )
print("\n| codec | teacher | kept MiB/tile | cropped MiB/tile | saved MiB/tile | saved |")
print("|---|---|---:|---:|---:|---:|")
for cname in ("fp16", "int8", "pca-64", "pca-int8-64"):
    codec, tot = parse_codec(cname), np.zeros(2)
    for name in specs:
        kc = np.array([sum(nbytes(s, name, lv, codec) for lv in levels) for s in (kept, cropped)])
        tot += kc
        print(
            f"| {cname} | {name} | {kc[0] / MiB:.2f} | {kc[1] / MiB:.2f} | "
            f"{(kc[0] - kc[1]) / MiB:.2f} | {1 - kc[1] / kc[0]:.1%} |"
        )
    print(
        f"| {cname} | both | {tot[0] / MiB:.2f} | {tot[1] / MiB:.2f} | "
        f"{(tot[0] - tot[1]) / MiB:.2f} | {1 - tot[1] / tot[0]:.1%} |"
    )
# bytes read per 8+8 step (fp16): the trainer's own view draw and blend, 4096 items
reads = [r for _, r in simulate_reads(list(specs), cfg, 4096, 0, TILE)]
codec = parse_codec("fp16")
for sch in (kept, cropped):
    item = np.mean(
        [sum(nbytes(sch, t, lv, codec) for t, lvs in r.items() for lv in lvs) for r in reads]
    )
    print(f"\nreads per 8+8 step, fp16, {sch.padding_tokens}: {item * ITEMS_PER_STEP / 1e6:.1f} MB")
