"""Benchmark: one Co2S training step vs RS-MTDF (cached, online) and FixMatch, real sizes.

Co2S (issue 17): CLIP ViT-B/16 + DINOv3 ViT-B/16 students with their cost-volume decoders, random
init, crop 512, K classes (default 6, the reference's Potsdam setting). The step is the engine's
(``trainer.engine.Trainer._step``): ``method.set_progress`` + ``method.losses`` (views, the no-grad
partner pass, both students' gradient passes, the UniMatch and stability losses) + one backward +
every optimiser's ``step`` and the poly schedule (+ the EMA update for methods that keep one), on
batches shaped like ``trainer.data.collate`` output. FixMatch is the ``rs-mtdf`` method without
teachers (``--no-distill``): the RS-MTDF student (DINOv2-S/14 + DPT, no translators, no 224 CLIP
pass) with its EMA pseudo-labels, through the same engine step. The RS-MTDF rows (``cached``,
``online``) are ``bench/train_step.py``'s own child processes.

Crops differ by the patch: Co2S runs at 512 (multiple of 16, the reference's crop); RS-MTDF and
FixMatch at 518, their crop for a 512 tile (the multiple of 14 the project resizes 512 to; 2.4 %
more pixels). Batch ``b`` means ``b`` labeled + ``b`` unlabeled images (the reference's B = 1 is
1 + 1 per GPU).

Rows: ``co2s``; ``co2s+bf16`` (autocast, ``runtime.bf16``); ``co2s+ckpt`` (activation
checkpointing of both backbones); ``co2s+explicit-attn`` (attention as explicit matmuls +
softmax, as the official code runs it: the layout the reference's 10.5 GiB was measured in);
``fixmatch``; ``rs-mtdf cached`` and ``rs-mtdf online``. Each row runs in a fresh subprocess so
peak memory does not mix.

Per row: FLOPs of the whole step (``FlopCounterMode``, attention counted explicitly by
``_common.flop_counter``), bytes autograd saves for backward, parameters (total / trainable),
peak RSS, wall and CPU time per step. The GPU memory figure is an ESTIMATE from CPU measurements:
parameters + (gradient + two AdamW moments) per trainable parameter + the EMA copy + resident
teachers + the saved activations (allocator overhead and transients left out).

Usage: ``python bench/co2s_step.py`` (every row, batch 1+1, one counted + one timed step each,
the ``+bf16`` row counted only: ≈ 25 min on 2 cores, ≈ 16 GiB peak RSS); a subset:
``--configs co2s,fixmatch --batches 1,2 --steps 0``; ``--report bench/out/co2s_step.json`` prints
the tables of a saved run; ``--components`` the GFLOP per image of each backbone and decoder.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import train_step as TS  # noqa: E402

TILE = 512
CO2S_CROP = 512  # the reference's crop (a multiple of the ViT-B/16 patch)
FIXMATCH_CROP = TS.CROP  # 518: RS-MTDF's crop for a 512 tile (512 is no multiple of 14)
NUM_CLASSES = 6  # Potsdam, the setting of the reference's quoted 10.5 GiB / 5.8 TFLOP
TOTAL_ITERS = 1000  # schedule length handed to set_progress (only the lambda ramp reads it)
CO2S_ROWS = ("co2s", "co2s+bf16", "co2s+ckpt", "co2s+explicit-attn")
OWN_ROWS = (*CO2S_ROWS, "fixmatch")
# rows measured by bench/train_step.py's child: row name -> its config name
TRAIN_STEP_ROWS = {"rs-mtdf cached": "cached", "rs-mtdf online": "online"}
ROWS = (*OWN_ROWS, *TRAIN_STEP_ROWS)
# the order of BENCHMARKS §8's run (co2s+explicit-attn needs ≈ 16 GiB RAM on the CPU)
DEFAULT_ROWS = (
    "co2s",
    "fixmatch",
    *TRAIN_STEP_ROWS,
    "co2s+ckpt",
    "co2s+explicit-attn",
    "co2s+bf16",
)
# co2s-reference §6, Potsdam 512, B = 1, K = 6: saved activations (GiB) and FLOPs per step,
# measured with the official explicit attention; static memory (weights, grads, AdamW) apart.
REFERENCE = {
    "setting": "Potsdam 512, B = 1, K = 6 (co2s-reference §6)",
    "co2s_activations_gib": 10.5,
    "co2s_static_gib": 1.35,
    "co2s_tflop": 5.80,
    "fixmatch_clip_activations_gib": 3.7,
    "fixmatch_clip_tflop": 2.31,
}


# ----------------------------------------------------------------------------- child process


def _batch(n: int, labeled: bool, seed: int, crop: int, classes: int) -> dict[str, Any]:
    """A collated batch like ``trainer.data.collate`` output: random tiles, official views."""
    import numpy as np
    import torch

    from featviews.draw import draw_view

    rng = np.random.default_rng(seed)
    batch: dict[str, Any] = {
        "index": torch.arange(n) + (0 if labeled else 1000),
        "image": torch.randint(0, 256, (n, 3, TILE, TILE), dtype=torch.uint8),
        "view": [draw_view(rng, TILE, crop) for _ in range(n)],
    }
    if labeled:
        batch["mask"] = torch.randint(0, classes, (n, TILE, TILE), dtype=torch.uint8)
    return batch


def explicit_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    **_: Any,
) -> Any:
    """Attention as explicit ``q k^T``, softmax, ``@ v`` (the official code's path, which keeps
    the ``N x N`` probabilities for backward); stands in for ``F.scaled_dot_product_attention``."""
    import torch.nn.functional as F

    if is_causal or dropout_p:
        raise ValueError("explicit_attention: causal masks and attention dropout are not used here")
    scores = (query * (scale or query.shape[-1] ** -0.5)) @ key.transpose(-2, -1)
    if attn_mask is not None:
        scores = (
            scores + attn_mask
            if attn_mask.dtype != bool
            else scores.masked_fill(~attn_mask, float("-inf"))
        )
    return F.softmax(scores, dim=-1) @ value


@contextlib.contextmanager
def official_attention(enabled: bool = True) -> Iterator[None]:
    """Route every SDPA call (``nn.MultiheadAttention`` in training, timm) through
    :func:`explicit_attention` while the block runs (patches ``torch.nn.functional``).

    The no-grad eval pass keeps ``nn.MultiheadAttention``'s fused inference op, which saves
    nothing for backward, so the memory figure is the official layout's all the same.
    """
    import torch.nn.functional as F

    fused = F.scaled_dot_product_attention
    if enabled:
        F.scaled_dot_product_attention = explicit_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = fused


def train_config(row: str, device: str, crop: int | None = None) -> Any:
    """The `TrainConfig` of a row (random init; only what the step reads is set); ``crop``
    overrides the row's crop (tests)."""
    from trainer.config import TrainConfig

    co2s = row.startswith("co2s")
    cfg = TrainConfig(method="co2s" if co2s else "rs-mtdf")
    cfg.crop_size = crop or (CO2S_CROP if co2s else FIXMATCH_CROP)
    if not co2s:  # FixMatch: rs-mtdf without teachers (--no-distill)
        cfg.model.teachers, cfg.distill.enabled, cfg.distill.standardize = [], False, False
    cfg.model.random_weights = True  # step cost: weights do not matter
    cfg.runtime.bf16 = row.endswith("+bf16")
    cfg.runtime.grad_checkpointing = row.endswith("+ckpt")
    cfg.runtime.device = device
    return cfg


