"""Benchmark 1: one RS-MTDF training step, cached targets vs online teachers, real sizes.

Student DINOv2-S/14 + DPT (+ the 224 CLIP pass), teachers DINOv2-B/14 @518 and CLIP ViT-L/14
@224, random init. Each (configuration, batch) runs in a fresh subprocess so peak RSS values do
not mix. The step is the trainer's own: ``trainer.step.render_batch`` + ``compute_losses`` +
the update + ``trainer.ema.update_ema`` (what ``Trainer._step`` runs), fed with batches shaped like
``trainer.data.collate`` output.

Rows: ``cached``; ``online`` (teachers resident, EMA over the student only); ``official``
(teachers resident, EMA deep copy of student + teachers + CLIP text tower, as the official code;
the EMA update also loops over the teachers; attention without SDPA, as the official DINOv2 and
CLIP code run it); ``cached+bf16`` (autocast); ``cached+ckpt`` (activation checkpointing);
``cached+clipfull`` (``StudentConfig.clip_from_full``: CLIP-branch tokens resampled from the full
pass instead of the second 224 pass; departs from the official architecture).

FLOPs: ``FlopCounterMode`` over the whole step with attention counted explicitly
(``_common.flop_counter``: ``4*B*heads*N^2*d`` per attention forward, twice that per backward, for
every fused SDPA kernel), so the figure does not depend on which SDPA kernels the installed torch
has formulas for (torch 2.14 counts the CPU kernel as 0).

Usage: ``python bench/train_step.py [--quick]``; FLOPs only (one counted step per run):
``--batches 1 --steps 0``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CONFIGS = ("cached", "online", "official", "cached+bf16", "cached+ckpt", "cached+clipfull")
TILE, CROP = 512, 518
DINO, CLIP = "dinov2_vitb14", "clip_vitl14"
GPU_BATCH = 8  # per stream: 8 labeled + 8 unlabeled, the official setting


# ----------------------------------------------------------------------------- child process


def _teacher_specs() -> dict[str, Any]:
    """TeacherSpecs of the two teachers without building them (the cached rows hold none)."""
    from featstore import TeacherSpec

    snap = (("snap_to_stride", "1"),)
    return {
        DINO: TeacherSpec(
            DINO, "timm", "vit_base_patch14_dinov2", "random", None, 518, 14, 768, extra=snap
        ),
        CLIP: TeacherSpec(
            CLIP, "open_clip", "ViT-L-14.visual", "random", None, 224, 14, 1024, extra=snap
        ),
    }


def _batch(n: int, labeled: bool, seed: int, specs: dict[str, Any]) -> dict[str, Any]:
    """A collated batch like ``trainer.data.collate`` output (random tiles, drawn views)."""
    import numpy as np
    import torch

    from featstore import LevelSpec
    from featviews.draw import draw_view

    rng = np.random.default_rng(seed)
    lv = LevelSpec(1.0)
    views = [draw_view(rng, TILE, CROP).with_levels({DINO: lv, CLIP: lv}) for _ in range(n)]
    grid = {DINO: (37, 768), CLIP: (16, 1024)}
    batch = {
        "index": torch.arange(n) + (0 if labeled else 1000),
        "image": torch.randint(0, 256, (n, 3, TILE, TILE), dtype=torch.uint8),
        "view": views,
        "grids": {t: [torch.randn(g, g, c).half() for _ in range(n)] for t, (g, c) in grid.items()},
    }
    if labeled:
        batch["mask"] = torch.randint(0, 7, (n, TILE, TILE), dtype=torch.uint8)
    return batch


def _text_tower() -> Any:
    """The CLIP ViT-L/14 text tower (123.6 M params), fp16 as the official code holds it."""
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = open_clip.get_model_config("ViT-L-14")
    tower = _build_text_tower(cfg["embed_dim"], CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=True)
    return tower.to(torch.float16).requires_grad_(False)


def _no_sdpa(module: Any) -> None:
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward (unique storages, parameters excluded)."""

    def __init__(self, params: Any) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t: Any) -> Any:
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip:
            self.seen[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _nbytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def child(config: str, batch: int, steps: int, device_name: str = "cpu") -> dict[str, Any]:
    """Build one configuration, run 1 counted + ``steps`` timed steps; return the figures."""
    import torch
    from torch import nn

    from featstore import LevelGeometry, LevelSpec
    from featviews.sources import OnlineSource, SourceContext, ViewSampling, WarpSource
    from trainer.ema import create_ema, update_ema
    from trainer.step import LossSettings, compute_losses, render_batch
    from trainer.student import Student, StudentConfig, param_groups

    rss = C.PeakRSS()
    rss_start = rss.current()
    torch.manual_seed(0)
    online = config in ("online", "official")
    # cached+clipfull: CLIP-branch tokens resampled from the full pass (no second 224 pass);
    # departs from the official architecture, measured to show what it saves
    student = Student(
        StudentConfig(
            num_classes=7,
            img_size=CROP,
            grad_checkpointing=config == "cached+ckpt",
            clip_from_full=config == "cached+clipfull",
            random_weights=True,
        )
    )  # step cost: weights do not matter
    student.train()
    specs = _teacher_specs()
    static: dict[str, int] = {"student": _nbytes(student)}
    ema_target: nn.Module = student
    if online:
        from pipelines.teachers import create_teacher

        teachers = {
            t: create_teacher(t, device="cpu", base_size=CROP, random_weights=True)
            for t in (DINO, CLIP)
        }
        sampling = ViewSampling(TILE, CROP, CROP)
        targets: Any = OnlineSource(SourceContext(sampling, teachers=teachers))
        for t, m in teachers.items():
            static[t] = _nbytes(m)
        if config == "official":
            holder = nn.Module()
            holder.student, holder.teachers = (
                student,
                nn.ModuleDict({"dino": teachers[DINO], "clip": teachers[CLIP]}),
            )
            holder.text = _text_tower()
            static["clip_text_fp16"] = _nbytes(holder.text)
            ema_target = holder
            _no_sdpa(holder)
    else:
        geoms = {
            (t, "s1.00"): LevelGeometry.from_specs(TILE, CROP, LevelSpec(1.0), s)
            for t, s in specs.items()
        }
        targets = WarpSource(SourceContext(ViewSampling(TILE, CROP, CROP), level_geoms=geoms))
    ema = create_ema(ema_target)
    static["ema"] = _nbytes(ema.module)
    pseudo_model = ema.module.student if config == "official" else ema.module
    opt = torch.optim.AdamW(param_groups(student, 5e-6, 40.0, 0.01))
    settings = LossSettings(bf16=config == "cached+bf16")
    names = [DINO, CLIP]
    device = torch.device(device_name)
    ema_target.to(device)
    ema.module.to(device)
    student.to(device)
    if online:
        for m in teachers.values():
            m.to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    batches = [
        (_batch(batch, True, 2 * i, specs), _batch(batch, False, 2 * i + 1, specs))
        for i in range(steps + 1)
    ]
    rss_built = rss.current()

    def step(i: int) -> None:
        bl, bu = batches[i]
        gen = torch.Generator(device=device).manual_seed(i)
        views = render_batch(bl, bu, device, gen, 0.5)
        terms = compute_losses(student, pseudo_model, views, targets, bl, bu, names, settings)
        opt.zero_grad(set_to_none=True)  # as the engine's step
        terms["loss"].backward()
        opt.step()
        update_ema(ema, ema_target, i)

    return {
        "device": device_name,
        "config": config,
        "batch": batch,
        **measure_steps(step, student.parameters(), steps, device, rss),
        "ru_maxrss_incl_build": C.PeakRSS.ru_maxrss(),
        "rss_start": rss_start,
        "rss_built": rss_built,
        "static_bytes": static,
        "param_counts": {"student": sum(p.numel() for p in student.parameters())},
    }


def measure_steps(
    step: Any, params: Any, steps: int, device: Any, rss: Any, counter: Any = None
) -> dict[str, Any]:
    """Run step 0 FLOP-counted (saved activations hooked), then steps 1..``steps`` timed, all
    inside ``rss`` (a ``C.PeakRSS``). ``counter``: a factory of the FLOP counter (default
    ``C.flop_counter``: attention counted explicitly, the same on every torch).

    Returns FLOPs, saved-activation bytes, peak RSS, and wall / CPU seconds per timed step (the
    counted step's when ``steps`` is 0, slowed by the counter and warm-up).
    """
    import torch

    saved = _SavedBytes(params)
    cuda = device.type == "cuda"
    with rss:
        flops = (counter or C.flop_counter)()
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        with flops, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            step(0)
        counted = (time.perf_counter() - t_wall, time.process_time() - t_cpu)
        times, cpu = [], []
        for i in range(1, steps + 1):
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            step(i)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t_wall)
            cpu.append(time.process_time() - t_cpu)
    if not times:
        times, cpu = [counted[0]], [counted[1]]
    return {
        "steps": steps,
        "times_s": times,
        "cpu_s": cpu,
        "median_s": C.median(times),
        "median_cpu_s": C.median(cpu),
        "counted_step_s": counted[0],
        "flops": int(flops.get_total_flops()),
        "saved_activation_bytes": saved.total,
        "peak_rss": rss.peak,
        "cuda_max_allocated": torch.cuda.max_memory_allocated(device) if cuda else None,
    }


