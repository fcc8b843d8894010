"""Co2S students (issue 17): decoder and student parameter counts against the reference's
measured numbers (design/co2s-reference.md §1.3, §1.5), shapes, the MaskCLIP value path against a
hand computation, the feature-perturbed stream, fine-tuning regimes, weights and SDPA.

Real-size models are built on the meta device (shapes and counts only, no memory, no FLOPs);
forward passes with values use the tiny students (width 64, 4 blocks, 2 heads, patch 16).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from trainer.co2s.clip_backbone import CLIP_ACTIVATIONS, ClipBackbone
from trainer.co2s.decoder import CostVolumeDecoder
from trainer.co2s.student import (
    FINETUNE_REGIMES,
    STUDENT_KINDS,
    Co2SStudent,
    build_co2s_student,
)
from trainer.config import CO2S_CLIP_ACTS, CO2S_FINETUNE
from trainer.student import BackboneWeightsError, RandomBackboneError, StudentConfigError

CROP = 64  # tiny tests: 4x4 tokens, the smallest grid the decoder's 4x4 pooling accepts
TEXT_DIM = 16  # a tiny text tower's width
KINDS = ("clip", "dinov3")
# The official DINOv3 keeps a (masked, always zero) k bias as a parameter in each of the 12
# blocks; timm's _qkvb holds it as a zero buffer, so every count of ours is 12 x 768 lower.
OFFICIAL_K_BIAS = 12 * 768


def count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def tiny(kind: str, k: int = 3, seed: int = 0, **kw: object) -> Co2SStudent:
    torch.manual_seed(seed)
    text = torch.randn(k, TEXT_DIM)
    return build_co2s_student(kind, k, text, size="tiny", crop=CROP, **kw)


def real(kind: str, k: int, crop: int, **kw: object) -> Co2SStudent:
    with torch.device("meta"):
        return build_co2s_student(
            kind, k, torch.zeros(k, 512), crop=crop, random_weights=True, **kw
        )


def image(batch: int = 2, side: int = CROP, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


# -- parameter counts (reference §1.3 / §1.5, measured on the official modules) ---------------

DECODER_PARTS_K = {  # thousands, to the reference's precision
    "conv1": 6.4,
    "aspp": 558.6,
    "skip_proj": 331.8,
    "up1": 160.1,
    "up2": 40.1,
}


@pytest.mark.parametrize("k", [6, 7])
@pytest.mark.parametrize(("embed", "phi_k", "total_m"), [(512, 65.7, 2.217), (768, 98.4, 2.250)])
def test_decoder_parameter_counts_equal_the_reference(
    k: int, embed: int, phi_k: float, total_m: float
) -> None:
    with torch.device("meta"):
        dec = CostVolumeDecoder(embed, (768, 768))
        out = dec(
            torch.empty(1, embed, 32, 32),
            (torch.empty(1, 768, 32, 32), torch.empty(1, 768, 32, 32)),
            torch.empty(1, k, embed),
        )
    assert out.shape == (1, k, 128, 128)  # [B, K, 4h, 4w] at crop 512
    for part, thousands in DECODER_PARTS_K.items():
        assert round(count(getattr(dec, part)) / 1e3, 1) == thousands, part
    assert round(count(dec.layers) / 1e6, 3) == 1.054
    assert round(count(dec.class_proj) / 1e3, 1) == phi_k
    assert count(dec.head) == 289
    assert round(count(dec) / 1e6, 3) == total_m


@pytest.mark.parametrize(
    ("crop", "backbone_m", "student_m"), [(256, 86.24, 88.46), (512, 86.83, 89.05)]
)
def test_clip_student_counts_equal_the_reference(
    crop: int, backbone_m: float, student_m: float
) -> None:
    for k in (6, 7):
        s = real("clip", k, crop)
        assert round(count(s.backbone) / 1e6, 2) == backbone_m
        assert round(count(s.backbone, trainable=True) / 1e6, 2) == 28.35
        assert round(count(s) / 1e6, 2) == student_m
        assert round(count(s, trainable=True) / 1e6, 2) == 30.57
        # the K x 512 text matrix is a buffer: saved, never trained
        assert s.state_dict()["text_embeddings"].shape == (k, 512)


@pytest.mark.parametrize("crop", [256, 512])
def test_dinov3_student_counts_equal_the_reference(crop: int) -> None:
    for k in (6, 7):
        s = real("dinov3", k, crop)
        assert round((count(s.backbone) + OFFICIAL_K_BIAS) / 1e6, 2) == 85.67
        assert round((count(s.backbone, True) + OFFICIAL_K_BIAS) / 1e6, 2) == 28.35
        assert count(s.queries) == k * 768
        assert round((count(s) + OFFICIAL_K_BIAS) / 1e6, 2) == 87.92
        assert round((count(s, True) + OFFICIAL_K_BIAS) / 1e6, 2) == 30.60


def test_co2s_pair_totals_equal_the_reference() -> None:
    for crop, total in ((256, 176.4), (512, 177.0)):
        pair = [real("clip", 6, crop), real("dinov3", 6, crop)]
        assert round((sum(map(count, pair)) + OFFICIAL_K_BIAS) / 1e6, 1) == total
        trainable = sum(count(s, True) for s in pair) + OFFICIAL_K_BIAS
        assert round(trainable / 1e6, 1) == 61.2


# -- shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_real_size_shapes_at_512(kind: str) -> None:
    s = real(kind, 7, 512)
    with torch.device("meta"):
        x = torch.empty(2, 3, 512, 512)
        skip2, skip1, top = s.backbone(x)
        logits = s(x)
        clean, fp = s(x, need_fp=True)
    assert skip2.shape == skip1.shape == (2, 768, 32, 32)
    assert top.shape == (2, 512 if kind == "clip" else 768, 32, 32)
    assert logits.shape == clean.shape == fp.shape == (2, 7, 512, 512)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_shapes_at_64_and_non_square(kind: str) -> None:
    s = tiny(kind, k=5).eval()
    assert s(image()).shape == (2, 5, CROP, CROP)
    assert s(torch.randn(1, 3, 64, 96)).shape == (1, 5, 64, 96)
    with pytest.raises(StudentConfigError, match="multiple of the patch"):
        s(torch.randn(1, 3, 70, 70))
    with pytest.raises(StudentConfigError, match="at least 64 px"):
        s(torch.randn(1, 3, 48, 48))


# -- FLOPs per image (reference §6 [measured], torch FlopCounter; here on the meta device) ------


def gflops(fn: object) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def official_extra_clip_flops(tokens: int, width: int = 768) -> int:
    """FLOPs the official CLIP backbone spends that ours does not (its outputs are unused):
    the last block's ordinary forward (QKV, attention, out-projection, MLP), and in each of the
    three value paths the q/k rows of the in-projection and the out-projection of q and k."""
    n, c = tokens, width
    last_block = 2 * n * c * 3 * c + 4 * n * n * c + 2 * n * c * c + 2 * 2 * n * c * 4 * c
    qk_in_value_paths = 3 * (2 * n * c * 2 * c + 2 * 2 * n * c * c)
    return last_block + qk_in_value_paths


@pytest.mark.parametrize(("k", "fwd", "fwd_bwd"), [(6, 20.4, 60.3), (7, 23.6, 70.1)])
def test_decoder_flops_at_512_equal_the_reference(k: int, fwd: float, fwd_bwd: float) -> None:
    with torch.device("meta"):
        dec = CostVolumeDecoder(512, (768, 768))
        args = (
            torch.empty(1, 512, 32, 32),
            (torch.empty(1, 768, 32, 32), torch.empty(1, 768, 32, 32)),
            torch.empty(1, k, 512),
        )
        assert round(gflops(lambda: dec(*args)), 1) == fwd
        assert round(gflops(lambda: dec(*args).sum().backward()), 1) == fwd_bwd


def test_dinov3_backbone_flops_equal_the_reference() -> None:
    x = torch.empty(1, 3, 512, 512, device="meta")
    dino = real("dinov3", 6, 512).backbone  # attn-only gradients, as measured
    assert round(gflops(lambda: dino(x)), 1) == 215.0
    assert round(gflops(lambda: sum(m.sum() for m in dino(x)).backward()), 1) == 522.5


@pytest.mark.parametrize(("crop", "official"), [(256, 59.3), (512, 265.6)])
def test_clip_backbone_flops_are_the_reference_less_its_unused_work(
    crop: int, official: float
) -> None:
    clip = real("clip", 6, crop).backbone
    ours = gflops(lambda: clip(torch.empty(1, 3, crop, crop, device="meta")))
    extra = official_extra_clip_flops((crop // 16) ** 2 + 1) / 1e9
    assert round(ours + extra, 1) == official


# -- the MaskCLIP value path, by hand -----------------------------------------------------------

ACTS = {
    "quickgelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
}
OPENAI_LN_EPS = 1e-5


def ln(x: torch.Tensor, mod: torch.nn.Module) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + OPENAI_LN_EPS) * mod.weight + mod.bias


def hand_value_path(block: torch.nn.Module, x: torch.Tensor, act: str) -> torch.Tensor:
    """LN1 -> V slice of in_proj -> out_proj -> + x -> (+ MLP(LN2(.))), plain tensor ops."""
    c = x.shape[-1]
    w_in, b_in = block.attn.in_proj_weight, block.attn.in_proj_bias
    v = ln(x, block.ln_1) @ w_in[2 * c :].T + b_in[2 * c :]
    v = v @ block.attn.out_proj.weight.T + block.attn.out_proj.bias + x
    hidden = ACTS[act](ln(v, block.ln_2) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias)
    return v + hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def hand_tokens(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding (conv as unfold + matmul), CLS, position embedding, ln_pre."""
    patches = F.unfold(x, 16, stride=16).transpose(1, 2)  # [B, L, 3*16*16], (c, kh, kw) order
    tokens = patches @ visual.conv1.weight.reshape(visual.conv1.weight.shape[0], -1).T
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    return ln(torch.cat([cls, tokens], dim=1) + visual.positional_embedding, visual.ln_pre)


