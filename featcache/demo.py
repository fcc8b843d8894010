"""One-command demo: data → teacher cache → cached vs online training → report with plots.

The two trainings are a paired comparison run side by side in this process: same tiles, same
splits, same student initialisation, same teacher weights (the online teachers are loaded with
the weights the store was extracted with), same schedule and seeds. Only where the distillation
targets come from differs, so time, memory and teacher compute can be compared directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY_TEACHERS = ("dinov2_vitb14", "clip_vitl14")
EFFNET = "timm:tf_efficientnet_lite0"


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says how to fix it."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run (``QUICK`` for tests, ``FULL`` for the 5-minute demo)."""

    n_images: int
    image_size: int
    tile_size: int
    crop: int
    iters: int
    eval_every: int
    batch: int
    n_labeled: int
    n_val: int
    max_tiles: int
    scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    lr: float = 2e-4
    lr_multi: float = 10.0
    real_teacher: bool = True


QUICK = DemoSettings(n_images=2, image_size=256, tile_size=128, crop=126, iters=4, eval_every=2,
                     batch=2, n_labeled=2, n_val=2, max_tiles=8, scales=(1.0,),
                     real_teacher=False)
FULL = DemoSettings(n_images=6, image_size=256, tile_size=128, crop=126, iters=40,
                    eval_every=10, batch=4, n_labeled=4, n_val=6, max_tiles=24, lr=5e-4)


@dataclass
class RunRecord:
    """What one training run produced (curves, metrics, costs, predictions)."""

    mode: str
    seconds: float
    peak_bytes: int
    out_dir: Path
    final: dict[str, Any]
    evals: list[dict[str, Any]]
    log: dict[str, list[float]]
    teacher_passes: int
    predictions: list[np.ndarray] = field(default_factory=list)
    max_rss: int = 0


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, else RSS polled by a thread.

    RSS polling (every 5 ms) can miss a spike shorter than that; it sees what the OS sees,
    which includes the allocator's caching, the teachers' weights and activations alike.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.peak_abs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        proc = psutil.Process(os.getpid())
        self._base = proc.memory_info().rss

        def poll() -> None:
            while not self._stop.wait(0.005):
                self.peak_abs = max(self.peak_abs, proc.memory_info().rss)
                self.peak = max(self.peak, self.peak_abs - self._base)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_abs = torch.cuda.max_memory_allocated(self.device)
            self.peak = self.peak_abs - self._base
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ----------------------------------------------------------------------------- data + store


def demo_teachers(real: bool = True) -> dict[str, str | None]:
    """Teacher name → weights: two tiny random ViTs, plus EfficientNet-Lite0 when installed.

    The tiny DINOv2-style and CLIP-style towers run the real teachers' code paths at toy width;
    EfficientNet-Lite0 (ImageNet weights from its pip package) is a real pretrained teacher.
    """
    from pipelines.teachers import efficientnet_lite0_weights_path

    teachers: dict[str, str | None] = dict.fromkeys(TINY_TEACHERS)
    path = efficientnet_lite0_weights_path() if real else None
    if path is not None:
        teachers[EFFNET] = str(path)
    return teachers


def prepare_source(out: Path, data: str | None, s: DemoSettings, seed: int) -> Path:
    """The dataset folder: ``data`` as given, or a freshly generated synthetic one."""
    if data is not None:
        if not Path(data).exists():
            raise DemoError(f"--data {data} does not exist; pass a dataset folder")
        return Path(data)
    from pipelines.synthetic import generate_synthetic

    return generate_synthetic(out / "data", n_images=s.n_images, size=s.image_size, seed=seed)


def extract_store(src: Path, store: Path, teachers: dict[str, str | None], s: DemoSettings,
                  layout: str, device: str) -> tuple[str, float]:
    """Extract the teachers into ``store``; return ``(url, seconds)``."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction

    cfg = ExtractConfig(source=str(src), out=str(store), layout=layout, tile_size=s.tile_size,
                        teachers=tuple(teachers), tiny=True,
                        weights={k: v for k, v in teachers.items() if v},
                        scales=s.scales, flip=True, batch_size=8, device=device,
                        tiles_per_shard=8, base_size=s.crop, overwrite=True,
                        threads=torch.get_num_threads(), limit=s.max_tiles)
    t0 = time.perf_counter()
    url = run_extraction(cfg, progress=False)
    return url, time.perf_counter() - t0


def write_splits(store: Any, out: Path, s: DemoSettings, seed: int) -> dict[str, Path]:
    """Tile-id files: labeled / unlabeled / val, a seeded shuffle of the store's tiles."""
    ids = [t.tile_id for t in store.tiles]
    if len(ids) < s.n_labeled + s.n_val + s.batch:
        raise DemoError(f"the dataset gives {len(ids)} tiles; the demo needs at least "
                        f"{s.n_labeled + s.n_val + s.batch} (more images or a smaller tile)")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = {"val": order[:s.n_val], "labeled": order[s.n_val:s.n_val + s.n_labeled],
             "unlabeled": order[s.n_val + s.n_labeled:]}
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, idx in parts.items():
        files[name] = out / f"{name}.txt"
        files[name].write_text("".join(f"{ids[i]}\n" for i in sorted(idx)))
    return files


