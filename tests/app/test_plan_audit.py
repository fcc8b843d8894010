"""The planner's codec-and-cache cosine is a measurement: the audit re-encodes the sample store.

Teachers here are linear patchify maps of known rank (a 14x14 stride-14 conv to ``RANK``
channels, then a fixed linear map to ``CH`` channels): every token, padding included, lies in a
``RANK``-dimensional affine subspace, so PCA with k >= RANK keeps the tokens up to int8 steps and
k < RANK does not. Tiles: 64 px rendered at base 70, 5 x 5 tokens at scale 1.

* Identity views: the audit's codec+cache cosine equals the cosine of the codec round trip of
  the stored tokens, written out here with numpy, against the teacher run on the tile.
* The planner on a store whose best configuration is known picks it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featcache.audit import AuditError, audit_store, config_label
from featcache.plan import choose, plan_storage
from featstore import TeacherSpec, get_codec, open_store
from featstore.errors import CodecError
from featviews.draw import ViewParams
from pipelines.config import ExtractConfig
from pipelines.extract import run_extraction
from pipelines.synthetic import generate_synthetic
from pipelines.teachers import Teacher, register_teacher, registry

BASE, TILE, G1, CH = 70, 64, 5, 16
FULL, LOW = "plan_audit_full_rank", "plan_audit_rank4"
RANK = 4


class LinearPatchTeacher(Teacher):
    """Fixed random linear patchify of rank ``rank``: tokens in a rank-dim affine subspace."""

    def __init__(self, name: str, rank: int, base_size: int = BASE) -> None:
        spec = TeacherSpec(
            name=name,
            family="timm",
            arch=f"test-linear-patch-rank{rank}",
            weights=None,
            weights_sha256=None,
            input_size=base_size,
            stride=14,
            channels=CH,
            extra=(("snap_to_stride", "1"),),
        )
        super().__init__(spec, base_size)
        self.embed = nn.Conv2d(3, rank, 14, stride=14)
        self.lift = nn.Linear(rank, CH)
        gen = torch.Generator().manual_seed(99 + rank)
        with torch.no_grad():
            for p in (*self.embed.parameters(), *self.lift.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.lift(self.embed(x).permute(0, 2, 3, 1))


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    """Both test teachers, for this module only (other tests iterate the registry)."""
    for name, rank in ((FULL, CH), (LOW, RANK)):

        def factory(
            weights: str | None = None, tiny: bool = False, base_size: int = BASE, _r=rank, _n=name
        ) -> Teacher:
            return LinearPatchTeacher(_n, _r, base_size)

        register_teacher(name)(factory)
    yield
    for name in (FULL, LOW):
        registry._REGISTRY.pop(name)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth"), n_images=1, size=128, seed=7)


def _config(synth: Path, teacher: str, out: str = "x", **kw: object) -> ExtractConfig:
    # the test teachers are fixed random maps: their random weights are accepted
    return ExtractConfig(
        source=str(synth),
        out=out,
        teachers=(teacher,),
        random_weights=True,
        tile_size=TILE,
        base_size=BASE,
        **kw,
    )


@pytest.fixture(scope="module")
def full_store(synth: Path, registered: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("full") / "s.zarr")
    cfg = _config(synth, FULL, out, scales=(1.0,), flip=False, limit=4, tiles_per_shard=4)
    return run_extraction(cfg, progress=False)


# --- hand computation ----------------------------------------------------------------------------


def _int8_round_trip(x: np.ndarray) -> np.ndarray:
    """Per channel over one tile's tokens: 256 levels from min to max (featstore int8)."""
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    step = (hi - lo) / 255.0
    q = np.clip(np.rint((x - lo) / np.where(step > 0, step, 1.0)), 0, 255)
    return q * step + lo


