"""Identity views through compact codecs: the target source's device decode stays within the
codec's stated tolerance of the teacher run on the same view (fp16 stores: see test_engine.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from featstore import open_store
from featstore.schema import LevelSpec
from featviews.draw import identity_view
from featviews.geometry import ViewGeometry
from featviews.render import render_views
from pipelines.teachers import teacher_for_store
from tests.helpers import CROP, DINO, TILE, build_store, warp_source

N_TILES = 4


def _targets_and_teacher(url: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Identity-view targets through the source, the teacher on the rendered views, and the
    per-tile, per-channel value range of the teacher's grid (what int8 quantises over)."""
    st = open_store(url)
    level = LevelSpec(1.0)
    src = warp_source(
        {(DINO, level.key): st.level_geometry(DINO, level.key)}, store=st, levels={DINO: [level]}
    )
    views = [identity_view(TILE, CROP, CROP)] * N_TILES
    batch = src.read_batch(list(range(N_TILES)), views)
    geom = ViewGeometry.from_params(batch["view"])
    grid = st.level_geometry(DINO, level.key).grid
    got, _ = src.stream_targets(DINO, grid, batch, geom)
    teacher = teacher_for_store(st, DINO, tiny=True)
    images = torch.from_numpy(np.stack([st.read_image(i) for i in range(N_TILES)]))
    with torch.no_grad():
        want = teacher(render_views(images.permute(0, 3, 1, 2).contiguous(), geom))
    span = (want.amax(dim=(1, 2)) - want.amin(dim=(1, 2))).numpy()  # [B, C]
    return got, want, span


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for name, codec in (("int8", {"name": "int8"}), ("pca-int8", {"name": "pca-int8", "k": 32})):
        out[name] = build_store(tmp_path_factory.mktemp(name), n_images=N_TILES, codec=codec)
    return out


def test_int8_identity_targets_within_half_a_step(stores: dict[str, Any]) -> None:
    got, want, span = _targets_and_teacher(stores["int8"])
    step = span / 255.0  # the codec's per tile, per channel quantisation step
    err = (got - want).abs().amax(dim=(1, 2)).numpy()
    assert (err <= step / 2 + 1e-5).all(), float((err - step / 2).max())
    assert float((got - want).abs().max()) > 0  # it did go through the quantiser


def test_pca_int8_identity_targets_within_the_codec_bound(stores: dict[str, Any]) -> None:
    """k = the tiny teacher's 32 channels: PCA is exact, so what remains is the int8 step of
    the coefficients, ||err|| <= ||scale|| / 2 per token (the codec's stated tolerance)."""
    url = stores["pca-int8"]
    st = open_store(url)
    assert st.schema.teacher(DINO).spec.channels == 32
    got, want, _ = _targets_and_teacher(url)
    _, aux = st.read_batch_encoded(DINO, list(range(N_TILES)), "s1.00")
    scale = np.linalg.norm(aux[:, 0, :], axis=-1)  # per tile, over the k coefficients
    err = (got - want).norm(dim=-1).amax(dim=(1, 2)).numpy()
    assert (err <= scale / 2 + 1e-4).all(), (err, scale / 2)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert float(cos.min()) > 0.99