def co2s_pair(cfg: Any, classes: int, size: str) -> Any:
    """Both Co2S students, built as ``Co2S.build_model`` builds them, with random L2-normalised
    class text rows in place of the store's (random init: their values do not change the cost)."""
    import torch
    import torch.nn.functional as F

    from trainer.co2s.student import build_co2s_student
    from trainer.methods.co2s import KINDS, Co2SPair

    torch.manual_seed(cfg.runtime.seed)
    text = F.normalize(torch.randn(classes, 512 if size == "base" else 32), dim=1)
    c = cfg.co2s
    students = {
        kind: build_co2s_student(
            kind,
            classes,
            text if kind == "clip" else None,
            size=size,
            finetune=c.finetune,
            clip_act=c.clip_act,
            random_weights=True,
            checkpointing=cfg.runtime.grad_checkpointing,
            crop=cfg.crop_size,
        )
        for kind in KINDS
    }
    return Co2SPair(students, {"method": "co2s", "bench": True})


def engine_step(run: SimpleNamespace, batch_l: Any, batch_u: Any, step: int) -> None:
    """One iteration as ``Trainer._step`` runs it (no DDP wrapper, no finiteness check)."""
    import torch

    from trainer.ema import update_ema
    from trainer.step import poly_lr

    gen = torch.Generator(device=run.device)
    gen.manual_seed(run.cfg.runtime.seed * 1_000_003 + step * 7)
    run.method.set_progress(step, TOTAL_ITERS)
    ema_module = run.ema.module if run.ema is not None else None
    terms = run.method.losses(run.model, ema_module, batch_l, batch_u, gen)
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    for opt in run.optimizers:
        opt.step()
        poly_lr(opt, step, TOTAL_ITERS, run.cfg.optim.poly)
    if run.ema is not None:
        update_ema(run.ema, run.model, step)