def _pca_basis(tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-k right singular vectors of the centred tokens ``[m, C]``."""
    mean = tokens.mean(axis=0)
    _, _, vt = np.linalg.svd(tokens - mean, full_matrices=False)
    return mean, vt[:k].T


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, CH), b.reshape(-1, CH)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_identity_views_measure_the_codec_round_trip_by_hand(full_store: str) -> None:
    """Identity views of tiles 2 and 3, PCA fitted on tiles 0 and 1's scale-1 tokens."""
    store = open_store(full_store)
    teacher = LinearPatchTeacher(FULL, CH)
    fit, scored = [0, 1], [2, 3]
    x64 = {i: store.read(FULL, i, "s1.00").astype(np.float64) for i in range(4)}
    mean, basis = _pca_basis(np.concatenate([x64[i].reshape(-1, CH) for i in fit]), 6)
    pca6 = get_codec({"name": "pca-int8", "k": 6})
    pca6.fit(np.concatenate([store.read(FULL, i, "s1.00").reshape(-1, CH) for i in fit]))
    codecs = {"int8": get_codec("int8"), "pca-int8:6": pca6}
    identity = ViewParams(BASE, 0, 0, False, TILE, BASE)
    res = audit_store(
        full_store,
        FULL,
        teacher=teacher,
        level_sets={"s1": ["s1.00"]},
        codecs=codecs,
        tiles=scored,
        views=[(i, identity) for i in scored],
        ceiling=False,
        bank_views=0,
        scale_blend=0.0,
    )
    row = res.row("all views", "overall")
    assert row.views == 2 and row.tokens == 2 * G1 * G1

    # the teacher on each whole tile at base size: the identity view's tokens, untouched
    with torch.no_grad():
        img = torch.from_numpy(np.stack([store.read_image(i) for i in scored])).float() / 255
        img = F.interpolate(
            img.permute(0, 3, 1, 2), size=BASE, mode="bilinear", align_corners=False, antialias=True
        )
        online = teacher(img).double().numpy()
    want_int8 = np.concatenate(
        [_cosines(_int8_round_trip(x64[i]), online[b]) for b, i in enumerate(scored)]
    ).mean()
    pca_hat = [
        _int8_round_trip((x64[i] - mean) @ basis) @ basis.T + mean for i in scored
    ]  # coefficients quantised per tile and component, then back-projected
    want_pca = np.concatenate([_cosines(pca_hat[b], online[b]) for b in range(2)]).mean()
    got = row.cosine
    assert got[config_label("s1", "int8")] == pytest.approx(want_int8, abs=1e-6)
    assert got[config_label("s1", "pca-int8:6")] == pytest.approx(want_pca, abs=1e-6)
    # full rank 16 in 6 components: a loss the audit must see
    assert want_pca < 0.99 < want_int8


def test_views_come_from_the_tiles_given_only(full_store: str) -> None:
    res = audit_store(
        full_store,
        FULL,
        teacher=LinearPatchTeacher(FULL, CH),
        n_views=6,
        level_sets={"s1": ["s1.00"]},
        tiles=[3],
        ceiling=False,
        bank_views=0,
        identity_tiles=1,
    )
    assert res.meta["view_tiles"] == [3]
    with pytest.raises(AuditError, match="not done tiles"):
        audit_store(full_store, FULL, teacher=LinearPatchTeacher(FULL, CH), tiles=[9])


def test_unfitted_pca_candidate_is_refused(full_store: str) -> None:
    with pytest.raises(CodecError, match="not fitted"):
        audit_store(
            full_store,
            FULL,
            teacher=LinearPatchTeacher(FULL, CH),
            n_views=2,
            codecs={"pca-int8:4": get_codec({"name": "pca-int8", "k": 4})},
            ceiling=False,
            bank_views=0,
        )


# --- the planner on a store whose best configuration is known -----------------------------------


@pytest.fixture(scope="module")
def low_rank_plan(synth: Path, registered: None):  # noqa: ANN201
    base = _config(synth, LOW)
    return plan_storage(base, budget=2**30, tiles=4, views=6, pca_ks=(2, 4, 8), seed=2)


def test_pca_at_the_rank_measures_as_lossless(low_rank_plan) -> None:  # noqa: ANN001
    by = {(c.level_set, c.blend, c.codec_text): c for c in low_rank_plan.candidates}
    for (label, blend, codec), c in by.items():
        fp16 = by[(label, blend, "fp16")]
        if codec in ("pca-int8:4", "pca-int8:8", "int8"):  # rank 4: int8 steps only
            assert abs(c.cosine - fp16.cosine) < 1e-3, (label, blend, codec)
        elif codec == "pca-int8:2":  # half the subspace dropped
            assert c.cosine < fp16.cosine - 1e-2, (label, blend, codec)


def test_planner_picks_the_known_best(low_rank_plan) -> None:  # noqa: ANN001
    """Bytes of scale 1 (5x5 tokens, 16 channels): pca-int8:2 = 25*2 + 2*2*4 = 66 B,
    pca-int8:4 = 132 B, pca-int8:8 = 264 B, int8 = 528 B; the next set needs far more. Within
    200 B, k = 4 is the cheapest lossless codec of a rank-4 teacher and must win over k = 2."""
    best = choose(low_rank_plan.candidates, 200)
    assert (best.level_set, best.codec_text, best.bytes_per_tile) == (
        "scale 1 only",
        "pca-int8:4",
        25 * 4 + 2 * 4 * 4,
    )
    # within 100 B only k = 2 fits
    assert choose(low_rank_plan.candidates, 100).codec_text == "pca-int8:2"
    # the product rule's estimate is reported beside every measurement
    assert all(c.estimate == c.estimate for c in low_rank_plan.candidates)