# ----------------------------------------------------------------------------- training


def train_config(mode: str, store: str, splits: dict[str, Path], out: Path,
                 teachers: dict[str, str | None], s: DemoSettings, device: str,
                 seed: int) -> Any:
    """The demo's ``TrainConfig`` (tiny student, all teachers on the full-crop branch)."""
    from trainer.config import (
        DataConfig,
        EvalConfig,
        ModelConfig,
        OptimConfig,
        RuntimeConfig,
        ScheduleConfig,
        TeacherConfig,
        TrainConfig,
    )

    return TrainConfig(
        mode=mode, crop_size=s.crop,
        data=DataConfig(store=store, labeled=str(splits["labeled"]),
                        unlabeled=str(splits["unlabeled"]), val=str(splits["val"]),
                        num_workers=0),
        model=ModelConfig(teachers=[TeacherConfig(n, "full", w) for n, w in teachers.items()],
                          tiny=True),
        optim=OptimConfig(lr=s.lr, lr_multi=s.lr_multi),
        schedule=ScheduleConfig(batch_labeled=s.batch, batch_unlabeled=s.batch, iters=s.iters,
                                eval_interval=s.eval_every, ckpt_interval=s.iters,
                                log_interval=1),
        eval=EvalConfig(mode="whole"),
        runtime=RuntimeConfig(out_dir=str(out / mode), device=device, seed=seed,
                              progress=False, tensorboard=False),
    ).validate()


def _pair_with(trainer: Any, init_path: Path, teachers_path: Path | None) -> None:
    """Save the cached run's student init, or give the online run that init and the teachers.

    The online trainer builds its teachers from the registry itself; loading the states of the
    teachers the store was extracted with makes its targets come from the very same networks.
    """
    if teachers_path is None:
        torch.save(trainer.model.state_dict(), init_path)
        return
    init = torch.load(init_path, map_location=trainer.device, weights_only=True)
    trainer.model.load_state_dict(init)
    trainer.ema.module.load_state_dict(init)
    for name, state in torch.load(teachers_path, map_location=trainer.device,
                                  weights_only=True).items():
        trainer.online[name].load_state_dict(state)


def _read_log(path: Path) -> dict[str, list[float]]:
    import csv

    cols: dict[str, list[float]] = {}
    if not path.is_file():
        return cols
    with path.open() as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if v not in ("", None):
                    cols.setdefault(k, []).append(float(v))
    return cols