def build_run(
    row: str, classes: int, size: str, device_name: str, crop: int | None = None
) -> SimpleNamespace:
    """Config, method, model, EMA and optimisers of a row, as the engine builds them."""
    import torch

    from trainer.ema import create_ema
    from trainer.methods import method_class

    if row not in OWN_ROWS:
        raise ValueError(f"row {row!r} is not one of {OWN_ROWS}")
    cfg = train_config(row, device_name, crop)
    device = torch.device(device_name)
    data = SimpleNamespace(num_classes=classes, store=None)
    method = method_class(cfg.method)(cfg, data, None, device)
    if cfg.method == "co2s":
        model = co2s_pair(cfg, classes, size)
    else:
        if size != "base":
            raise ValueError("fixmatch runs at real size only (size='base')")
        model = method.build_model(None)
    model = model.to(device).train()
    ema = create_ema(model, cfg.fixmatch.ema_max) if method.uses_ema else None
    return SimpleNamespace(
        cfg=cfg,
        method=method,
        model=model,
        ema=ema,
        optimizers=method.optimizers(model),
        device=device,
    )


def param_counts(model: Any) -> dict[str, dict[str, int]]:
    """Total and trainable parameters per student (Co2S) or of the one student."""
    students = getattr(model, "students", {"student": model})
    out = {
        name: {
            "total": sum(p.numel() for p in m.parameters()),
            "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
        }
        for name, m in students.items()
    }
    out["all"] = {k: sum(v[k] for v in out.values()) for k in ("total", "trainable")}
    return out


def static_bytes(run: SimpleNamespace) -> dict[str, int]:
    """Weights, gradients + two AdamW moments (trainable only), and the EMA copy, in bytes."""
    params = list(run.model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "grads": trainable,
        "adamw": 2 * trainable,
        "ema": TS._nbytes(run.ema.module) if run.ema is not None else 0,
    }


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s ``ModuleTracker``: every FLOP goes to "Global".

    Why: the tracker hooks each module output that requires grad, and in the no-grad partner
    pass the DINOv3 student's ``LearnableQueries`` returns a view of its table that requires grad
    without a ``grad_fn`` (torch keeps ``requires_grad`` on views made under ``no_grad``); the
    hook then fails. The benchmark reads totals only, so nothing is lost.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def flop_counter() -> Any:
    """``_common.flop_counter`` (attention counted explicitly) counting totals only."""
    counter = C.flop_counter()
    if not hasattr(counter, "mod_tracker"):
        raise RuntimeError(
            "this torch's FlopCounterMode has no mod_tracker; update bench/co2s_step.py"
        )
    counter.mod_tracker = _GlobalOnly()
    return counter