def as_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_value_path_equals_hand_computation(act: str) -> None:
    torch.manual_seed(0)
    bb = ClipBackbone(STUDENT_KINDS["clip"].sizes["tiny"], CROP, TEXT_DIM, act=act).eval()
    with torch.no_grad():  # non-trivial LN affines and biases, so every term shows
        for p in bb.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = image()
    with torch.no_grad():
        skip2, skip1, top = bb(x)
        blocks = bb.visual.transformer.resblocks
        t0 = hand_tokens(bb.visual, x)
        t1 = blocks[0](t0)  # the residual stream itself is open_clip's (not under test)
        t3 = blocks[2](blocks[1](t1))
        want_top = ln(hand_value_path(blocks[3], t3, act), bb.visual.ln_post) @ bb.visual.proj
        want_top = want_top / want_top.norm(dim=-1, keepdim=True)
    side = CROP // 16
    torch.testing.assert_close(skip2, as_map(hand_value_path(blocks[0], t0, act), side))
    torch.testing.assert_close(skip1, as_map(hand_value_path(blocks[1], t1, act), side))
    torch.testing.assert_close(top, as_map(want_top, side))
    assert bb.blocks == (0, 1, 3)  # tiny's stand-ins for blocks 0, 4, 11 of 12


def test_clip_activation_options_differ_and_unknown_is_refused() -> None:
    x = image()
    outs = [tiny("clip", clip_act=a).eval()(x) for a in ("quickgelu", "gelu")]
    assert not torch.allclose(*outs)
    with pytest.raises(StudentConfigError, match="clip_act"):
        tiny("clip", clip_act="relu")


