"""The storage planner (`featcache plan`): budgets, bytes per tile, the choice, its YAML.

Tiny DINOv2 teacher (32 channels, patch 14) on 4 synthetic 64-px tiles rendered at base 70:
the scale-1 level is 5 x 5 tokens. Hand counts below use those numbers only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.plan import (
    Candidate,
    PlanError,
    choose,
    codec_level_cosines,
    level_bytes,
    mark_frontier,
    parse_budget,
    plan_storage,
)
from featstore import open_store
from pipelines.config import ExtractConfig
from pipelines.synthetic import generate_synthetic

TEACHER = "dinov2_vitb14"
CH = 32  # tiny ViT embed_dim (pipelines/teachers/timm_vit.py TINY_VIT)
G1 = 5  # 70 px / 14 px
PCA_KS = (8, 16)
SIZES = ["--tile-size", "64", "--base-size", "70"]
COMMON = ["--teacher", TEACHER, "--tiny", *SIZES, "--tiles", "4", "--views", "4", "-q"]

# Hand counts, bytes per tile of "scale 1 only" (one 5x5 level):
S1_FP16 = G1 * G1 * CH * 2  # 1600
S1_INT8 = G1 * G1 * CH + 2 * CH * 4  # int8 tokens + float32 (scale, offset) per channel = 1056
S1_PCA8 = G1 * G1 * 8 + 2 * 8 * 4  # 264
S1_PCA16 = G1 * G1 * 16 + 2 * 16 * 4  # 528
# "3 scales + flip" (0.5, 1, 2, each flipped too): s0.50 keeps its padded 70-px canvas (5x5),
# s2.00 renders 140 px (10x10).
S3_TOKENS = 2 * (G1 * G1 + G1 * G1 + 10 * 10)
S3_FP16 = S3_TOKENS * CH * 2  # 19200
S3_PCA8 = S3_TOKENS * 8 + 6 * 2 * 8 * 4  # 2784


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth"), n_images=1, size=128, seed=5)


@pytest.fixture(scope="module")
def plan(synth: Path) -> Any:
    base = ExtractConfig(
        source=str(synth), out="x", teachers=(TEACHER,), tiny=True, tile_size=64, base_size=70
    )
    return plan_storage(base, budget=2**30, tiles=4, views=4, pca_ks=PCA_KS, seed=1)


def _find(plan: Any, level_set: str, codec: str, blend: float = 0.0) -> Candidate:
    return next(
        c
        for c in plan.candidates
        if (c.level_set, c.codec_text, c.blend) == (level_set, codec, blend)
    )


# --- budget text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [("8MiB", 8 * 2**20), ("512KiB", 512 * 1024), ("1.5GiB", 3 * 2**29), ("4096B", 4096)],
)
def test_budget_parsing(text: str, want: int) -> None:
    assert parse_budget(text) == want


@pytest.mark.parametrize("text", ["8", "8MB", "lots", "0MiB", "-1MiB", "8 Mib"])
def test_bad_budget_names_the_option_and_the_form(text: str) -> None:
    with pytest.raises(PlanError, match=r"--budget .*(MiB|positive)"):
        parse_budget(text)


# --- bytes, frontier and choice on hand-built numbers --------------------------------------------


def test_level_bytes_are_a_hand_count() -> None:
    assert level_bytes(G1, CH, {"name": "fp16"}) == 1600 == S1_FP16
    assert level_bytes(G1, CH, {"name": "int8"}) == 1056 == S1_INT8
    assert level_bytes(G1, CH, {"name": "pca-int8", "k": 8}) == 264 == S1_PCA8


def test_tile_bytes_sum_levels_and_teachers() -> None:
    """Two teachers (5x5 x 32 ch and 3x3 x 16 ch at s1.00; s2.00 twice the side), int8."""
    from types import SimpleNamespace

    from featcache.plan import tile_bytes

    specs = {"a": (32, 5), "b": (16, 3)}

    class Store:
        schema = SimpleNamespace(
            teachers=[
                SimpleNamespace(spec=SimpleNamespace(name=n, channels=c))
                for n, (c, _) in specs.items()
            ]
        )

        def level_geometry(self, name: str, key: str) -> Any:
            g = specs[name][1]
            return SimpleNamespace(grid=2 * g if key == "s2.00" else g)

    want = (25 + 100) * 32 + 2 * (2 * 32 * 4) + (9 + 36) * 16 + 2 * (2 * 16 * 4)
    assert tile_bytes(Store(), ["s1.00", "s2.00"], {"name": "int8"}) == want == 5488


def _cand(name: str, nbytes: int, cos: float) -> Candidate:
    c = Candidate(name, (1.0,), False, 0.0, {"name": "fp16"}, nbytes)
    c.cosine = cos
    return c


def test_frontier_and_choice_on_a_hand_built_set() -> None:
    a, b, c = _cand("a", 100, 0.70), _cand("b", 200, 0.80), _cand("c", 300, 0.75)
    d, e = _cand("d", 400, 0.90), _cand("e", 400, 0.85)
    cands = mark_frontier([a, b, c, d, e])
    assert [x.on_frontier for x in cands] == [True, True, False, True, False]
    assert choose(cands, 99) is None
    assert choose(cands, 250) is b
    assert choose(cands, 399) is b  # c costs more and keeps less
    assert choose(cands, 10**6) is d
    tie = _cand("f", 150, 0.80)  # same cosine as b, fewer bytes
    assert choose([b, tie], 10**6) is tie


def test_pca_codec_cosine_on_rank_two_data() -> None:
    """Tokens in a 2-D subspace: pca-int8:2 keeps them (int8 steps only), pca-int8:1 does not."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 2)))[0]
    tiles = [(rng.normal(size=(4, 4, 2)) @ basis.T + 3.0).astype(np.float32) for _ in range(4)]

    class Store:
        def done(self) -> np.ndarray:
            return np.ones(4, bool)

        def read(self, name: str, i: int, key: str) -> np.ndarray:
            return tiles[i]

    full = codec_level_cosines(Store(), "t", {"name": "pca-int8", "k": 2}, ["s1.00"])
    one = codec_level_cosines(Store(), "t", {"name": "pca-int8", "k": 1}, ["s1.00"])
    (s2, n2), (s1, n1) = full["s1.00"], one["s1.00"]
    assert n2 == n1 == 2 * 16  # tiles 2 and 3 scored (0 and 1 fitted), 16 tokens each
    assert s2 / n2 > 0.9999
    assert s1 / n1 < 0.999


