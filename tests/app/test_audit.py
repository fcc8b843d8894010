"""Fidelity audit on hand-built cases whose answer is known.

* A store of a tiny ViT teacher: the identity view and the flipped identity against the flipped
  level must give cosine 1 (to fp16 precision).
* An exactly equivariant teacher (a stride-14 patchify conv, no mixing between patches) on views
  drawn on the cached token grid at cached scales: every cached target equals the teacher on the
  view, so cosine 1 whenever the orientation is cached; reading a flipped view from an unflipped
  level (the in-patch pixels are mirrored and the conv kernel is not symmetric) must fall below 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from featcache.audit import AuditError, audit_store
from featstore import TeacherSpec
from pipelines.config import ExtractConfig
from pipelines.extract import run_extraction
from pipelines.synthetic import generate_synthetic
from pipelines.teachers import (
    Teacher,
    TeacherSpecMismatchError,
    create_teacher,
    register_teacher,
    registry,
)

BASE, TILE = 70, 64  # 5x5 tokens of 14 px at scale 1
EQUI = "audit_test_patchify"
FP16_COS = 1 - 1e-4  # fp16 storage: relative error 2**-11 per channel


class PatchifyTeacher(Teacher):
    """A fixed random 14x14 stride-14 conv + GELU: each token sees only its own patch."""

    def __init__(self, base_size: int = BASE) -> None:
        spec = TeacherSpec(
            name=EQUI,
            family="timm",
            arch="test-patchify-14",
            weights=None,
            weights_sha256=None,
            input_size=base_size,
            stride=14,
            channels=8,
            extra=(("snap_to_stride", "1"),),
        )
        super().__init__(spec, base_size)
        self.embed = nn.Conv2d(3, 8, 14, stride=14)
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=gen) * 0.05)
            self.embed.bias.copy_(torch.randn(8, generator=gen) * 0.1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.embed(x)).permute(0, 2, 3, 1)


def _patchify_factory(
    weights: str | None = None, tiny: bool = False, base_size: int = BASE
) -> Teacher:
    return PatchifyTeacher(base_size)


@pytest.fixture(scope="module")
def equi_registered() -> Iterator[str]:
    """Register the test teacher for this module only (other tests iterate the registry)."""
    register_teacher(EQUI)(_patchify_factory)
    yield EQUI
    registry._REGISTRY.pop(EQUI)


def _extract(src: Path, out: Path, teacher: str, tiny: bool) -> str:
    # The patchify test teacher is a fixed random conv: its random weights are accepted.
    cfg = ExtractConfig(
        source=str(src),
        out=str(out),
        tile_size=TILE,
        teachers=(teacher,),
        tiny=tiny,
        random_weights=True,
        base_size=BASE,
        tiles_per_shard=4,
        batch_size=4,
        limit=4,
        scales=(1.0, 2.0),
        flip=True,
    )
    return run_extraction(cfg, progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth"), n_images=1, size=128, seed=5)


@pytest.fixture(scope="module")
def vit_store(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _extract(synth, tmp_path_factory.mktemp("vit") / "s.zarr", "dinov2_vitb14", True)


@pytest.fixture(scope="module")
def equi_store(synth: Path, tmp_path_factory: pytest.TempPathFactory, equi_registered: str) -> str:
    return _extract(synth, tmp_path_factory.mktemp("equi") / "s.zarr", equi_registered, False)


@pytest.fixture(scope="module")
def vit_result(vit_store: str):  # noqa: ANN201
    return audit_store(vit_store, "dinov2_vitb14", tiny=True, n_views=12, seed=3, batch_size=6)


def test_identity_views_match_cached_levels(vit_result) -> None:  # noqa: ANN001
    ident = vit_result.check("identity view vs s1.00")
    flipped = vit_result.check("flipped identity vs s1.00f")
    assert ident.tokens == 4 * 25 and flipped.tokens == 4 * 25
    assert ident.cosine > FP16_COS
    assert flipped.cosine > FP16_COS
    # a ViT is not flip-invariant: reading the unflipped level mirrored is measurably worse
    assert vit_result.check("flipped identity vs s1.00 (mirrored read)").cosine < 0.99


def test_result_has_every_factor_row(vit_result) -> None:  # noqa: ANN001
    # sets of several scales are also reported with the nearest level only (the default blends)
    configs = [
        "s1.00 only",
        "all scales (nearest level)",
        "all scales",
        "all scales + flip (nearest level)",
        "all scales + flip",
    ]
    assert vit_result.configs == configs
    assert vit_result.meta["scale_blend"] == 0.25
    expected = [
        ("all views", "overall"),
        ("rescale", "zoom < 0.75"),
        ("rescale", "0.75 <= zoom < 1.25"),
        ("rescale", "1.25 <= zoom < 1.75"),
        ("rescale", "zoom >= 1.75"),
        ("crop", "part of the tile (S > V)"),
        ("crop", "whole tile (S <= V)"),
        ("flip", "flipped"),
        ("flip", "not flipped"),
        ("cutmix", "all tokens"),
        ("cutmix", "within 1 token of box edge"),
        ("colour", "strong colour on the online view"),
    ]
    other = [("other grid", "student grid (5x5), overall")]
    assert [(r.factor, r.case) for r in vit_result.factors] == expected[:9] + other + expected[9:]
    for r in vit_result.factors:
        assert set(r.cosine) == set(configs)
    overall = vit_result.row("all views", "overall")
    assert overall.views == 12 and overall.tokens > 0
    assert all(-1 <= v <= 1 for v in overall.cosine.values())
    # bins partition the views
    assert sum(vit_result.row("rescale", c).views for _, c in expected[1:5]) == 12
    data = json.loads(vit_result.to_json())
    assert len(data["factors"]) == len(expected) + 1 and len(data["identity"]) == 5
    assert {r["name"] for r in data["references"]} >= {
        "cache at exactly the view's scale (best one-level warp)",
        "colour alone: online clean vs online jittered",
    }
    md = vit_result.to_markdown()
    assert md.count("\n| ") >= 3 + len(expected) + 4
    assert "zoom >= 1.75" in md and "all scales + flip" in md


def test_equivariant_teacher_on_grid_views_gives_one(equi_store: str) -> None:
    teacher = PatchifyTeacher()
    res = audit_store(
        equi_store,
        EQUI,
        teacher=teacher,
        n_views=16,
        seed=0,
        batch_size=8,
        grid_aligned=True,
        level_sets={
            "scales": ["s1.00", "s2.00"],
            "scales + flip": ["s1.00", "s1.00f", "s2.00", "s2.00f"],
        },
    )
    assert res.check("identity view vs s1.00").cosine > FP16_COS
    assert res.check("flipped identity vs s1.00f").cosine > FP16_COS
    flipped, plain = res.row("flip", "flipped"), res.row("flip", "not flipped")
    assert flipped.views > 0 and plain.views > 0
    assert res.row("all views", "overall").cosine["scales + flip"] > FP16_COS
    assert plain.cosine["scales"] > FP16_COS
    # the wrong mapping: flipped views against an unflipped cache
    assert flipped.cosine["scales"] < 0.99
    assert res.check("cache at exactly the view's scale (best one-level warp)").cosine > FP16_COS
    # cached CutMix targets equal token mixing of the online ones: same cosine either way
    cm = res.row("cutmix", "all tokens").cosine["scales + flip"]
    ref = res.check("CutMix token mixing of online targets vs teacher on mixed view").cosine
    assert math.isclose(cm, ref, abs_tol=1e-3)


def test_aligned_views_are_reported_beside_official_views(equi_store: str) -> None:
    """An equivariant teacher: grid-aligned reads are exact, official (off-grid) views are not."""
    res = audit_store(
        equi_store,
        EQUI,
        teacher=PatchifyTeacher(),
        n_views=8,
        seed=4,
        batch_size=8,
        ceiling=False,
        aligned_views=8,
        level_sets={"scales + flip": ["s1.00", "s1.00f", "s2.00", "s2.00f"]},
    )
    aligned = res.check("grid-aligned views (8), scales + flip: exact reads on the token grid")
    assert aligned.cosine > FP16_COS and aligned.tokens > 0
    assert res.row("all views", "overall").cosine["scales + flip"] < 0.99


def test_teacher_with_other_spec_is_refused(vit_store: str) -> None:
    with pytest.raises(TeacherSpecMismatchError, match="differs in"):
        audit_store(vit_store, "dinov2_vitb14", teacher=PatchifyTeacher(), n_views=1)
    with pytest.raises(AuditError, match="lacks"):
        audit_store(vit_store, "dinov2_vitb14", tiny=True, n_views=1, level_sets={"x": ["s0.50"]})


def test_cli_writes_json(vit_store: str, tmp_path: Path) -> None:
    from featcache.cli import main

    out = tmp_path / "audit.json"
    res = CliRunner().invoke(
        main,
        [
            "audit",
            vit_store,
            "--teacher",
            "dinov2_vitb14",
            "--tiny",
            "--views",
            "4",
            "--seed",
            "1",
            "--json",
            str(out),
            "--no-ceiling",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["meta"]["n_views"] == 4 and "identity view vs s1.00" in res.output
    assert "grid-aligned views (2)" in res.output  # half of --views by default
    bad = CliRunner().invoke(main, ["audit", vit_store, "--teacher", "nope", "--tiny"])
    assert bad.exit_code == 1 and "not in" in bad.output


# ----------------------------------------------------------------------------- grids, bank


@pytest.mark.parametrize("grid", ["teacher", "student"])
def test_equivariant_identities_on_each_grid(equi_store: str, grid: str) -> None:
    """Identity, flipped and zoom identity are exact for a teacher with no cross-patch mixing."""
    res = audit_store(
        equi_store,
        EQUI,
        teacher=PatchifyTeacher(),
        n_views=4,
        seed=1,
        batch_size=4,
        grid=grid,
        ceiling=False,
    )
    assert res.meta["grid"] == grid
    for name in (
        "identity view vs s1.00",
        "flipped identity vs s1.00f",
        "zoom identity (S=140, origin crop) vs s2.00",
    ):
        chk = res.check(name)
        assert chk.tokens == 4 * 25 and chk.cosine > FP16_COS, (name, chk)
    assert res.check("flipped identity vs s1.00 (mirrored read)").cosine < 0.99


def test_teacher_grid_compares_raw_teacher_tokens(equi_store: str) -> None:
    """Grid-aligned views on the teacher grid: cached == teacher on the view, token by token."""
    res = audit_store(
        equi_store,
        EQUI,
        teacher=PatchifyTeacher(),
        n_views=8,
        seed=2,
        batch_size=8,
        grid_aligned=True,
        grid="teacher",
        ceiling=False,
        level_sets={"scales + flip": ["s1.00", "s1.00f", "s2.00", "s2.00f"]},
    )
    assert res.meta["grid_n"] == 5
    assert res.row("all views", "overall").cosine["scales + flip"] > FP16_COS


def test_teacher_grid_points_are_the_teacher_token_centres() -> None:
    """Brute force: centre j of a stride-s teacher with P px input on a V px view."""
    from featcache.audit_grid import make_grid

    teacher = create_teacher("timm:tf_efficientnet_lite0", tiny=True, base_size=BASE)
    g = make_grid("teacher", teacher, 70, 5)
    px, s = teacher.input_px(70), teacher.spec.stride
    expect = [(j + 0.5) * s * 70 / px for j in range(teacher.grid_size(70))]
    assert g.centres().tolist() == pytest.approx(expect)
    out = teacher(torch.zeros(1, 3, 70, 70))
    assert out.shape[1] == g.n


def test_view_bank_matches_teacher_on_its_views(
    equi_store: str, tmp_path: Path, equi_registered: str
) -> None:
    """A bank of the equivariant teacher: stored grid == teacher on the re-rendered view."""
    import shutil

    from pipelines.viewbank import build_view_bank

    url = str(tmp_path / "bank.zarr")
    shutil.copytree(equi_store, url)
    build_view_bank(url, [EQUI], k=3, seed=4, batch_size=4, random_weights=True)
    res = audit_store(
        url,
        EQUI,
        teacher=PatchifyTeacher(),
        n_views=2,
        seed=0,
        batch_size=4,
        ceiling=False,
        bank_views=12,
    )
    names = [c.name for c in res.bank]
    assert names == [
        "bank grid vs teacher on the bank view (teacher grid)",
        "bank grid vs teacher on the bank view (student grid)",
    ]
    for c in res.bank:
        assert c.tokens > 0 and c.cosine > FP16_COS, c
    assert "exact view bank" in res.to_markdown()
