"""Teacher spec builder and store-teacher check (issue 13).

The expected specs below are the values every factory produced before the spec builder existed
(recorded from the hand-written ``TeacherSpec(...)`` calls, tiny=True, default weights), so the
builder is pinned against written-out values, not against itself. Store fingerprints hash these
specs: equal specs keep every existing store valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore import LevelSpec, StoreSchema, TeacherEntry, TileRecord, create_store, open_store
from featstore.schema import ResizeSpec, TeacherSpec
from pipelines.teachers import (
    TeacherSpecMismatchError,
    check_store_teacher,
    create_teacher,
    list_teachers,
    teacher_for_store,
)
from pipelines.teachers.spec import NetBuild, teacher_spec
from pipelines.teachers.weights import WeightsSource
from trainer.config import TeacherConfig
from trainer.online import load_teachers

# Registered teachers, tiny=True, weights=None (random init), base_size 518.
REGISTERED = {
    "clip_vitl14": TeacherSpec(
        name="clip_vitl14",
        family="open_clip",
        arch="ViT-L-14[tiny:embed_dim=16,head_width=16,layers=2,width=32].visual",
        weights="random",
        weights_sha256=None,
        input_size=224,
        stride=14,
        channels=32,
        layer="transformer.resblocks[1] residual stream, before ln_post, no proj, CLS dropped",
        resize=ResizeSpec(mode="bilinear", align_corners=True, antialias=False),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        prefix_tokens_dropped=1,
        final_norm=False,
        extra=(
            ("preprocess", "rsmtdf"),
            ("quick_gelu", "1"),
            ("snap_to_stride", "1"),
            ("tiny", "1"),
            ("weights_load", "random"),
        ),
    ),
    "dinov2_vitb14": TeacherSpec(
        name="dinov2_vitb14",
        family="timm",
        arch="vit_base_patch14_dinov2[tiny:depth=2,embed_dim=32,num_heads=2]",
        weights="random",
        weights_sha256=None,
        input_size=518,
        stride=14,
        channels=32,
        layer="blocks[1] + norm, prefix dropped",
        resize=ResizeSpec(mode="bilinear", align_corners=False, antialias=True),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        prefix_tokens_dropped=1,
        final_norm=True,
        extra=(
            ("pos_resample", "dinov2"),
            ("snap_to_stride", "1"),
            ("tiny", "1"),
            ("weights_load", "random"),
        ),
    ),
    "dinov3_vitb16": TeacherSpec(
        name="dinov3_vitb16",
        family="timm",
        arch="vit_base_patch16_dinov3[tiny:depth=2,embed_dim=32,num_heads=2]",
        weights="random",
        weights_sha256=None,
        input_size=512,
        stride=16,
        channels=32,
        layer="blocks[1] + norm, prefix dropped",
        resize=ResizeSpec(mode="bilinear", align_corners=False, antialias=True),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        prefix_tokens_dropped=5,
        final_norm=True,
        extra=(("snap_to_stride", "1"), ("tiny", "1"), ("weights_load", "random")),
    ),
    "efficientnet_lite0": TeacherSpec(
        name="efficientnet_lite0",
        family="timm",
        arch="tf_efficientnet_lite0",
        weights="random",
        weights_sha256=None,
        input_size=518,
        stride=16,
        channels=112,
        layer="feature_info[3] (blocks.4), features_only",
        resize=ResizeSpec(mode="bilinear", align_corners=False, antialias=True),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        prefix_tokens_dropped=0,
        final_norm=False,
        extra=(
            ("feature_index", "3"),
            ("grid_rounding", "ceil"),
            ("pad_to_stride", "1"),
            ("tiny", "1"),
            ("weights_load", "random"),
        ),
    ),
    "sam_vitb": TeacherSpec(
        name="sam_vitb",
        family="timm",
        arch="samvit_base_patch16[tiny:depth=2,embed_dim=32,global_attn_indexes=(1,),neck_chans=16,num_heads=2,window_size=7]",
        weights="random",
        weights_sha256=None,
        input_size=1024,
        stride=16,
        channels=16,
        layer="blocks[1] + neck (conv 1x1, LN2d, conv 3x3, LN2d)",
        resize=ResizeSpec(mode="bilinear", align_corners=False, antialias=True),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        prefix_tokens_dropped=0,
        final_norm=True,
        extra=(("snap_to_stride", "1"), ("tiny", "1"), ("weights_load", "random")),
    ),
}
# The open timm form: the canonical name carries the default feature index.
TIMM_NAMES = {
    "timm:resnet10t:3": TeacherSpec(
        name="timm:resnet10t:3",
        family="timm",
        arch="resnet10t",
        weights="random",
        weights_sha256=None,
        input_size=518,
        stride=16,
        channels=256,
        layer="feature_info[3] (layer3), features_only",
        resize=ResizeSpec(mode="bilinear", align_corners=False, antialias=True),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        prefix_tokens_dropped=0,
        final_norm=False,
        extra=(
            ("feature_index", "3"),
            ("grid_rounding", "ceil"),
            ("tiny", "1"),
            ("weights_load", "random"),
        ),
    ),
    "timm:resnet10t": TeacherSpec(
        name="timm:resnet10t:3",
        family="timm",
        arch="resnet10t",
        weights="random",
        weights_sha256=None,
        input_size=518,
        stride=16,
        channels=256,
        layer="feature_info[3] (layer3), features_only",
        resize=ResizeSpec(mode="bilinear", align_corners=False, antialias=True),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        prefix_tokens_dropped=0,
        final_norm=False,
        extra=(
            ("feature_index", "3"),
            ("grid_rounding", "ceil"),
            ("tiny", "1"),
            ("weights_load", "random"),
        ),
    ),
    "timm:vit_tiny_patch16_224": TeacherSpec(
        name="timm:vit_tiny_patch16_224:1",
        family="timm",
        arch="vit_tiny_patch16_224[tiny:depth=2,embed_dim=32,num_heads=2]",
        weights="random",
        weights_sha256=None,
        input_size=518,
        stride=16,
        channels=32,
        layer="feature_info[1] (blocks.1), features_only",
        resize=ResizeSpec(mode="bilinear", align_corners=False, antialias=True),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        prefix_tokens_dropped=1,
        final_norm=False,
        extra=(
            ("feature_index", "1"),
            ("snap_to_stride", "1"),
            ("tiny", "1"),
            ("weights_load", "random"),
        ),
    ),
}

TILE, BASE = 32, 518


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_teacher_specs_are_unchanged(name: str) -> None:
    assert create_teacher(name, tiny=True).spec == REGISTERED[name]


def test_every_registered_teacher_is_pinned() -> None:
    assert set(list_teachers()) == set(REGISTERED)


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_timm_teacher_specs_are_unchanged(name: str) -> None:
    assert create_teacher(name, tiny=True).spec == TIMM_NAMES[name]


def test_clip_openai_preprocess_changes_only_its_fields() -> None:
    spec = create_teacher("clip_vitl14", tiny=True, preprocess="openai").spec
    expected = REGISTERED["clip_vitl14"]
    assert spec.resize == ResizeSpec(mode="bicubic", align_corners=False, antialias=True)
    assert spec.mean == (0.48145466, 0.4578275, 0.40821073)
    assert spec.std == (0.26862954, 0.26130258, 0.27577711)
    assert spec.extra_dict["preprocess"] == "openai"
    same = ("name", "family", "arch", "weights", "input_size", "stride", "channels", "layer")
    assert all(getattr(spec, k) == getattr(expected, k) for k in same)


def _tiny_dinov2_file(tmp_path: Path) -> Path:
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(create_teacher("dinov2_vitb14", tiny=True).model.state_dict(), path)
    return path


def test_weights_file_fills_provenance_fields(tmp_path: Path) -> None:
    path = _tiny_dinov2_file(tmp_path)
    spec = create_teacher("dinov2_vitb14", weights=str(path), tiny=True).spec
    random = REGISTERED["dinov2_vitb14"]
    assert spec.weights == str(path)
    assert spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.extra_dict == {**random.extra_dict, "weights_load": "by_name"}
    assert spec.layer == random.layer and spec.arch == random.arch


def test_teacher_spec_fills_common_fields_and_keeps_stated_ones() -> None:
    source = WeightsSource("file", "/w/net.pth", "ab" * 32)
    net = NetBuild("arch_x", source, "by_position", True, {"depth": 2, "dim": 8})
    spec = teacher_spec(
        net,
        "t",
        extra={"k": "v"},
        input_size=64,
        stride=8,
        channels=5,
        layer="block 3",
        prefix_tokens_dropped=2,
        final_norm=False,
        mean=(0.5, 0.5, 0.5),
    )
    assert spec == TeacherSpec(
        name="t",
        family="timm",
        arch="arch_x[tiny:depth=2,dim=8]",
        weights="/w/net.pth",
        weights_sha256="ab" * 32,
        input_size=64,
        stride=8,
        channels=5,
        layer="block 3",
        resize=ResizeSpec(mode="bilinear", align_corners=False, antialias=True),
        mean=(0.5, 0.5, 0.5),
        std=(0.229, 0.224, 0.225),
        prefix_tokens_dropped=2,
        final_norm=False,
        extra=(("k", "v"), ("tiny", "1"), ("weights_load", "by_position")),
    )


# ------------------------------------------------------------------ the store's teacher


def _store(path: Path, spec: TeacherSpec, base_size: int = BASE) -> object:
    """A finished one-tile store recording ``spec`` (zero features, random pixels)."""
    schema = StoreSchema(
        "toy", TILE, base_size, ("a",), 255, 1, (TeacherEntry(spec, (LevelSpec(1.0),)),), True
    )
    writer = create_store(
        str(path), schema, [TileRecord("t0", "src", (0, 0, TILE, TILE), "train", "h0")]
    )
    g = spec.grid_size(base_size, base_size)
    rng = np.random.default_rng(0)
    for k in writer.pending_shards():
        writer.write_shard(
            k,
            {spec.name: {"s1.00": np.zeros((1, g, g, spec.channels), "f4")}},
            images=rng.integers(0, 256, (1, TILE, TILE, 3), dtype=np.uint8),
            masks=np.zeros((1, TILE, TILE), np.uint8),
        )
    writer.finalize()
    return open_store(str(path))


def test_teacher_for_store_rebuilds_the_recorded_teacher(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr", REGISTERED["dinov2_vitb14"])
    teacher = teacher_for_store(store, "dinov2_vitb14", tiny=True)
    reference = create_teacher("dinov2_vitb14", tiny=True)
    x = torch.rand(1, 3, BASE, BASE)
    assert teacher.spec == REGISTERED["dinov2_vitb14"]
    assert torch.equal(teacher(x), reference(x))  # the seeded random init: the same network


def test_other_weights_are_refused_naming_the_fields(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr", REGISTERED["dinov2_vitb14"])
    path = _tiny_dinov2_file(tmp_path)
    with pytest.raises(TeacherSpecMismatchError) as err:
        teacher_for_store(store, "dinov2_vitb14", weights=str(path), tiny=True)
    msg = str(err.value)
    assert "differs in extra.weights_load, weights, weights_sha256 (" in msg
    assert "extra.weights_load: stored 'random', built 'by_name'" in msg
    assert "--weights dinov2_vitb14=PATH" in msg and str(store.url) in msg


def test_other_layer_is_refused_naming_the_field(tmp_path: Path) -> None:
    spec = dataclasses.replace(
        REGISTERED["dinov2_vitb14"], layer="blocks[0] + norm, prefix dropped"
    )
    store = _store(tmp_path / "s.zarr", spec)
    with pytest.raises(TeacherSpecMismatchError, match=r"differs in layer \(layer: stored"):
        teacher_for_store(store, "dinov2_vitb14", tiny=True)


def test_given_teacher_on_another_canvas_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr", REGISTERED["dinov2_vitb14"])
    teacher = create_teacher("dinov2_vitb14", tiny=True)
    check_store_teacher(store, "dinov2_vitb14", teacher)  # the same teacher passes
    teacher.base_size = 224
    with pytest.raises(TeacherSpecMismatchError, match="base_size 518"):
        check_store_teacher(store, "dinov2_vitb14", teacher)


def test_online_teachers_are_checked_against_the_store(tmp_path: Path) -> None:
    spec = dataclasses.replace(
        REGISTERED["dinov2_vitb14"], layer="blocks[0] + norm, prefix dropped"
    )
    store = _store(tmp_path / "s.zarr", spec)
    dino = [TeacherConfig("dinov2_vitb14")]
    with pytest.raises(TeacherSpecMismatchError, match="differs in layer"):
        load_teachers(dino, True, torch.device("cpu"), BASE, store=store)
    # without a store, or for a teacher the store does not hold, there is nothing to check
    assert (
        load_teachers(dino, True, torch.device("cpu"), BASE)["dinov2_vitb14"].spec
        == (REGISTERED["dinov2_vitb14"])
    )
    other = load_teachers([TeacherConfig("dinov3_vitb16")], True, "cpu", BASE, store=store)
    assert other["dinov3_vitb16"].spec == REGISTERED["dinov3_vitb16"]


@pytest.fixture(scope="module")
def dino_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six synthetic tiles extracted by the real pipeline with the tiny DINOv2 teacher."""
    from tests.helpers import DINO, build_store

    return build_store(tmp_path_factory.mktemp("dino"), n_images=6, teachers=(DINO,))


