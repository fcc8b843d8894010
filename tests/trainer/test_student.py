"""Student network, DPT head, weight loading, parameter groups and EMA (tiny ViT on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from trainer.dpt import DPTHead
from trainer.ema import create_ema, ema_decay, update_ema
from trainer.student import (
    BackboneWeightsError,
    Student,
    StudentConfig,
    StudentConfigError,
    TeacherHead,
    load_backbone_weights,
    param_groups,
)

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}
IMG, CLIP = 70, 42  # 5x5 student grid, 3x3 CLIP-branch grid
TEACHERS = (TeacherHead("dino.b", 24, "full"), TeacherHead("clip", 20, "clip224"))


def tiny_cfg(**over: object) -> StudentConfig:
    kw: dict = dict(
        num_classes=3,
        img_size=IMG,
        layers=(0, 1, 2, 3),
        model_kwargs=dict(TINY),
        teachers=TEACHERS,
        translator_hidden=16,
        clip_size=CLIP,
        features=16,
        out_channels=(8, 16, 16, 32),
        random_weights=True,  # a tiny test backbone: random init is the point
    )
    kw.update(over)
    return StudentConfig(**kw)


@pytest.fixture(scope="module")
def model() -> Student:
    torch.manual_seed(0)
    return Student(tiny_cfg()).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def head_inputs(model: Student, x: torch.Tensor, **kw: object) -> list[torch.Tensor]:
    """The four maps the DPT head receives, captured with a forward pre-hook."""
    seen: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda m, args: seen.extend(args[0]))
    try:
        model(x, **kw)
    finally:
        hook.remove()
    return seen


def tokens(nchw: torch.Tensor) -> torch.Tensor:
    return nchw.flatten(2).transpose(1, 2)


def test_output_shapes(model: Student, x: torch.Tensor) -> None:
    with torch.no_grad():
        out = model(x)
        out_eval = model(x, need_translated=False)
    assert out.logits.shape == (2, 3, IMG, IMG)
    assert out.translated["dino.b"].shape == (2, 5, 5, 24)
    assert out.translated["clip"].shape == (2, 3, 3, 20)
    assert out_eval.translated == {}
    torch.testing.assert_close(out_eval.logits, out.logits)


def test_fusion_matches_hand_computation(model: Student, x: torch.Tensor) -> None:
    bb = model.backbone
    with torch.no_grad():
        levels = bb.forward_intermediates(
            x, indices=[0, 1, 2, 3], norm=True, output_fmt="NCHW", intermediates_only=True
        )
        s = tokens(levels[-1])
        x_small = F.interpolate(x, size=(CLIP, CLIP), mode="bilinear", align_corners=True)
        s_small = tokens(
            bb.forward_intermediates(
                x_small, indices=[3], norm=True, output_fmt="NCHW", intermediates_only=True
            )[0]
        )
        t_d = model.translators["dino_b"](s)
        t_c = model.translators["clip"](s_small)  # [2, 9, 20]
        c = F.interpolate(
            t_c.transpose(1, 2).reshape(2, 20, 3, 3),
            size=(5, 5),
            mode="bilinear",
            align_corners=True,
        )
        fused = 0.8 * s + 0.1 * (
            model.projections["dino_b"](t_d) + model.projections["clip"](tokens(c))
        )
        seen = head_inputs(model, x)
        out = model(x)
    assert len(seen) == 4
    for got, want in zip(seen[:3], levels[:3], strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(tokens(seen[3]), fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.translated["dino.b"], t_d.reshape(2, 5, 5, 24))
    torch.testing.assert_close(out.translated["clip"], t_c.reshape(2, 3, 3, 20))


def test_levels_equal_manual_block_loop(model: Student, x: torch.Tensor) -> None:
    bb = model.backbone
    with torch.no_grad():
        h = bb.norm_pre(bb._pos_embed(bb.patch_embed(x)))
        manual = []
        for blk in bb.blocks:
            h = blk(h)
            manual.append(bb.norm(h)[:, bb.num_prefix_tokens :])
        ref = bb.get_intermediate_layers(x, n=[0, 1, 2, 3], norm=True)
        seen = head_inputs(model, x)
    for got, want, want_ref in zip(seen[:3], manual[:3], ref[:3], strict=True):
        torch.testing.assert_close(tokens(got), want)
        torch.testing.assert_close(tokens(got), want_ref)


def test_no_teachers_feeds_plain_levels() -> None:
    torch.manual_seed(0)
    m = Student(tiny_cfg(teachers=())).eval()
    xx = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        ref = m.backbone.get_intermediate_layers(xx, n=[0, 1, 2, 3], norm=True)
        seen = head_inputs(m, xx)
        assert m(xx).translated == {}
    torch.testing.assert_close(tokens(seen[3]), ref[3])


def test_clip_from_full_runs_one_pass(x: torch.Tensor) -> None:
    m = Student(tiny_cfg(clip_from_full=True)).eval()
    calls: list[int] = []
    m.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = m(x)
    assert len(calls) == 1
    assert out.translated["clip"].shape == (2, 3, 3, 20)


def test_gradients_reach_every_parameter(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    m = Student(tiny_cfg()).train()
    out = m(x)
    loss = out.logits.square().mean() + sum(t.square().mean() for t in out.translated.values())
    loss.backward()
    # Every parameter must get a gradient (DDP without find_unused_parameters relies on it).
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_sdpa_is_used(x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    from timm.layers import set_fused_attn, use_fused_attn

    before = use_fused_attn()
    set_fused_attn(False)  # even when disabled globally, the student turns it on
    try:
        m = Student(tiny_cfg()).eval()
    finally:
        set_fused_attn(before)
    flags = [mod.fused_attn for mod in m.modules() if hasattr(mod, "fused_attn")]
    assert len(flags) == TINY["depth"] and all(flags)
    calls: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def counting(*a: object, **k: object) -> torch.Tensor:
        calls.append(1)
        return sdpa(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        m(x)
    assert len(calls) == 2 * TINY["depth"]  # full pass + CLIP-branch pass


def test_grad_checkpointing_same_loss_and_grads(
    x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    plain = Student(tiny_cfg()).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls: list[int] = []
    orig = torch.utils.checkpoint.checkpoint

    def counting(*a: object, **k: object) -> object:
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    losses = []
    for m in (plain, ckpt):
        out = m(x)
        loss = out.logits.square().mean() + out.translated["clip"].square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == 2 * TINY["depth"]
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_rejects_bad_input_and_config(model: Student) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(StudentConfigError, match="branch"):
        tiny_cfg(teachers=(TeacherHead("a", 4, "half"),))
    with pytest.raises(StudentConfigError, match="out of range"):
        Student(tiny_cfg(layers=(0, 1, 2, 9)))


def test_dpt_head_matches_reference_sizes() -> None:
    head = DPTHead(384, 7)
    # Hand count from the reference: 2.74 M minus the deepest block's unused residual unit.
    proj = 384 * 720 + 720
    resize = (48 * 48 * 16 + 48) + (96 * 96 * 4 + 96) + (384 * 384 * 9 + 384)
    rn = 9 * 64 * 720
    rcu = 2 * (64 * 64 * 9 + 64)
    refine = 3 * (2 * rcu) + rcu + 4 * (64 * 64 + 64)
    out = (64 * 64 * 9 + 64) + (64 * 7 + 7)
    assert sum(p.numel() for p in head.parameters()) == proj + resize + rn + refine + out
    sizes: list[tuple[int, ...]] = []
    for rn_conv in head.layer_rn:
        rn_conv.register_forward_hook(lambda m, a, o: sizes.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        logits = head([torch.randn(1, 384, 37, 37)] * 4, (518, 518))
    assert sizes == [(148, 148), (74, 74), (37, 37), (19, 19)]
    assert logits.shape == (1, 7, 518, 518)


def test_load_backbone_weights_roundtrip(tmp_path) -> None:
    torch.manual_seed(1)
    src = Student(tiny_cfg())
    path = tmp_path / "student.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    torch.manual_seed(2)
    dst = Student(tiny_cfg(backbone_weights=str(path)))
    want, got = src.backbone.state_dict(), dst.backbone.state_dict()
    assert want.keys() == got.keys()
    for name, a in want.items():
        torch.testing.assert_close(a, got[name], msg=name)
    assert not torch.equal(src.head.projects[0].weight, dst.head.projects[0].weight)
    # Original DINOv2 layout (has mask_token, no prefix) goes through timm's converter.
    dinov2 = dict(src.backbone.state_dict(), mask_token=torch.zeros(1, TINY["embed_dim"]))
    torch.save(dinov2, path)
    again = Student(tiny_cfg())
    load_backbone_weights(again, path)
    torch.testing.assert_close(again.backbone.pos_embed, src.backbone.pos_embed)


def test_load_backbone_weights_errors(tmp_path) -> None:
    with pytest.raises(BackboneWeightsError, match="not found"):
        Student(tiny_cfg(backbone_weights=str(tmp_path / "nope.pth")))
    wide = Student(tiny_cfg(model_kwargs={**TINY, "embed_dim": 48}))
    path = tmp_path / "wide.pth"
    torch.save(wide.backbone.state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="do not fit"):
        load_backbone_weights(Student(tiny_cfg()), path)
    torch.save({"blocks.0.foo": torch.zeros(1)}, path)
    with pytest.raises(BackboneWeightsError, match="missing"):
        load_backbone_weights(Student(tiny_cfg()), path)


def test_param_groups(model: Student) -> None:
    groups = param_groups(model, lr=5e-6, lr_multi=40, weight_decay=0.01)
    bb_ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[0]["params"]} == bb_ids
    rest = {id(p) for p in model.parameters()} - bb_ids
    assert {id(p) for p in groups[1]["params"]} == rest
    assert groups[0]["lr"] == 5e-6 and groups[1]["lr"] == pytest.approx(2e-4)
    assert all(g["weight_decay"] == 0.01 for g in groups)


def test_ema_matches_official_recurrence() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    net.register_buffer("running", torch.randn(3))
    ema = create_ema(net)
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    for i in range(6):
        with torch.no_grad():  # stands in for an optimizer step
            for v in net.state_dict().values():
                v.add_(torch.randn_like(v))
        update_ema(ema, net, i)
        ratio = min(1 - 1 / (i + 1), 0.996)
        for k, v in net.state_dict().items():
            ref[k] = ref[k] * ratio + v * (1 - ratio)
        for k, v in ema.module.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-6, msg=f"step {i} {k}")
        if i == 0:  # ratio 0: a plain copy
            for k, v in ema.module.state_dict().items():
                torch.testing.assert_close(v, net.state_dict()[k], rtol=0, atol=0)
    assert all(not p.requires_grad for p in ema.parameters())
    assert [ema_decay(ema, i) for i in (248, 249, 5000)] == [1 - 1 / 249, 0.996, 0.996]
