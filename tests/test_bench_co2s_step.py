"""The Co2S step benchmark (``bench/co2s_step.py``) counts what a Co2S step computes.

Expected FLOPs are written out from the architecture (co2s-reference §1.1, §1.3; the tiny sizes of
``trainer.co2s.student``): 2 FLOPs per multiply-add of every linear, convolution and matmul,
``4*B*heads*N^2*d`` per attention, nothing for norms, activations, pooling and resizing (as
``FlopCounterMode`` counts). The counter must give the same number in training mode and in the
eval, no-grad mode of Co2S's partner pass, where ``nn.MultiheadAttention`` runs as one fused
inference op that torch counts as 0.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.co2s.student import build_co2s_student

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))  # co2s_step imports its siblings (_common, train_step)
_spec = importlib.util.spec_from_file_location("bench_co2s_step", _BENCH / "co2s_step.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)

B, K, CROP = 2, 3, 64  # 2 images, 3 classes, 4x4 tokens of 16 px
WIDTH, LAYERS, TEXT_DIM = 64, 4, 32  # tiny CLIP tower: width 64, 4 blocks; tiny text rows
READ_BLOCKS = (0, 1, 3)  # value paths read (skip-2, skip-1, top)


def conv(n: int, out_px: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * n * out_px * c_in * c_out * kernel * kernel


def clip_backbone_flops(b: int, g: int, c: int, out_dim: int) -> int:
    """Tiny CLIP tower: patch embedding, the blocks before the last read one, three value paths,
    the projection of the top map (MaskCLIP, co2s-reference §1.1)."""
    tokens = 1 + g * g  # CLS + patches
    patch = conv(b, g * g, 3, c, 16)
    # fused QKV (3 C^2), out-projection (C^2), MLP C -> 4C -> C (8 C^2), and the attention
    block = 2 * b * tokens * c * c * (3 + 1 + 8) + 4 * b * tokens * tokens * c
    # value path: V part of the QKV projection, out-projection, MLP; no attention
    value_path = 2 * b * tokens * c * c * (1 + 1 + 8)
    blocks_run = READ_BLOCKS[-1]  # blocks 0 .. 2 run in full; block 3 only as a value path
    proj = 2 * b * tokens * c * out_dim
    return patch + blocks_run * block + len(READ_BLOCKS) * value_path + proj


def decoder_flops(b: int, k: int, h: int, embed: int, skips: tuple[int, int]) -> int:
    """The cost-volume decoder at its official widths (co2s-reference §1.3): volume 128,
    class projection 128, ASPP rates (6, 12, 18), two class-attention layers (4 heads, pool 4,
    FFN 4 x 128), skip projections to 32 / 16, up-blocks to 64 / 32, a 3x3 head."""
    n, px, c, phi = b * k, h * h, 128, 128
    cost = 2 * b * k * px * embed
    conv1 = conv(n, px, 1, c, 7)
    aspp = conv(n, px, c, c, 1) + 3 * conv(n, px, c, c, 3) + conv(n, 1, c, c, 1)
    aspp += conv(n, px, 5 * c, c, 1)  # fuse of the 4 branches + image pooling
    class_proj = 2 * b * k * embed * phi
    d, seqs = c + phi, b * (h // 4) ** 2  # tokens concat(volume, φ); one sequence per location
    attn_layer = 2 * seqs * k * d * (3 * d + d) + 4 * seqs * k * k * d
    attn_layer += 2 * seqs * k * (d * 4 * c + 4 * c * d)  # FFN
    skip_proj = conv(b, px, skips[0], 32, 3) + conv(b, px, skips[1], 16, 3)
    up1 = conv(n, px, c, c - 32, 2) + conv(n, 4 * px, c, 64, 3) + conv(n, 4 * px, 64, 64, 3)
    up2 = conv(n, 4 * px, 64, 64 - 16, 2) + conv(n, 16 * px, 64, 32, 3)
    up2 += conv(n, 16 * px, 32, 32, 3)
    head = conv(n, 16 * px, 32, 1, 3)
    return cost + conv1 + aspp + class_proj + 2 * attn_layer + skip_proj + up1 + up2 + head


def _tiny_clip_student() -> torch.nn.Module:
    torch.manual_seed(0)
    text = F.normalize(torch.randn(K, TEXT_DIM), dim=1)
    return build_co2s_student("clip", K, text, size="tiny", crop=CROP)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tiny_clip_student_forward_flops_equal_the_hand_count(mode: str) -> None:
    student = getattr(_tiny_clip_student(), mode)()
    x = torch.randn(B, 3, CROP, CROP)
    counter = S.flop_counter()
    with torch.no_grad(), counter:
        student(x)
    g = CROP // 16
    want = clip_backbone_flops(B, g, WIDTH, TEXT_DIM) + decoder_flops(
        B, K, g, TEXT_DIM, (WIDTH, WIDTH)
    )
    assert counter.get_total_flops() == want


def test_native_multi_head_attention_is_counted_like_its_explicit_ops() -> None:
    # eval, no grad, self-attention: nn.MultiheadAttention runs aten._native_multi_head_attention
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 16)
    counter = S.flop_counter()
    with torch.no_grad(), counter:
        mha(x, x, x, need_weights=False)
    ops = {str(op) for ops in counter.get_flop_counts().values() for op in ops}
    assert "aten._native_multi_head_attention" in ops
    proj = 2 * 3 * 5 * 16 * 16 * 4  # q, k, v in-projections and the out-projection
    assert counter.get_total_flops() == proj + 4 * 3 * 5 * 5 * 16


def test_explicit_attention_step_counts_the_same_flops_and_saves_more() -> None:
    # the whole tiny Co2S engine step: attention counted by formula (SDPA) must equal attention
    # run as explicit matmuls, which torch's own matmul formulas count
    fused = S.child("co2s", 1, 0, size="tiny", crop=CROP)
    explicit = S.child("co2s+explicit-attn", 1, 0, size="tiny", crop=CROP)
    assert F.scaled_dot_product_attention is not S.explicit_attention  # patch undone
    assert fused["flops"] > 0
    assert explicit["flops"] == fused["flops"]
    # explicit attention keeps the N x N probabilities for backward
    assert explicit["saved_activation_bytes"] > fused["saved_activation_bytes"]
    assert fused["param_counts"]["all"]["trainable"] < fused["param_counts"]["all"]["total"]