# ----------------------------------------------------------------------------- estimate


def gpu_estimate(res: dict[tuple[str, int], dict[str, Any]], config: str) -> dict[str, float]:
    """GPU memory at 8+8@518 (an ESTIMATE from CPU measurements, no GPU here).

    ``static`` = student fp32 weights + grads + 2 AdamW states + the EMA copy (+ resident
    teachers, + their EMA copies and the fp16 text tower for the official layout, with CLIP held in
    fp16 as the official code loads it); ``activations`` = saved-for-backward bytes measured per
    1+1 pair (slope between the 1+1 and 2+2 runs, or the 1+1 run alone) times 8;
    ``transient`` = the largest teacher forward buffer for 16 views (online: the MLP hidden of
    DINOv2-B; official, non-SDPA attention: the 12-head 1370^2 logits and softmax).
    """
    r1 = res[(config, 1)]
    r2 = res.get((config, 2))
    # Saved activations scale with the batch: slope between 1+1 and 2+2, or 1+1 alone.
    per_pair = (
        r2["saved_activation_bytes"] - r1["saved_activation_bytes"]
        if r2
        else r1["saved_activation_bytes"]
    )
    st = r1["static_bytes"]
    student = st["student"]
    static = student * 4  # weights, grads, exp_avg, exp_avg_sq
    if config == "official":
        dino, clip_v = st[DINO], st[CLIP] / 2  # official CLIP is fp16
        teachers = dino + clip_v + st["clip_text_fp16"]
        static += student + 2 * teachers  # EMA deep copy holds everything
    else:
        static += student
        if config == "online":
            static += st[DINO] + st[CLIP]
    n = 2 * GPU_BATCH
    transient = 0.0
    if config == "official":
        transient = n * 12 * 1370**2 * 4 * 2
    elif config == "online":
        transient = n * 1370 * 3072 * 4
    acts = GPU_BATCH * per_pair
    return {
        "static_gib": static / C.GIB,
        "activations_gib": acts / C.GIB,
        "transient_gib": transient / C.GIB,
        "total_gib": (static + acts + transient) / C.GIB,
        "activation_mib_per_image": per_pair / 2 / C.MIB,
    }


