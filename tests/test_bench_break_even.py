"""The break-even model of ``bench/break_even.py`` (issue 14) against hand-computed cases.

Step times and break-even throughputs are checked against numbers worked out by hand; bytes per
level against grids counted by hand (ViT-B/14 at 518: 37 tokens a side at scale 1, 74 at scale 2);
the level-count simulation against cases whose count follows from the blend kernel written out.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from featstore.codecs import Float16Codec, Int8Codec, PCACodec
from featstore.constants import MULTI_SCALES
from featstore.schema import LevelSpec, TeacherSpec

_PATH = Path(__file__).resolve().parents[1] / "bench" / "break_even.py"
_spec = importlib.util.spec_from_file_location("bench_break_even", _PATH)
BE = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = BE  # dataclasses resolve string annotations through sys.modules
_spec.loader.exec_module(BE)

SNAP = (("snap_to_stride", "1"),)


def vit(name: str, input_size: int, channels: int) -> TeacherSpec:
    """A ViT/14 spec like the real teachers' (input snapped to the stride)."""
    return TeacherSpec(name, "timm", "vit", None, None, input_size, 14, channels, extra=SNAP)


# ---------------------------------------------------------------------------- the model


def test_step_times_hand_case() -> None:
    # 6.5 TFLOP at 300 TFLOP/s = 21.67 ms; 80 MB at 4 GB/s = 20 ms; student 3 TFLOP = 10 ms
    t = BE.step_times_s(3e12, 6.5e12, 80e6, 300.0, 4.0)
    assert t["online"] * 1e3 == pytest.approx(21.6667, abs=1e-3)
    assert t["read"] * 1e3 == pytest.approx(20.0)
    assert t["student"] * 1e3 == pytest.approx(10.0)
    assert t["cached"] * 1e3 == pytest.approx(20.0)  # reads overlap the 10 ms of compute
    assert t["cached_sum"] * 1e3 == pytest.approx(30.0)


def test_cached_step_is_compute_bound_when_reads_are_fast() -> None:
    t = BE.step_times_s(3e12, 6.5e12, 8e6, 300.0, 4.0)  # 2 ms of reads under 10 ms compute
    assert t["cached"] * 1e3 == pytest.approx(10.0)
    assert t["cached_sum"] * 1e3 == pytest.approx(12.0)


def test_break_even_hand_case() -> None:
    # 80 MB at 4 GB/s feeds 50 steps/s: online 9.5 TFLOP x 50 = 475 TFLOP/s (overlap);
    # teachers 6.5 TFLOP x 50 = 325 TFLOP/s (no overlap)
    be = BE.break_even_tflops(3e12, 9.5e12, 80e6, 4.0)
    assert be == pytest.approx({"overlap": 475.0, "no_overlap": 325.0})
    below = BE.step_times_s(3e12, 9.5e12, 80e6, 470.0, 4.0)
    above = BE.step_times_s(3e12, 9.5e12, 80e6, 480.0, 4.0)
    assert below["cached"] < below["online"] and above["online"] < above["cached"]
    below = BE.step_times_s(3e12, 9.5e12, 80e6, 320.0, 4.0)
    above = BE.step_times_s(3e12, 9.5e12, 80e6, 330.0, 4.0)
    assert below["cached_sum"] < below["online"] and above["online"] < above["cached_sum"]


def test_first_class_above() -> None:
    gpus = [("big", 600.0), ("small", 25.0), ("mid", 150.0)]
    assert BE.first_class_above(100.0, gpus) == "mid"
    assert BE.first_class_above(10.0, gpus) == "small"
    assert BE.first_class_above(600.0, gpus) == "none listed"  # equal: not faster


# ---------------------------------------------------------------------------- FLOPs input


def test_step_flops_scales_the_smallest_batch(tmp_path: Path) -> None:
    runs = [
        {"config": "cached", "batch": 2, "flops": 2_000},
        {"config": "cached", "batch": 1, "flops": 900},
        {"config": "online", "batch": 1, "flops": 1_700},
        {"config": "official", "batch": 1, "flops": 5},
    ]
    path = tmp_path / "train_step.json"
    path.write_text(json.dumps({"runs": runs}))
    f = BE.step_flops(path, batch=8)
    assert (f["cached"], f["online"], f["teachers"]) == (7_200, 13_600, 6_400)


def test_step_flops_missing_run_names_the_command(tmp_path: Path) -> None:
    path = tmp_path / "train_step.json"
    path.write_text(json.dumps({"runs": [{"config": "cached", "batch": 1, "flops": 9}]}))
    with pytest.raises(ValueError, match="'online'.*bench/train_step.py"):
        BE.step_flops(path)
    with pytest.raises(FileNotFoundError, match="bench/train_step.py"):
        BE.step_flops(tmp_path / "absent.json")


# ---------------------------------------------------------------------------- bytes per level


