"""Shared helpers of the benchmark scripts: machine facts, tables, JSON output, subprocess runs.

Every benchmark prints a markdown table and writes ``bench/out/<name>.json`` holding the
machine description, the command line and the raw measurements, so BENCHMARKS.md can be
regenerated and checked against the files.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"
LOVEDA = Path(os.environ.get("FEATCACHE_LOVEDA", "/work/shared/data/loveda-sample"))
MIB = 1024.0**2
GIB = 1024.0**3

if str(ROOT) not in sys.path:  # `python bench/x.py` from the repository root
    sys.path.insert(0, str(ROOT))


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, GPU (if any) and library versions of this run."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / GIB, 1)
    except ImportError:
        info["ram_gib"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells formatted with ``str``)."""
    lines = [
        "| " + " | ".join(str(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/out/<name>.json`` with the machine and command line added."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2, default=_jsonable))
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls of ``fn``."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class PeakRSS:
    """Peak resident memory of this process: psutil sampled every 5 ms and ``ru_maxrss``.

    Run each configuration in a fresh process: ``ru_maxrss`` never goes down, so peaks of two
    configurations measured in one process would mix.
    """

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def ru_maxrss() -> int:
        """Kernel-tracked peak RSS of this process in bytes (Linux reports KiB)."""
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def current(self) -> int:
        """RSS now, in bytes."""
        return int(self._proc.memory_info().rss)


def run_child(script: Path, args: Sequence[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python script args`` in a fresh process; it prints one JSON line last.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(last)


def attention_flops(q: Sequence[int], k: Sequence[int], v: Sequence[int]) -> int:
    """FLOPs of one attention forward from the shapes ``[B, heads, N, d]`` of q, k, v.

    ``q @ k^T`` and ``softmax @ v`` are ``B*heads*Nq*Nk*d`` multiply-adds each, 2 FLOPs per
    multiply-add: ``4*B*heads*N^2*d`` for self-attention. Softmax and scaling are not counted,
    as for the explicit (non-SDPA) matmul path.
    """
    b, h, nq, d = q[-4:]
    return 2 * b * h * nq * k[-2] * d + 2 * b * h * nq * k[-2] * v[-1]


def _attention_forward(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    return attention_flops(query, key, value)


def _attention_backward(grad: Any, query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    # dQ, dK from dScores; dV, dScores from dOut: twice the forward, as autograd's backward of the
    # two explicit matmuls (torch's own SDPA formulas add a recomputation of the scores; we don't,
    # so SDPA and non-SDPA attention count the same)
    return 2 * attention_flops(query, key, value)


def native_mha_flops(
    query: Sequence[int], key: Sequence[int], embed_dim: int, num_heads: int
) -> int:
    """FLOPs of ``aten._native_multi_head_attention`` from batch-first ``[B, L, E]`` shapes.

    The q, k, v in-projections and the out-projection (``2*B*L*E^2`` each, k and v over the key
    length) plus the attention of :func:`attention_flops`.
    """
    b, lq, lk = query[-3], query[-2], key[-2]
    q, kv = (b, num_heads, lq, embed_dim // num_heads), (b, num_heads, lk, embed_dim // num_heads)
    proj = 2 * b * embed_dim * embed_dim * (2 * lq + 2 * lk)
    return proj + attention_flops(q, kv, kv)


def _native_mha_forward(
    query: Any, key: Any, value: Any, embed_dim: int, num_head: int, *_: Any, **__: Any
) -> int:
    return native_mha_flops(query, key, embed_dim, num_head)


def attention_flop_mapping() -> dict[Any, Callable[..., int]]:
    """``FlopCounterMode(custom_mapping=...)`` entries for every fused SDPA kernel of this torch.

    torch's own registry differs between versions: 2.14 has no formula for the CPU kernel
    ``_scaled_dot_product_flash_attention_for_cpu``, so CPU attention counted 0 FLOPs there.
    Every ``aten._scaled_dot_product_*attention*`` op (forward and backward; q, k, v are the
    first tensors of the forwards and follow ``grad_out`` in the backwards) gets the formula
    of :func:`attention_flops`, so the count does not depend on the torch version or device.
    The composite ``*_math*`` ops are skipped: they run as matmuls, which are counted already.
    ``nn.MultiheadAttention``'s inference fast path (eval mode without grad, e.g. open_clip's
    CLIP towers as online teachers or in a no-grad pass) is one op,
    ``aten._native_multi_head_attention``, which torch counts as 0 (projections included); it
    gets :func:`native_mha_flops`.
    """
    import torch

    mapping: dict[Any, Callable[..., int]] = {
        torch.ops.aten._native_multi_head_attention: _native_mha_forward
    }
    for name in dir(torch.ops.aten):
        if not name.startswith("_scaled_dot_product_") or "math" in name:
            continue
        fn = _attention_backward if name.endswith("_backward") else _attention_forward
        mapping[getattr(torch.ops.aten, name)] = fn
    return mapping


def flop_counter() -> Any:
    """A silent ``FlopCounterMode`` with explicit attention counting (:func:`attention_flops`)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=attention_flop_mapping())


def fmt(x: float | None, digits: int = 2) -> str:
    """Number with ``digits`` decimals, or ``n/a``."""
    if x is None or x != x:
        return "n/a"
    return f"{x:.{digits}f}"


def goal(value: float | None, target: float, smaller_is_better: bool) -> str:
    """``met`` / ``not met`` against a target."""
    if value is None or value != value:
        return "n/a"
    ok = value <= target if smaller_is_better else value >= target
    return "met" if ok else "NOT met"