# ----------------------------------------------------------------------------- parent


def _peak(r: dict[str, Any]) -> int:
    """CUDA max allocated on a GPU run, else the sampled process RSS peak."""
    return r.get("cuda_max_allocated") or r["peak_rss"]


def report(res: dict[tuple[str, int], dict[str, Any]], batches: list[int]) -> str:
    """Markdown tables: per-run figures, ratios vs online/official, the GPU estimate."""
    rows = []
    for (cfg, b), r in res.items():
        ref = res.get(("online", b))
        rows.append(
            [
                cfg,
                f"{b}+{b}",
                f"{r['flops'] / 1e12:.2f}",
                C.fmt(r["flops"] / ref["flops"]) if ref else "n/a",
                C.fmt(r["median_s"] / ref["median_s"]) if ref else "n/a",
                C.fmt(r["median_cpu_s"] / ref["median_cpu_s"]) if ref else "n/a",
                f"{_peak(r) / C.GIB:.2f}",
                C.fmt(_peak(r) / _peak(res[("official", b)])) if ("official", b) in res else "n/a",
                f"{r['saved_activation_bytes'] / b / 2 / C.MIB:.0f}",
            ]
        )
    t1 = C.markdown_table(
        [
            "config",
            "batch",
            "TFLOP/step",
            "FLOP ratio vs online",
            "wall-time ratio vs online",
            "CPU-time ratio vs online",
            "peak GiB (RSS; CUDA alloc on GPU)",
            "peak ratio vs official",
            "saved act. MiB/image",
        ],
        rows,
    )
    est_rows = []
    ests = {cfg: gpu_estimate(res, cfg) for cfg in CONFIGS if (cfg, 1) in res}
    off = ests.get("official", {}).get("total_gib")
    for cfg, e in ests.items():
        est_rows.append(
            [
                cfg,
                C.fmt(e["static_gib"]),
                C.fmt(e["activations_gib"]),
                C.fmt(e["transient_gib"]),
                C.fmt(e["total_gib"]),
                C.fmt(e["total_gib"] / off) if off else "n/a",
                f"{e['activation_mib_per_image']:.0f}",
            ]
        )
    t2 = C.markdown_table(
        [
            "config",
            "static GiB",
            "activations GiB",
            "transient GiB",
            "total GiB (ESTIMATE)",
            "ratio vs official",
            "act. MiB/image",
        ],
        est_rows,
    )
    import torch

    head = f"torch {torch.__version__}; FLOPs with explicit attention counting"
    return f"{head}\n\n{t1}\n\nGPU memory at 8+8@518 (ESTIMATE, no GPU in this run):\n\n{t2}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="batch 1+1 only, 1 timed step after the counted warm-up step",
    )
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batches", default=None, help="per-stream batch sizes, e.g. 1,2")
    ap.add_argument("--out", default="train_step", help="JSON name under bench/out/")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU: CUDA max allocated)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run (after 1 counted)")
    args = ap.parse_args()
    if args.child:
        import json

        print(json.dumps(child(args.child, args.batch, args.steps, args.device)))
        return
    batches = [1] if args.quick else [1, 2]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    steps = 1 if args.quick else args.steps
    res: dict[tuple[str, int], dict[str, Any]] = {}
    t0 = time.perf_counter()
    for b in batches:
        for cfg in args.configs.split(","):
            r = C.run_child(
                Path(__file__),
                ["--child", cfg, "--batch", str(b), "--steps", str(steps), "--device", args.device],
            )
            res[(cfg, b)] = r
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {cfg} {b}+{b}: {r['median_s']:.2f} s/step, "
                f"{r['flops'] / 1e12:.2f} TFLOP, peak RSS {r['peak_rss'] / C.GIB:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
    text = report(res, batches)
    print(text)
    ests = {cfg: gpu_estimate(res, cfg) for cfg in CONFIGS if (cfg, 1) in res}
    C.write_json(
        args.out, {"runs": [dict(v) for v in res.values()], "gpu_estimate": ests, "markdown": text}
    )


if __name__ == "__main__":
    main()