def test_level_bytes_by_hand() -> None:
    dino = vit("dino", 518, 768)
    s2 = LevelSpec(2.0)  # canvas 1036 -> input 1036 -> 74 tokens a side
    assert BE.level_read_bytes(dino, s2, Float16Codec()) == 74 * 74 * 768 * 2
    # int8: one byte a value + float32 (scale, offset) per channel
    assert BE.level_read_bytes(dino, s2, Int8Codec()) == 74 * 74 * 768 + 2 * 768 * 4
    assert BE.level_read_bytes(dino, s2, PCACodec(64)) == 74 * 74 * 64 * 2
    # pca-int8: one byte a coefficient + float32 (scale, offset) per coefficient
    pca_int8 = BE.parse_codec("pca-int8-64")
    assert BE.level_read_bytes(dino, s2, pca_int8) == 74 * 74 * 64 + 2 * 64 * 4
    assert BE.parse_codec("pca-32").k == 32 and BE.parse_codec("pca-32").name == "pca"
    clip = vit("clip", 224, 1024)  # canvas 518 -> 224 px -> 16 a side; 1036 -> 448 -> 32
    assert BE.level_read_bytes(clip, LevelSpec(1.0), Float16Codec()) == 16 * 16 * 1024 * 2
    assert BE.level_read_bytes(clip, s2, Float16Codec()) == 32 * 32 * 1024 * 2


def test_default_layout_tokens_match_issue_count() -> None:
    # issue 14: 20,805 DINOv2-B tokens per tile over the 9 default scales (4 x 37^2 for the
    # zoom < 1 levels on a 518 canvas, then 37^2, 44^2, 52^2, 62^2, 74^2)
    dino = vit("dino", 518, 768)
    tokens = sum(
        BE.level_read_bytes(dino, LevelSpec(s), Float16Codec()) // (768 * 2) for s in MULTI_SCALES
    )
    assert tokens == 4 * 37**2 + 37**2 + 44**2 + 52**2 + 62**2 + 74**2 == 20_805
    cfg = BE.CacheConfig("default", MULTI_SCALES)  # + flipped copies: 2 orientations
    assert BE.tile_bytes({"dino": dino}, cfg) == 2 * 20_805 * 768 * 2


def test_bad_codec_names_the_option() -> None:
    with pytest.raises(ValueError, match="--codecs"):
        BE.parse_codec("zstd")
    with pytest.raises(ValueError, match="--codecs"):
        BE.parse_codec("pca-x")


def test_bad_class_names_the_option() -> None:
    with pytest.raises(SystemExit, match="--gpu NAME=NUMBER"):
        BE._named_floats(["H100"], BE.GPU_CLASSES, "--gpu")
    assert BE._named_floats(["a=b=2"], BE.GPU_CLASSES, "--gpu") == [("a=b", 2.0)]


# ---------------------------------------------------------------------------- level counts


def test_one_scale_no_blend_reads_one_level_per_item() -> None:
    specs = {"a": vit("a", 518, 8), "b": vit("b", 224, 4)}
    cfg = BE.CacheConfig("s1", (1.0,), flip=True, blend=0.0)
    sims = BE.simulate_reads(list(specs), cfg, draws=200, seed=1)
    for view, reads in sims:
        for lvs in reads.values():
            assert lvs == (LevelSpec(1.0, view.flip),)  # orientation matched
    stats = BE.read_stats(specs, cfg, draws=200, seed=1)
    per_item = 37 * 37 * 8 * 2 + 16 * 16 * 4 * 2
    assert stats["levels_per_item"] == {"a": 1.0, "b": 1.0}
    assert stats["bytes_per_item"] == per_item
    assert stats["bytes_per_step"] == 16 * per_item  # 8 labeled + 8 unlabeled items
    assert stats["tile_bytes"] == 2 * per_item


def expected_levels(size: int, width: float) -> int:
    """Levels read with cached renders 518 (s1) and 1036 (s2), from the kernel written out.

    The far render is read when ``exp(-(d_far/w)^2) >= 0.05 * exp(-(d_near/w)^2)``, ``d`` the
    octave distance of the view size to the render; an exact hit reads one level.
    """
    if size == 518:
        return 1
    d = sorted(abs(math.log2(size / r)) for r in (518, 1036))
    return 1 + int(d[1] ** 2 - d[0] ** 2 <= width**2 * math.log(20))


@pytest.mark.parametrize("width", [0.25, 0.6])
def test_two_scale_blend_count_follows_the_kernel(width: float) -> None:
    cfg = BE.CacheConfig("two", (1.0, 2.0), flip=False, blend=width)
    sims = BE.simulate_reads(["a"], cfg, draws=400, seed=2)
    counts = [len(reads["a"]) for _, reads in sims]
    assert counts == [expected_levels(view.size, width) for view, _ in sims]
    assert 1 in counts and 2 in counts  # both cases are exercised