def measure(step: Callable[[int], None], params: Any, steps: int, device: Any) -> dict[str, Any]:
    """Run 1 FLOP-counted step (saved activations hooked) then ``steps`` timed steps.

    Returns FLOPs, saved-activation bytes, peak RSS during the steps, and wall/CPU seconds per
    timed step (the counted step's, when ``steps`` is 0).
    """
    rss = C.PeakRSS()
    rss_built = rss.current()
    return {
        **TS.measure_steps(step, params, steps, device, rss, flop_counter),
        "rss_built": rss_built,
    }


def child(
    row: str,
    batch: int,
    steps: int,
    classes: int = NUM_CLASSES,
    size: str = "base",
    device_name: str = "cpu",
    crop: int | None = None,
) -> dict[str, Any]:
    """Build one row, run 1 counted + ``steps`` timed engine steps; return the figures.

    ``size="tiny"`` and a small ``crop`` give a test-sized Co2S step.
    """

    with official_attention(row.endswith("+explicit-attn")):
        return _child(row, batch, steps, classes, size, device_name, crop)


def _child(
    row: str, batch: int, steps: int, classes: int, size: str, device_name: str, crop: int | None
) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    run = build_run(row, classes, size, device_name, crop)
    crop = run.cfg.crop_size
    batches = [
        (_batch(batch, True, 2 * i, crop, classes), _batch(batch, False, 2 * i + 1, crop, classes))
        for i in range(steps + 1)
    ]
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)

    def step(i: int) -> None:
        engine_step(run, *batches[i], i)

    figures = measure(step, run.model.parameters(), steps, run.device)
    return {
        "row": row,
        "method": run.cfg.method,
        "device": device_name,
        "size": size,
        "crop": crop,
        "batch": batch,
        "classes": classes,
        "param_counts": param_counts(run.model),
        "static_bytes": static_bytes(run),
        **figures,
    }


def component_flops(classes: int = NUM_CLASSES, crop: int = CO2S_CROP) -> dict[str, float]:
    """GFLOP per image of each student's backbone (forward; forward + backward) and decoder
    (forward), counted on the meta device (shapes only, nothing computed): the per-component
    figures of co2s-reference §6."""
    import torch
    import torch.nn.functional as F

    from trainer.co2s.student import build_co2s_student

    out = {}
    with torch.device("meta"):
        text = F.normalize(torch.randn(classes, 512), dim=1)
        x = torch.randn(1, 3, crop, crop)
        for kind in ("clip", "dinov3"):
            student = build_co2s_student(
                kind, classes, text, random_weights=True, crop=crop
            ).train()
            counts = []
            for grad in (False, True):
                counter = flop_counter()
                with torch.set_grad_enabled(grad), counter:
                    maps = student.backbone(x)
                    if grad:
                        sum(m.sum() for m in maps).backward()
                counts.append(counter.get_total_flops())
            counter = flop_counter()
            with torch.no_grad(), counter:
                student(x)
            out[f"{kind} backbone fwd"] = counts[0] / 1e9
            out[f"{kind} backbone fwd+bwd"] = counts[1] / 1e9
            out[f"{kind} decoder fwd"] = (counter.get_total_flops() - counts[0]) / 1e9
    return out


# ----------------------------------------------------------------------------- parent