# --- the planner on a real sample ----------------------------------------------------------------


def test_bytes_per_tile_equal_hand_counts(plan: Any) -> None:
    assert _find(plan, "scale 1 only", "fp16").bytes_per_tile == S1_FP16
    assert _find(plan, "scale 1 only", "int8").bytes_per_tile == S1_INT8
    assert _find(plan, "scale 1 only", "pca-int8:16").bytes_per_tile == S1_PCA16
    assert _find(plan, "3 scales + flip", "fp16", 0.25).bytes_per_tile == S3_FP16
    assert _find(plan, "3 scales + flip", "pca-int8:8").bytes_per_tile == S3_PCA8


def test_candidates_cover_the_grid(plan: Any) -> None:
    got = {(c.level_set, c.blend, c.codec_text) for c in plan.candidates}
    codecs = ["fp16", "int8", "pca-int8:8", "pca-int8:16"]  # 64+ exceed 32 channels: skipped
    want = {("scale 1 only", 0.0, k) for k in codecs}
    for s in ("9 scales + flip", "5 scales + flip", "3 scales + flip"):
        want |= {(s, b, k) for b in (0.25, 0.0) for k in codecs}
    assert got == want


def test_codec_loss_orders_the_codecs(plan: Any) -> None:
    """The least lossy codec keeps the most (same levels, same audit views)."""
    fp16, int8 = _find(plan, "scale 1 only", "fp16"), _find(plan, "scale 1 only", "int8")
    pca8 = _find(plan, "scale 1 only", "pca-int8:8")
    assert fp16.codec_cosine > 1 - 1e-5  # fp16 rounding only
    assert fp16.codec_cosine >= int8.codec_cosine > pca8.codec_cosine
    assert fp16.cache_cosine == int8.cache_cosine == pca8.cache_cosine  # codec-free audit
    # the sample is fp16: its fp16 re-encoding is exact, so measured = the cache cosine
    assert fp16.cosine == fp16.cache_cosine
    # measured, int8's steps are noise around fp16 (either side: they can move a token's
    # direction towards the teacher's as well as away); PCA-8 of 32 channels loses clearly
    assert abs(int8.cosine - fp16.cosine) < 1e-4
    assert int8.cosine > pca8.cosine + 1e-3
    for c in (fp16, int8, pca8):  # the product rule, written out
        assert c.estimate == pytest.approx(c.cache_cosine * c.codec_cosine, abs=1e-12)


