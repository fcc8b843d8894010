"""The training loop: FixMatch + EMA + distillation (cached or online), eval, checkpoints, DDP.

``train(cfg)`` is the one entry point (the CLI and torchrun call it). Business logic lives in
``trainer.step`` (one step), ``trainer.prepare`` (data, model), ``trainer.evaluate`` and
``trainer.checkpoint``; this module only orchestrates.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from featstore.faults import fault_point
from featviews.bank import bank_reuse
from trainer.checkpoint import (
    RESUME_KEYS,
    load_state,
    read_checkpoint,
    require_keys,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.config import TrainConfig, check_device
from trainer.distributed import DistInfo, barrier, init_distributed, mean_over_ranks, shutdown
from trainer.durable import check_writable_folder
from trainer.ema import create_ema, update_ema
from trainer.evaluate import evaluate, protocol_json, resolve_protocol
from trainer.logging_utils import RunLogger, eval_columns, eval_scalars
from trainer.losses import check_finite
from trainer.methods import method_class
from trainer.prepare import (
    RunData,
    build_loaders,
    build_source,
    data_departures,
    open_data,
    resolve_branches,
    run_summary,
)
from trainer.presets import departures
from trainer.rundir import (
    check_deletable,
    check_out_dir,
    check_resume_recipe,
    delete_run,
    remove_run_files,
    run_files,
)
from trainer.step import poly_lr

LOG = logging.getLogger(__name__)


@dataclass
class RunState:
    """Progress of a run (what a checkpoint restores besides the weights)."""

    step: int = 0
    best: float | None = None
    best_step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What `train` returns."""

    step: int
    losses: list[float]
    metrics: dict[str, Any]
    best: float | None
    out_dir: Path


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the student init and anything else drawn globally)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resume_path(cfg: TrainConfig) -> Path | None:
    resume = cfg.runtime.resume
    if not resume:
        return None
    if resume == "auto":
        path = Path(cfg.runtime.out_dir) / "latest.pt"
        return path if path.is_file() else None
    return Path(resume)