# -- the feature-perturbed stream ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_need_fp_drops_channels_of_every_map_and_keeps_the_clean_half(kind: str) -> None:
    s = tiny(kind, k=4).eval()
    seen: list[tuple] = []
    s.decoder.register_forward_pre_hook(lambda m, args: seen.append(args))
    x = image()
    with torch.no_grad():
        plain = s(x)
        torch.manual_seed(3)
        clean, fp = s(x, need_fp=True)
    torch.testing.assert_close(clean, plain)
    assert clean.shape == fp.shape == plain.shape
    assert not torch.allclose(fp, plain)
    top, (skip1, skip2), classes = seen[-1]
    b = x.shape[0]
    for m in (top, skip1, skip2):
        assert m.shape[0] == 2 * b
        kept, dropped = m[:b], m[b:]
        zero = dropped.abs().amax(dim=(2, 3)) == 0  # [B, C]: whole channels dropped
        # dropout2d(p=0.5): a channel is zeroed or scaled by 1 / (1 - 0.5) = 2
        torch.testing.assert_close(dropped, torch.where(zero[..., None, None], 0.0, 2 * kept))
        frac = zero.float().mean().item()
        assert 0.2 < frac < 0.8, frac  # p = 0.5 of >= 16 channels x 2 images
    torch.testing.assert_close(classes[:b], classes[b:])


# -- fine-tuning regimes and parameter groups ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_regimes_set_requires_grad(kind: str) -> None:
    for regime, rule in (
        ("attn", lambda n: ".attn." in n),
        ("full", lambda n: True),
        ("frozen", lambda n: False),
    ):
        s = tiny(kind, finetune=regime)
        for name, p in s.backbone.named_parameters():
            assert p.requires_grad == rule(name), (regime, name)
        assert all(p.requires_grad for p in s.decoder.parameters())
    attn = {n for n, p in tiny(kind).backbone.named_parameters() if p.requires_grad}
    # attn: the fused QKV (and the q/v biases of DINOv3) and the out-projection of every block
    suffixes = {n.split(".attn.")[1] for n in attn}
    want = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    if kind == "dinov3":
        want = {"q_bias", "v_bias", "qkv.weight", "proj.weight", "proj.bias"}
    assert suffixes == want
    with pytest.raises(StudentConfigError, match="finetune"):
        tiny(kind, finetune="lora")