def train_step_row(row: str, batch: int, steps: int, device: str) -> dict[str, Any]:
    """An RS-MTDF row from ``bench/train_step.py``'s child, in this script's terms."""
    config = TRAIN_STEP_ROWS[row]
    args = ["--child", config, "--batch", str(batch), "--steps", str(steps), "--device", device]
    r = C.run_child(Path(TS.__file__), args)
    st = r["static_bytes"]
    student = st["student"]  # RS-MTDF trains every student parameter (trainer.student)
    teachers = sum(v for k, v in st.items() if k not in ("student", "ema"))
    n = r["param_counts"]["student"]
    return {
        **r,
        "row": row,
        "method": "rs-mtdf",
        "crop": TS.CROP,
        "classes": 7,  # train_step.py's student
        "param_counts": {
            "student": {"total": n, "trainable": n},
            "all": {"total": n, "trainable": n},
        },
        "static_bytes": {
            "weights": student + teachers,
            "grads": student,
            "adamw": 2 * student,
            "ema": st["ema"],
        },
    }


def gpu_estimate(r: dict[str, Any]) -> dict[str, float]:
    """GPU memory of one step at the measured batch (ESTIMATE from CPU measurements): static
    (weights, grads, AdamW moments, EMA, resident teachers) + saved activations."""
    static = sum(r["static_bytes"].values())
    acts = r["saved_activation_bytes"]
    return {
        "static_gib": static / C.GIB,
        "activations_gib": acts / C.GIB,
        "total_gib": (static + acts) / C.GIB,
    }


def _ratio(r: dict[str, Any], ref: dict[str, Any] | None, key: str) -> str:
    return C.fmt(r[key] / ref[key]) if ref and ref.get(key) else "n/a"


def report(res: dict[tuple[str, int], dict[str, Any]]) -> str:
    """Markdown tables: figures per row, ratios vs ``co2s``, the reference comparison."""
    rows = []
    for (row, b), r in res.items():
        ref = res.get(("co2s", b))
        est = gpu_estimate(r)
        pc = r["param_counts"]["all"]
        rows.append(
            [
                row,
                r["crop"],
                f"{b}+{b}",
                f"{r['flops'] / 1e12:.2f}",
                _ratio(r, ref, "flops"),
                f"{pc['total'] / 1e6:.1f} / {pc['trainable'] / 1e6:.1f}",
                f"{r['saved_activation_bytes'] / C.GIB:.2f}",
                C.fmt(est["static_gib"]),
                C.fmt(est["total_gib"]),
                C.fmt(est["total_gib"] / gpu_estimate(ref)["total_gib"]) if ref else "n/a",
                f"{r['peak_rss'] / C.GIB:.2f}",
                f"{r['median_s']:.1f} / {r['median_cpu_s']:.1f}",
                _ratio(r, ref, "median_s"),
                _ratio(r, ref, "median_cpu_s"),
            ]
        )
    table = C.markdown_table(
        [
            "row",
            "crop",
            "batch",
            "TFLOP/step",
            "FLOP ratio vs co2s",
            "params M (total / trainable)",
            "saved act. GiB",
            "static GiB",
            "GPU GiB (ESTIMATE)",
            "ESTIMATE ratio vs co2s",
            "peak RSS GiB",
            "s/step (wall / CPU)",
            "wall ratio vs co2s",
            "CPU ratio vs co2s",
        ],
        rows,
    )
    import torch

    head = f"torch {torch.__version__}; FLOPs with explicit attention counting"
    return f"{head}\n\n{table}\n\n{reference_table(res)}\n"