class Trainer:
    """Holds the run's objects; `run` drives the loop.

    Args:
        cfg: Run config; a copy is kept, with what the data decides filled in (the teachers and
            their branches, the partition), and that copy is what ``config.yaml`` records.
        overwrite: ``--overwrite``: delete the run already in ``out_dir`` (only a folder that
            is recognisably a featcache run; see `trainer.rundir`).
    """

    def __init__(self, cfg: TrainConfig, overwrite: bool = False) -> None:
        self.cfg = cfg = copy.deepcopy(cfg).validate()
        check_device(cfg.runtime.device)
        self.info, self.device = init_distributed(cfg.runtime.device)
        seed_everything(cfg.runtime.seed)
        self.out = Path(cfg.runtime.out_dir)
        self._claim_out_dir(overwrite)
        resume = _resume_path(cfg)
        self.ckpt = read_checkpoint(resume) if resume else None
        if self.ckpt is not None:
            require_keys(self.ckpt, RESUME_KEYS, resume, "resume a run")
            # a field this version lacks: named first
            method_class(cfg.method).check_checkpoint(self.ckpt, resume)
            check_resume_recipe(self.ckpt["config"], cfg, resume)
        method_cls = method_class(cfg.method)
        method_cls.configure(cfg)
        self.data: RunData = open_data(cfg, self.ckpt.get("store") if self.ckpt else None)
        self.online = self._online_teachers()
        resolve_branches(cfg, self.data.store, self.online)
        self.summary = run_summary(cfg, self.data, method_cls)
        # the means reported besides all classes: --exclude-classes, or what the data records
        self.protocol = resolve_protocol(
            self.data.reader, self.data.class_names, cfg.eval.exclude_classes, "--exclude-classes"
        )
        self.summary.append(f"evaluation protocol: {self.protocol.describe(self.data.class_names)}")
        self.source = build_source(cfg, self.data, self.online)
        self.method = method_cls(cfg, self.data, self.source, self.device)
        self.model = self.method.build_model(self.online).to(self.device)
        # a method without EMA (Co2S) gets no copy at all: no memory, no update, no checkpoint
        self.ema = create_ema(self.model, cfg.fixmatch.ema_max) if method_cls.uses_ema else None
        self.optimizers = self.method.optimizers(self.model)
        self.optimizer = self.optimizers[0]  # the one of single-optimizer methods; logs its lr
        self.loaders = build_loaders(
            cfg, self.data, self.info, self.source, labeled_only=not method_cls.unlabeled
        )
        sch = cfg.schedule
        self.total = sch.iters or sch.epochs * self.loaders.per_epoch
        self.state = RunState()
        self._saved = False
        if self.ckpt is not None:
            self._restore(self.ckpt, str(resume))
        self.ddp = self._wrap()
        self.bank_reuse = self._bank_reuse()

    def _claim_out_dir(self, overwrite: bool) -> None:
        """Refuse an ``--out`` holding another run; under ``--overwrite`` delete that run."""
        check_writable_folder(self.out, "--out")  # before any work, not at the first write
        check_out_dir(self.out, bool(self.cfg.runtime.resume), overwrite)
        if not overwrite:
            return
        check_deletable(self.out)  # every rank checks before rank 0 deletes anything
        barrier()
        if self.info.is_main:
            delete_run(self.out)
        barrier()

    def _bank_reuse(self) -> float | None:
        """How often each bank view is used over the run (logged; None without a bank)."""
        if not self.source.needs_bank:
            return None
        cfg, store = self.cfg, self.data.store
        n_train = len(set(self.data.sets["labeled"]) | set(self.data.sets["unlabeled"]))
        # every view of an iteration (labeled + unlabeled, all ranks) is drawn from the bank
        batch = (cfg.schedule.batch_labeled + cfg.schedule.batch_unlabeled) * self.info.world
        reuse = bank_reuse(store.bank.k, n_train, self.total, batch, cfg.distill.p_bank)
        LOG.info(
            "view bank: K=%d views per tile, p_bank=%.2f: each view is used about %.1f times "
            "over %d iterations",
            store.bank.k,
            cfg.distill.p_bank,
            reuse,
            self.total,
        )
        return reuse

    def _online_teachers(self) -> dict[str, Any] | None:
        if self.cfg.reads_cache or not self.cfg.model.teachers:
            return None
        from trainer.online import load_teachers

        return load_teachers(
            self.cfg.model.teachers,
            self.cfg.model.tiny,
            self.device,
            self.data.base_size,
            self.cfg.model.random_weights,
            store=self.data.store,  # a teacher the store records must match its stored spec
        )

    def _wrap(self) -> torch.nn.Module:
        if not self.info.enabled:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=False)

    @property
    def _ema_module(self) -> torch.nn.Module | None:
        return self.ema.module if self.ema is not None else None

    # ------------------------------------------------------------------ checkpoints

    def _restore(self, ckpt: dict[str, Any], path: str) -> None:
        self.method.check_architecture(ckpt, self.model, path)
        load_state(self.model, ckpt["student"], f"{path} [student]")
        if self.ema is not None:
            load_state(self.ema.module, ckpt["ema"], f"{path} [ema]")
        states = ckpt["optimizer"]  # one state dict, or a list of them (several optimizers)
        for opt, state in zip(self.optimizers, _as_list(states), strict=True):
            opt.load_state_dict(state)
        run = ckpt["run"]
        self.state = RunState(
            int(run["step"]), run.get("best"), run.get("best_step"), ckpt.get("metrics", {})
        )
        set_rng_state(ckpt["rng"])

    def _save(self, name: str) -> None:
        self._saved = True  # on every rank: rank 0 keeps the folder of a run that checkpointed
        if not self.info.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        s = self.state
        save_checkpoint(
            self.out / name,
            {
                "student": self.model.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else {},
                "optimizer": _one_or_list([o.state_dict() for o in self.optimizers]),
                "run": {
                    "step": s.step,
                    "best": s.best,
                    "best_step": s.best_step,
                    "epoch": s.step // self.loaders.per_epoch,
                    "iter_in_epoch": s.step % self.loaders.per_epoch,
                },
                "rng": rng_state(),
                "config": self.cfg.to_dict(),
                "student_config": self.method.architecture(self.model),
                "store": self.data.store_meta(),
                "class_names": list(self.data.class_names),
                "tile": {"tile_size": self.data.tile_size, "base_size": self.data.base_size},
                "metrics": s.metrics,
            },
        )

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, logger: RunLogger) -> dict[str, float]:
        """Validate both models; returns their metrics.csv columns (`eval_scalars`)."""
        val = self.data.sets["val"]
        if not val:
            return {}
        c = self.cfg
        metrics = evaluate(
            self.method.evaluated(self.model, self._ema_module),
            self.data.reader,
            val,
            self.data.num_classes,
            c.eval.mode,
            c.crop_size,
            c.eval.stride,
            self.device,
            c.eval.batch_size,
            self.data.ignore_index,
            c.runtime.bf16,
            exclude_classes=self.protocol.exclude,
        )
        self.state.metrics = metrics
        logger.evaluation(
            self.state.step, metrics, protocol_json(self.protocol, self.data.class_names)
        )
        value = float(metrics[c.eval.best_model][c.eval.best_metric])
        if self.state.best is None or value > self.state.best:
            self.state.best, self.state.best_step = value, self.state.step
            self._save("best.pt")
        return eval_scalars(metrics, self.protocol.name)

    # ------------------------------------------------------------------ loop

    def _step(self, batch_l: dict[str, Any], batch_u: dict[str, Any] | None) -> dict[str, Any]:
        step = self.state.step
        gen = torch.Generator(device=self.device)
        # Per-step seed: the on-device augmentation replays exactly after a resume.
        gen.manual_seed(self.cfg.runtime.seed * 1_000_003 + step * 7 + self.info.rank)
        self.method.set_progress(step, self.total)
        terms = self.method.losses(self.ddp, self._ema_module, batch_l, batch_u, gen)
        rows = batch_l["index"].tolist() + ([] if batch_u is None else batch_u["index"].tolist())
        # tile ids, not row numbers: what `featcache verify` and the split files name
        check_finite(terms, step, [self.data.tiles[i].tile_id for i in rows])
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        for opt in self.optimizers:
            opt.step()
            poly_lr(opt, step, self.total, self.cfg.optim.poly)
        if self.ema is not None:
            update_ema(self.ema, self.model, step)
        self.state.step += 1
        return {k: v.detach() for k, v in terms.items()}

    def _due(self, interval: int, end_of_epoch: bool) -> bool:
        s = self.state.step
        return (
            s == self.total
            or (interval > 0 and s % interval == 0)
            or (interval == 0 and end_of_epoch)
        )

    def announce(self, echo: Callable[[str], None] | None = None) -> None:
        """Log the run's summary (teachers, branches, levels, target mode, sets) on rank 0."""
        if not self.info.is_main:
            return
        for line in self.summary:
            # a random-init student (prepare._student_line) is a warning, not news
            LOG.log(logging.WARNING if line.startswith("WARNING") else logging.INFO, "%s", line)
            if echo is not None:
                echo(line)

    def run(self, echo: Callable[[str], None] | None = None) -> TrainResult:
        """Train to ``total`` iterations (or ``stop_after``), evaluating and checkpointing.

        A new run that fails before its first checkpoint removes what it wrote (nothing in it
        could be resumed); a resumed run keeps its folder.

        Args:
            echo: Also print the run's first lines with it (the CLI passes ``click.echo``).
        """
        self.announce(echo)
        fresh = self.ckpt is None and not run_files(self.out)
        created = not self.out.exists()
        losses: list[float] = []
        done = False
        try:
            if self.info.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                # the departures also as data: a reader need not parse the header's comments
                record = [d.to_dict() for d in departures(self.cfg, data_departures(self.data))]
                self.cfg.dump(self.out / "config.yaml", header=self.summary, record=record)
            self._loop(losses)
            done = True
        finally:
            if not done and fresh and not self._saved and self.info.is_main:
                remove_run_files(self.out, remove_dir=created)
        return TrainResult(self.state.step, losses, self.state.metrics, self.state.best, self.out)

    def _loop(self, losses: list[float]) -> None:
        cfg, per = self.cfg, self.loaders.per_epoch
        logger = RunLogger(
            self.out,
            self.total,
            self.state.step,
            self.info.is_main,
            cfg.runtime.progress,
            cfg.runtime.tensorboard,
            eval_columns(self.method.evaluated_names, self.protocol.name),
        )
        stop = min(self.total, cfg.schedule.stop_after or self.total)
        self.model.train()
        try:
            while self.state.step < stop:
                epoch, skip = divmod(self.state.step, per)
                loader_l, loader_u = self.loaders.epoch(cfg, epoch, skip)
                stream = (
                    zip(loader_l, loader_u, strict=False)
                    if loader_u is not None
                    else ((b, None) for b in loader_l)
                )
                for batch_l, batch_u in stream:
                    terms = self._step(batch_l, batch_u)
                    fault_point("train.step")  # test-only SIGKILL hook (featstore.faults)
                    s = self.state.step
                    end_epoch = s % per == 0
                    # an evaluated step always gets its metrics.csv row (val columns filled)
                    evaluate_now = self._due(cfg.schedule.eval_interval, end_epoch)
                    write = s % cfg.schedule.log_interval == 0 or s == stop or evaluate_now
                    scalars = mean_over_ranks(terms) if write else {}
                    losses.append(float(terms["loss"]))
                    if write:
                        scalars["lr"] = self.optimizer.param_groups[0]["lr"]
                    if evaluate_now:
                        scalars.update(self._evaluate(logger))
                    logger.step(s, scalars, write)
                    if self._due(cfg.schedule.ckpt_interval, end_epoch) or s == stop:
                        self._save("latest.pt")
                    if s >= stop:
                        break
                barrier()
        finally:
            logger.close()


def _one_or_list(states: list[Any]) -> Any:
    """A checkpoint's ``optimizer``: the state dict itself for one optimizer (the format of
    every single-optimizer run), a list for several."""
    return states[0] if len(states) == 1 else states


def _as_list(states: Any) -> list[Any]:
    return states if isinstance(states, list) else [states]


def train(
    cfg: TrainConfig, echo: Callable[[str], None] | None = None, overwrite: bool = False
) -> TrainResult:
    """Run (or resume) a training run described by ``cfg``; see `TrainConfig`.

    ``echo``: prints the run's first lines (what it distils from, its sets) besides the log.
    ``overwrite`` (``--overwrite``): delete the run already in ``runtime.out_dir`` first; without
    it (and without ``runtime.resume``) a folder holding a run is refused.
    """
    trainer = Trainer(cfg, overwrite)
    try:
        return trainer.run(echo)
    finally:
        shutdown()


__all__ = ["DistInfo", "RunState", "TrainResult", "Trainer", "seed_everything", "train"]