def test_clip_last_block_q_and_k_get_zero_gradient() -> None:
    """Reference [measured]: q/k rows of block 11 feed only the unused residual stream."""
    s = tiny("clip", k=2).train()
    s(image(batch=1)).square().mean().backward()
    blocks = s.backbone.visual.transformer.resblocks
    c = blocks[0].attn.in_proj_weight.shape[1]
    for i, blk in enumerate(blocks):
        grad = blk.attn.in_proj_weight.grad
        grad = torch.zeros_like(blk.attn.in_proj_weight) if grad is None else grad
        q, k, v = (grad[j * c : (j + 1) * c].abs().sum().item() for j in range(3))
        assert v > 0, i
        if i == len(blocks) - 1:
            assert q == k == 0
        else:
            assert q > 0 and k > 0, i


@pytest.mark.parametrize("kind", KINDS)
def test_param_groups_cover_exactly_the_trainable_parameters(kind: str) -> None:
    s = tiny(kind)
    groups = s.param_groups(lr_backbone=1e-6, lr_head=1e-3, lr_queries=1e-4, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    want = {"backbone": 1e-6, "head": 1e-3} | ({"queries": 1e-4} if kind == "dinov3" else {})
    assert {n: g["lr"] for n, g in by_name.items()} == want
    assert all(g["base_lr"] == g["lr"] and g["weight_decay"] == 0.01 for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in s.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    assert set(map(id, by_name["head"]["params"])) == set(map(id, s.decoder.parameters()))
    torch.optim.AdamW(groups)  # accepted as is
    defaults = {g["name"]: (g["lr"], g["weight_decay"]) for g in s.param_groups()}
    official = {"backbone": (1e-6, 0.01), "head": (1e-3, 0.01), "queries": (1e-4, 0.01)}
    assert defaults == {n: official[n] for n in defaults}  # reference §2.4
    frozen = tiny(kind, finetune="frozen").param_groups()
    assert "backbone" not in {g["name"] for g in frozen}


def test_config_choices_are_the_model_registries() -> None:
    """trainer.config keeps light copies of the choices (it must not import timm/open_clip);
    they must name exactly the registered regimes and activations, defaults first."""
    assert set(CO2S_FINETUNE) == set(FINETUNE_REGIMES) and CO2S_FINETUNE[0] == "attn"
    assert set(CO2S_CLIP_ACTS) == set(CLIP_ACTIVATIONS) and CO2S_CLIP_ACTS[0] == "quickgelu"


# -- weights policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_base_size_without_weights_is_refused(kind: str) -> None:
    with pytest.raises(RandomBackboneError, match="random_weights=True"):
        build_co2s_student(kind, 6, torch.zeros(6, 512), crop=512)


def test_clip_weights_load_from_a_whole_clip_checkpoint_with_pos_embed_resized(tmp_path) -> None:
    torch.manual_seed(7)
    src = ClipBackbone(STUDENT_KINDS["clip"].sizes["tiny"], 32, TEXT_DIM)  # 2x2 grid
    sd = {f"visual.{k}": v for k, v in src.visual.state_dict().items()}
    sd["token_embedding.weight"] = torch.randn(10, 8)  # text tower keys are not the student's
    path = tmp_path / "clip_b16.pth"
    torch.save(sd, path)
    s = tiny("clip", weights=path)
    got = s.backbone.visual.state_dict()
    for key, value in src.visual.state_dict().items():
        if key != "positional_embedding":
            torch.testing.assert_close(got[key], value, msg=key)
    pos = src.visual.positional_embedding
    grid = pos[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    want = torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]])
    torch.testing.assert_close(got["positional_embedding"], want)

    del sd["visual.ln_post.weight"]
    torch.save(sd, path)
    with pytest.raises(BackboneWeightsError, match=r"clip_b16\.pth.*missing.*ln_post\.weight"):
        tiny("clip", weights=path)
    with pytest.raises(BackboneWeightsError, match="not found"):
        tiny("clip", weights=tmp_path / "absent.pth")


