"""``featcache demo --method co2s``: data → store → class text rows → a short Co2S run → mIoU.

A small Co2S run on the synthetic data (or ``--data``): the store holds the pixels (and one tiny
teacher, which a store needs and Co2S does not read), `featcache text` writes the class text rows
with its tiny random text tower, the tiny CLIP and DINOv3 students train together, and the demo
prints the mIoU of each student and of their fusion beside the majority-class baseline of the val
masks. It shows the method running end to end, not the accuracy Co2S reaches (tiny random
students, a few iterations).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from featcache.demo import (
    FULL,
    QUICK,
    DemoSettings,
    demo_session,
    extract_store,
    prepare_source,
    split_facts,
    write_splits,
)

# The store's one teacher (a store needs one; Co2S reads only its pixels, masks and text rows).
STORE_TEACHER = {"dinov2_vitb14": None}
# Crops are multiples of the students' patch 16; the store's 128 px tiles hold whole objects.
CO2S_QUICK = replace(QUICK, crop=64, iters=2, eval_every=2, batch=1)
CO2S_FULL = replace(FULL, crop=64, iters=60, eval_every=20, batch=2, scales=(1.0,))
# Random-init students learn at far higher rates than the official fine-tuning ones (measured
# on the LoveDA sample, tests/trainer/test_co2s_loveda.py: a head rate of 1e-2 collapses).
LR_BACKBONE, LR_HEAD = 1e-3, 3e-3


def co2s_config(
    store: str, splits: dict[str, Path], out: Path, s: DemoSettings, device: str, seed: int
) -> Any:
    """The demo's ``TrainConfig``: method co2s, tiny students, sliding-window evaluation."""
    from trainer.config import TrainConfig

    cfg = TrainConfig(method="co2s", mode="cached", crop_size=s.crop)
    cfg.data.store = store
    cfg.data.labeled, cfg.data.unlabeled = str(splits["labeled"]), str(splits["unlabeled"])
    cfg.data.val, cfg.data.num_workers = str(splits["val"]), 0
    cfg.model.tiny = True
    cfg.co2s.lr_backbone, cfg.co2s.lr_head, cfg.co2s.lr_queries = LR_BACKBONE, LR_HEAD, LR_HEAD
    sch = cfg.schedule
    sch.batch_labeled = sch.batch_unlabeled = s.batch
    sch.iters, sch.eval_interval, sch.log_interval = s.iters, s.eval_every, 1
    rt = cfg.runtime
    rt.out_dir, rt.device, rt.seed = str(out / "runs" / "co2s"), device, seed
    rt.progress = rt.tensorboard = False
    return cfg.validate()


def summary_lines(metrics: dict[str, Any], baseline: dict[str, Any], iters: int) -> list[str]:
    """What the demo prints: mIoU and OA of each student and of the fusion, and the baseline."""
    lines = [f"Co2S demo after {iters} iteration(s), val mIoU / OA:"]
    for name, m in metrics.items():
        lines.append(f"  {name:<7} mIoU {100 * m['miou']:5.2f}  OA {100 * m['oa']:5.2f}")
    lines.append(
        f"  majority class everywhere: mIoU {100 * baseline['miou']:5.2f}  "
        f"OA {100 * baseline['oa']:5.2f}"
    )
    return lines


def run_co2s_demo(
    out_dir: str | Path,
    data: str | None = None,
    quick: bool = False,
    device: str = "cpu",
    seed: int = 0,
    layout: str = "auto",
    settings: DemoSettings | None = None,
    echo: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> Path:
    """Run the Co2S demo; writes ``out_dir/report/co2s.json`` and ``co2s.md``, returns the
    markdown's path. Arguments as `featcache.demo.run_demo`."""
    with demo_session(out_dir, threads):
        return _run(
            Path(out_dir),
            data,
            settings or (CO2S_QUICK if quick else CO2S_FULL),
            device,
            seed,
            layout,
            echo or (lambda _: None),
        )


def _run(
    out: Path,
    data: str | None,
    s: DemoSettings,
    device: str,
    seed: int,
    layout: str,
    echo: Callable[[str], None],
) -> Path:
    from featstore import open_store
    from pipelines.text import TextConfig, run_text
    from trainer.engine import train

    out.mkdir(parents=True, exist_ok=True)
    echo("[demo co2s] data and store ...")
    src = prepare_source(out, data, s, seed)
    url, _ = extract_store(src, out / "store.zarr", STORE_TEACHER, s, layout, device)
    store = open_store(url)
    splits = write_splits(store, out / "splits", s, seed)
    echo("[demo co2s] class text rows (tiny random text tower) ...")
    # "names": one prompt per class name, so any dataset works (shipped lists need a known one)
    run_text(TextConfig(url, concepts="names", tiny=True, device=device))
    echo(f"[demo co2s] training {s.iters} iteration(s) ...")
    result = train(co2s_config(url, splits, out, s, device, seed), echo=echo)
    facts = split_facts(store, splits)
    lines = summary_lines(result.metrics, facts["baseline"], result.step)
    for line in lines:
        echo(line)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    doc = {"settings": asdict(s), "seed": seed, "metrics": result.metrics, **facts}
    (report / "co2s.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    path = report / "co2s.md"
    path.write_text("# Co2S demo\n\n```\n" + "\n".join(lines) + "\n```\n")
    return path


__all__ = ["CO2S_FULL", "CO2S_QUICK", "co2s_config", "run_co2s_demo", "summary_lines"]