def test_online_training_over_a_store_checks_the_teacher(dino_store: str, tmp_path: Path) -> None:
    """The engine hands its store to the online teachers: other weights are refused up front."""
    from tests.helpers import DINO, tiny_config
    from trainer.engine import Trainer

    ids = [t.tile_id for t in open_store(dino_store).tiles]
    cfg = tiny_config(tmp_path, dino_store, ids, [TeacherConfig(DINO)], iters=1)
    cfg.mode = "online"
    assert Trainer(cfg).online[DINO].spec == open_store(dino_store).schema.teacher(DINO).spec
    path = _tiny_dinov2_file(tmp_path)
    cfg.model.teachers = [TeacherConfig(DINO, weights=str(path))]
    with pytest.raises(TeacherSpecMismatchError, match="differs in extra.weights_load, weights,"):
        Trainer(cfg)


@pytest.mark.parametrize("command", ["bank", "audit"])
def test_cli_refuses_other_weights_without_traceback(
    dino_store: str, tmp_path: Path, command: str
) -> None:
    from click.testing import CliRunner

    from featcache.cli import main

    path = _tiny_dinov2_file(tmp_path)
    args = [command, dino_store, "--tiny", "--weights", f"dinov2_vitb14={path}"]
    if command == "audit":
        args += ["--teacher", "dinov2_vitb14", "--views", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert "does not match the spec stored in" in res.output and "Traceback" not in res.output
    assert "differs in extra.weights_load, weights, weights_sha256" in res.output