def test_clip_layout_equals_open_clip_vit_b16_image_tower() -> None:
    """The visual.* keys and shapes of open_clip's ViT-B-16 (the OpenAI release layout) are
    exactly the student's, so a real checkpoint loads by name (meta device: no memory)."""
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    theirs = {k[7:]: v.shape for k, v in model.state_dict().items() if k.startswith("visual.")}
    ours = {k: v.shape for k, v in real("clip", 6, 224).backbone.visual.state_dict().items()}
    assert ours == theirs


def test_dinov3_weights_round_trip_and_unexpected_keys_are_named(tmp_path) -> None:
    src = tiny("dinov3", seed=1)
    sd = src.backbone.vit.state_dict()
    path = tmp_path / "dinov3.pth"
    torch.save(sd, path)
    got = tiny("dinov3", seed=2, weights=path).backbone.vit.state_dict()
    for key, value in sd.items():
        torch.testing.assert_close(got[key], value, msg=key)
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(BackboneWeightsError, match=r"dinov3\.pth.*unexpected.*extra\.weight"):
        tiny("dinov3", weights=path)


def test_text_embeddings_are_checked_and_kinds_are_registered() -> None:
    assert set(STUDENT_KINDS) >= set(KINDS)
    with pytest.raises(StudentConfigError, match="featcache text"):
        build_co2s_student("clip", 3, None, size="tiny", crop=CROP)
    with pytest.raises(StudentConfigError, match=r"expected \[3, D\]"):
        build_co2s_student("clip", 3, torch.zeros(4, 16), size="tiny", crop=CROP)
    with pytest.raises(StudentConfigError, match="ViT-B-16 text tower"):
        build_co2s_student("clip", 3, torch.zeros(3, 16), crop=CROP, random_weights=True)
    with pytest.raises(StudentConfigError, match="'clip', 'dinov3'"):
        build_co2s_student("sam", 3, None, size="tiny", crop=CROP)
    # dinov3 ignores the text and uses its own queries
    s = build_co2s_student("dinov3", 3, None, size="tiny", crop=CROP)
    assert s.class_embeddings(2).shape == (2, 3, 64)


# -- SDPA, bf16, checkpointing ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_attention_runs_through_sdpa(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args: object, **kw: object) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    s = tiny(kind).train()
    s(image())
    # CLIP: blocks 0-2 (block 3's own output is unused, so not computed); DINOv3: blocks 0-3;
    # plus the decoder's two class-attention layers
    assert len(calls) == (3 if kind == "clip" else 4) + 2


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointing_gives_the_same_gradients_and_bf16_runs(kind: str) -> None:
    x = image(batch=1)
    grads = []
    for ckpt in (False, True):
        s = tiny(kind, k=2, checkpointing=ckpt, finetune="full").train()
        s(x).square().mean().backward()
        grads.append([p.grad.clone() for p in s.backbone.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(kind, k=2)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, CROP, CROP)
    assert torch.isfinite(out.float()).all()


# -- real weights (opt-in: point the environment variables at local files) --------------------

REAL_CLIP_ENV = "FEATCACHE_CLIP_B16_WEIGHTS"  # the same file the text tower test reads
REAL_DINOV3_ENV = "FEATCACHE_DINOV3_B16_WEIGHTS"


def real_file(env: str, what: str) -> str:
    path = os.environ.get(env)
    if not path or not os.path.isfile(path):
        pytest.skip(f"set {env} to a local {what} file to load the real student weights")
    return path


def test_real_clip_weights_load_strictly_and_block0_value_path_matches() -> None:
    path = real_file(REAL_CLIP_ENV, "OpenAI CLIP ViT-B/16 state dict (open_clip layout)")
    text = F.normalize(torch.randn(6, 512), dim=-1)
    s = build_co2s_student("clip", 6, text, crop=224, weights=path).eval()  # 14x14: no resize
    x = image(1, 224)
    with torch.no_grad():
        skip2 = s.backbone(x)[0]
        want = hand_value_path(
            s.backbone.visual.transformer.resblocks[0],
            hand_tokens(s.backbone.visual, x),
            "quickgelu",
        )
    torch.testing.assert_close(skip2, as_map(want, 14), rtol=1e-4, atol=1e-4)
    at_512 = build_co2s_student("clip", 6, text, crop=512, weights=path)
    assert at_512.backbone.visual.positional_embedding.shape == (32 * 32 + 1, 768)


def test_real_dinov3_weights_load_strictly() -> None:
    path = real_file(REAL_DINOV3_ENV, "DINOv3 ViT-B/16 (Meta .pth or timm state dict)")
    s = build_co2s_student("dinov3", 6, None, crop=512, weights=path).eval()
    with torch.no_grad():
        maps = s.backbone(image(1, 64))
    assert all(torch.isfinite(m).all() for m in maps)