def test_budget_fitting_only_scale_one_chooses_it(plan: Any) -> None:
    # every "scale 1 only" fits 2000 B; the smallest other set needs S3_PCA8 = 2784 B
    best = choose(plan.candidates, 2000)
    assert best.level_set == "scale 1 only" and best.bytes_per_tile <= S1_FP16
    # measured, fp16 and int8 keep the same up to int8's steps (noise either side); PCA-8/16 of
    # the 32 channels lose clearly, so one of the two lossless codecs wins
    assert best.codec_text in ("fp16", "int8")
    assert best.cosine >= _find(plan, "scale 1 only", "fp16").cosine - 1e-4


def test_budget_fitting_everything_chooses_the_highest_cosine(plan: Any) -> None:
    best = choose(plan.candidates, 2**30)
    assert best.cosine == max(c.cosine for c in plan.candidates)
    assert best.on_frontier
    # a lossless codec on the level set whose cache (the fp16 audit, codec-free) is best
    assert best.codec_text in ("fp16", "int8")
    assert best.cache_cosine == max(c.cache_cosine for c in plan.candidates)


# --- the command: table, files, YAML for extract --config, refusal -------------------------------


def test_plan_writes_a_config_that_extract_builds(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    args = ["plan", str(synth), *COMMON, "--pca-k", "8,16", "--budget", "600B", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "| configuration | MiB/tile |" in res.output
    # within 600 B only pca-int8:8 (264 B) and :16 (528 B) of scale 1 fit; 16 keeps more
    assert "best under the budget: scale 1 only, blend 0, pca-int8:16" in res.output
    assert (out / "frontier.png").stat().st_size > 0
    saved = json.loads((out / "plan.json").read_text())
    assert saved["best"] == "scale 1 only, blend 0, pca-int8:16"
    store = tmp_path / "s.zarr"
    res = CliRunner().invoke(
        main, ["extract", "--config", str(out / "extract.yaml"), str(synth), str(store), "-q"]
    )
    assert res.exit_code == 0, res.output
    (entry,) = open_store(str(store)).schema.teachers
    assert [lv.key for lv in entry.levels] == ["s1.00"]
    assert entry.codec == {"name": "pca-int8", "k": 16}
    assert open_store(str(store)).level_geometry(TEACHER, "s1.00").grid == G1


def test_nothing_fits_names_the_smallest(synth: Path, tmp_path: Path) -> None:
    args = ["plan", str(synth), *COMMON, "--pca-k", "8,16", "--budget", "100B"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "p")])
    assert res.exit_code == 1
    assert "nothing fits --budget 100 B" in res.output
    assert f"scale 1 only, blend 0, pca-int8:8, needs {S1_PCA8} B" in res.output
    assert not (tmp_path / "p" / "extract.yaml").exists()


def test_bad_budget_fails_before_any_work(synth: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["plan", str(synth), *COMMON, "--budget", "8MB", "--out", str(tmp_path / "p")]
    )
    assert res.exit_code == 1
    assert "--budget '8MB'" in res.output and "MiB" in res.output
    assert not (tmp_path / "p").exists()