def _read_evals(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def predict_tiles(model: torch.nn.Module, store: Any, indices: list[int], crop: int,
                  device: torch.device) -> list[np.ndarray]:
    """Argmax label maps of whole tiles (the evaluation's ``whole`` mode)."""
    from trainer.evaluate import predict_logits

    model.eval()
    out = []
    for i in indices:
        x = torch.from_numpy(store.read_image(i)).to(device).permute(2, 0, 1)[None].float() / 255
        out.append(predict_logits(model, x, "whole", crop).argmax(1)[0].cpu().numpy())
    return out


def run_training(cfg: Any, show: list[int], init_path: Path,
                 teachers_path: Path | None = None) -> RunRecord:
    """Train one mode, timed and memory-profiled (setup included: online loads teachers)."""
    from trainer.engine import Trainer

    device = torch.device(cfg.runtime.device)
    with PeakMemory(device) as mem:
        trainer = Trainer(cfg)
        _pair_with(trainer, init_path, teachers_path)
        t0 = time.perf_counter()
        result = trainer.run()
        seconds = time.perf_counter() - t0
    out = Path(cfg.runtime.out_dir)
    b = cfg.schedule
    rec = RunRecord(cfg.mode, seconds, int(mem.peak), out, result.metrics,
                    _read_evals(out / "eval.jsonl"), _read_log(out / "metrics.csv"),
                    result.step * (b.batch_labeled + b.batch_unlabeled),
                    predict_tiles(trainer.ema.module, trainer.data.reader, show, cfg.crop_size,
                                  trainer.device))
    rec.max_rss = mem.peak_abs
    return rec


def _train_child(cfg_dict: dict[str, Any], show: list[int], init_path: Path,
                 teachers_path: Path | None) -> RunRecord:
    from trainer.config import TrainConfig

    return run_training(TrainConfig.from_dict(cfg_dict), show, init_path, teachers_path)


def train_in_fresh_process(cfg: Any, show: list[int], init_path: Path,
                           teachers_path: Path | None = None) -> RunRecord:
    """``run_training`` in a new (spawned) process, so each mode's memory is its own.

    Fork is not an option: a process forked after torch ran OpenMP work can hang.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_train_child, cfg.to_dict(), show, init_path, teachers_path).result()


def extraction_teacher_states(store: Any, teachers: dict[str, str | None],
                              device: str) -> dict[str, Any]:
    """The teachers exactly as extraction built them (same seeds), by store teacher name."""
    from featcache.audit import create_store_teacher

    out = {}
    for name, weights in teachers.items():
        t = create_store_teacher(store, name, weights, True, torch.device(device))
        out[t.spec.name] = t
    return out


def teacher_gflops(teacher: Any, canvas: int) -> float:
    """Forward GFLOPs of one ``canvas`` px image (torch's flop counter: matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, canvas, canvas, device=teacher.device)
    with FlopCounterMode(display=False) as counter:
        teacher(x)
    return counter.get_total_flops() / 1e9


def level_gflops(teacher: Any, levels: Any, crop: int) -> dict[str, float]:
    """GFLOPs per image of each cached level and of a training view (``"view"``)."""
    by_canvas: dict[int, float] = {}
    out = {}
    for key, canvas in [(lv.key, lv.canvas_px(crop)) for lv in levels] + [("view", crop)]:
        if canvas not in by_canvas:  # flipped copies and the view share canvas sizes
            by_canvas[canvas] = teacher_gflops(teacher, canvas)
        out[key] = by_canvas[canvas]
    return out


# ----------------------------------------------------------------------------- entry point


def run_demo(out_dir: str | Path, data: str | None = None, quick: bool = False,
             device: str = "cpu", seed: int = 0, layout: str = "auto",
             settings: DemoSettings | None = None,
             echo: Callable[[str], None] | None = None) -> Path:
    """Run the whole demo and write ``out_dir/report/summary.md`` plus PNG figures.

    Args:
        out_dir: Output folder (data, store, runs, report).
        data: A dataset folder instead of synthetic data (tiles of ``tile_size`` px are cut).
        quick: Smallest settings (tests).
        device: Torch device.
        seed: Seed of data, splits, student init and augmentation.
        layout: Layout of ``data`` (``auto``; ``loveda-folder`` for LoveDA-encoded masks).
        settings: Override the sizes entirely.
        echo: Called with a line at each phase (progress); None is silent.

    Returns:
        Path of ``summary.md``.
    """
    from featcache.report import write_report
    from featstore import open_store

    s = settings or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    clock = _PhaseClock(phases, echo)
    with clock("data"):
        src = prepare_source(out, data, s, seed)
        teachers = demo_teachers(s.real_teacher)
    with clock("extraction"):
        url, t_extract = extract_store(src, out / "store.zarr", teachers, s, layout, device)
        store = open_store(url)
        splits = write_splits(store, out / "splits", s, seed)
    ids = [t.tile_id for t in store.tiles]
    show = sorted(ids.index(i) for i in splits["val"].read_text().split())[:3]
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    init_path, teachers_path = runs_dir / "student_init.pt", runs_dir / "teachers.pt"
    with clock("teachers (flop count, states)"):
        built = extraction_teacher_states(store, teachers, device)
        torch.save({n: t.state_dict() for n, t in built.items()}, teachers_path)
        flops = {n: level_gflops(t, store.levels(n), s.crop) for n, t in built.items()}
        names = dict(zip(built, teachers.values(), strict=True))
        del built
    runs = {}
    for mode in ("cached", "online"):
        with clock(f"{mode} training (fresh process)"):
            cfg = train_config(mode, url, splits, runs_dir, names, s, device, seed)
            runs[mode] = train_in_fresh_process(cfg, show, init_path,
                                                teachers_path if mode == "online" else None)
    info = {"settings": replace(s), "source": str(src), "data_given": data is not None,
            "device": device, "threads": torch.get_num_threads(), "seed": seed,
            "extract_seconds": t_extract, "flops": flops, "show": show, "phases": phases,
            "n_train_tiles": sum(len(splits[k].read_text().split())
                                 for k in ("labeled", "unlabeled"))}
    info["load_per_core"] = os.getloadavg()[0] / (os.cpu_count() or 1)
    with clock("report"):
        info["total_seconds"] = sum(phases.values())
        path = write_report(out / "report", store, runs, info)
    return path


class _PhaseClock:
    """``with clock(name):`` records the phase's wall time and announces it."""

    def __init__(self, phases: dict[str, float], echo: Callable[[str], None] | None) -> None:
        self.phases, self.echo = phases, echo

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.echo:
            self.echo(f"[demo] {name} ...")
        t0 = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - t0
        if self.echo:
            self.echo(f"[demo] {name}: {self.phases[name]:.1f} s")


__all__ = ["FULL", "QUICK", "DemoError", "DemoSettings", "PeakMemory", "RunRecord", "run_demo"]