def reference_table(res: dict[tuple[str, int], dict[str, Any]]) -> str:
    """Co2S rows at batch 1+1 next to the reference's measured 10.5 GiB / 5.8 TFLOP."""
    ref = REFERENCE
    rows = [
        [
            "reference (official code)",
            f"{ref['co2s_tflop']:.2f}",
            f"{ref['co2s_activations_gib']:.2f}",
            f"{ref['co2s_activations_gib'] + ref['co2s_static_gib']:.2f}",
            "1.00",
            "1.00",
        ]
    ]
    for row in CO2S_ROWS:
        r = res.get((row, 1))
        if r is None:
            continue
        est = gpu_estimate(r)
        rows.append(
            [
                row,
                f"{r['flops'] / 1e12:.2f}",
                C.fmt(est["activations_gib"]),
                C.fmt(est["total_gib"]),
                C.fmt(r["flops"] / 1e12 / ref["co2s_tflop"]),
                C.fmt(est["activations_gib"] / ref["co2s_activations_gib"]),
            ]
        )
    head = [
        "Co2S, 1+1 @512",
        "TFLOP/step",
        "activations GiB",
        "+ static GiB (ESTIMATE)",
        "FLOP ratio vs reference",
        "activation ratio vs reference",
    ]
    return f"Against the reference ({ref['setting']}):\n\n{C.markdown_table(head, rows)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(DEFAULT_ROWS), help=f"rows, of {ROWS}")
    ap.add_argument("--batches", default="1", help="per-stream batch sizes, e.g. 1,2")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per row (after 1 counted)")
    ap.add_argument(
        "--bf16-steps",
        type=int,
        default=0,
        help="timed steps of +bf16 rows (slow on CPUs without native bf16)",
    )
    ap.add_argument("--classes", type=int, default=NUM_CLASSES, help="K of the Co2S rows")
    ap.add_argument("--out", default="co2s_step", help="JSON name under bench/out/")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU: CUDA max allocated)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--report", metavar="JSON", help="only print the tables of a saved run")
    ap.add_argument(
        "--components", action="store_true", help="only print GFLOP per image per component"
    )
    args = ap.parse_args()
    if args.components:
        rows = [[k, f"{v:.1f}"] for k, v in component_flops(args.classes).items()]
        print(C.markdown_table(["component (1 image, crop 512)", "GFLOP"], rows))
        return
    if args.report:
        print(report(load_results(Path(args.report))))
        return
    if args.child:
        import json

        print(
            json.dumps(child(args.child, args.batch, args.steps, args.classes, "base", args.device))
        )
        return
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(ROWS))
    if unknown:
        ap.error(f"--configs: unknown rows {unknown}; use rows of {list(ROWS)}")
    res: dict[tuple[str, int], dict[str, Any]] = {}
    text, t0 = "", time.perf_counter()
    for b in (int(x) for x in args.batches.split(",")):
        for row in configs:
            steps = args.bf16_steps if row.endswith("+bf16") else args.steps
            if row in TRAIN_STEP_ROWS:
                r = train_step_row(row, b, steps, args.device)
            else:
                cmd = ["--child", row, "--batch", str(b), "--steps", str(steps)]
                cmd += ["--classes", str(args.classes), "--device", args.device]
                r = C.run_child(Path(__file__), cmd)
            res[(row, b)] = r
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {row} {b}+{b}: {r['median_s']:.1f} s/step, "
                f"{r['flops'] / 1e12:.2f} TFLOP, saved {r['saved_activation_bytes'] / C.GIB:.2f} "
                f"GiB, peak RSS {r['peak_rss'] / C.GIB:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
            text = write_results(args.out, res)  # after every row: a stopped run keeps its rows
    print(text)


def load_results(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The runs of a saved ``bench/out/<name>.json``, keyed like :func:`report` expects."""
    import json

    return {(r["row"], r["batch"]): r for r in json.loads(path.read_text())["runs"]}


def write_results(name: str, res: dict[tuple[str, int], dict[str, Any]]) -> str:
    """Write ``bench/out/<name>.json`` (runs, estimates, reference, tables); return the tables."""
    text = report(res)
    C.write_json(
        name,
        {
            "runs": list(res.values()),
            "gpu_estimate": {f"{k[0]} {k[1]}+{k[1]}": gpu_estimate(v) for k, v in res.items()},
            "reference": REFERENCE,
            "markdown": text,
        },
    )
    return text


if __name__ == "__main__":
    main()
