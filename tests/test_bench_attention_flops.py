"""BENCHMARKS §1 counts attention FLOPs explicitly (issue 12): same figure on every torch version.

torch 2.14's ``FlopCounterMode`` has no formula for the CPU SDPA kernel and counted 0 for it.
``bench/_common.flop_counter`` adds ``4*B*heads*Nq*Nk*d`` per forward (``q @ k^T`` and
``attn @ v``, a multiply-add = 2 FLOPs) and twice that per backward, for every fused kernel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_PATH = Path(__file__).resolve().parents[1] / "bench" / "_common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)

B, H, NQ, NK, D = 2, 3, 10, 7, 8


def qkv(dv: int = D, grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shapes = [(B, H, NQ, D), (B, H, NK, D), (B, H, NK, dv)]
    return tuple(torch.randn(s, generator=g).requires_grad_(grad) for s in shapes)


def count(fn) -> tuple[int, dict]:
    with C.flop_counter() as counter:
        fn()
    flat = {str(op): n for ops in counter.get_flop_counts().values() for op, n in ops.items()}
    return counter.get_total_flops(), flat


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The official (non-SDPA) path: q k^T scaled, softmax, times v."""
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


def test_fused_cpu_kernel_counted_by_hand() -> None:
    q, k, v = qkv()
    total, ops = count(lambda: F.scaled_dot_product_attention(q, k, v))
    assert total == 4 * B * H * NQ * NK * D == 13440
    assert ops == {"aten._scaled_dot_product_flash_attention_for_cpu": 13440}


def test_fused_backward_is_twice_the_forward() -> None:
    q, k, v = qkv(grad=True)
    out = F.scaled_dot_product_attention(q, k, v)
    total, _ = count(lambda: out.sum().backward())
    assert total == 2 * 4 * B * H * NQ * NK * D


def test_value_width_enters_the_av_product() -> None:
    q, k, v = qkv(dv=5)
    total, _ = count(lambda: F.scaled_dot_product_attention(q, k, v))
    assert total == 2 * B * H * NQ * NK * D + 2 * B * H * NQ * NK * 5


@pytest.mark.parametrize("grad", [False, True])
def test_fused_and_explicit_attention_count_the_same(grad: bool) -> None:
    """SDPA rows and the non-SDPA 'official' row of §1 count attention alike."""
    q, k, v = qkv(grad=grad)
    fused, _ = count(lambda: F.scaled_dot_product_attention(q, k, v))
    explicit, ops = count(lambda: explicit_attention(q, k, v))
    assert set(ops) == {"aten.bmm"}  # torch's own matmul formula: an independent count
    assert fused == explicit
    if grad:
        fused_bw, _ = count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
        explicit_bw, _ = count(lambda: explicit_attention(q, k, v).sum().backward())
        assert fused_bw - fused == explicit_bw - explicit == 2 * fused


def test_every_fused_kernel_mapped() -> None:
    names = {str(op) for op in C.attention_flop_mapping()}
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert "aten._scaled_dot_product_efficient_attention" in names
    assert not any("math" in n for n in names)
