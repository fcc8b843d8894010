"""Co2S: a CLIP and a DINOv3 student trained together (UniMatch dual stream + stability loss).

One step (co2s-reference §2.2): per student a no-grad pass on the CutMix partners, a pass on
``cat(labeled, weak)`` with the feature-perturbed copy, a pass on ``cat(s1, s2)``; the student's
UniMatch loss (`trainer.co2s.losses.student_loss`) plus lambda(t) times its stability term. The
two students share no parameter and each stability term reaches only its learning student, so one
backward of the sum gives each student exactly the gradient of its own loss (the official code
calls backward twice). Two AdamW optimisers with the reference's per-group learning rates, poly
schedule; no EMA (the engine keeps none for this method).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from featstore.errors import FeatcacheError
from featviews.geometry import ViewGeometry
from featviews.sources import Views
from trainer.checkpoint import CheckpointError, load_state, weight_set
from trainer.co2s.losses import (
    masked_ce,
    stability_loss,
    stability_weight,
    student_loss,
    supervised_ce,
)
from trainer.co2s.sliding import FusedLogits, StudentLogits, official_stride
from trainer.co2s.views import (
    Co2SViews,
    PseudoLabels,
    mix_pseudo,
    pseudo_from_logits,
    render_co2s,
)
from trainer.config import TrainConfig
from trainer.errors import TrainConfigError
from trainer.losses import distill_loss
from trainer.methods.base import Method, register_method
from trainer.step import autocast, normalize
from trainer.student import StudentConfig, _module_key

# The two students, in the order of the official code (model 1 = CLIP, model 2 = DINOv3).
KINDS = ("clip", "dinov3")
DEFAULT_BEST = "clip"  # the student the official README reports (best_clip.pth)
RECORD = "co2s"  # student_config["method"] of a Co2S checkpoint
# --co2s-distill: which students learn the teachers' targets
DISTILLED = {"none": (), "clip": ("clip",), "dinov3": ("dinov3",), "both": KINDS}
TRANSLATED = "translated"  # Co2SPair.forward's key of the translated tokens
# The CLIP student's class text rows: a buffer of the checkpoint (predict needs no text tower).
TEXT_KEY = "students.clip.text_embeddings"
# What rebuilding the students reads from the record (`Co2S._record`).
REBUILD_FIELDS = ("num_classes", "size", "finetune", "clip_act", "crop")


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DDP
    return inner if isinstance(inner, nn.Module) else model


class Co2SPair(nn.Module):
    """Both students; ``forward`` runs a step's gradient passes (so DDP sees one forward).

    Args:
        students: ``{kind: Co2SStudent}`` for every kind of `KINDS`.
        record: The architecture record saved in checkpoints (``student_config``).
    """

    def __init__(self, students: Mapping[str, nn.Module], record: dict[str, Any]) -> None:
        super().__init__()
        self.students = nn.ModuleDict({k: students[k] for k in KINDS})
        self.record = record
        # --co2s-distill: per distilled student, one translator per teacher (record["distill"]:
        # {kind: {teacher: channels}}), reading the student's top map (the cost volume's input)
        self.translators = nn.ModuleDict(
            {
                kind: nn.ModuleDict(
                    {
                        _module_key(t): _translator(self.students[kind].backbone.embed_dim, c)
                        for t, c in teachers.items()
                    }
                )
                for kind, teachers in record.get("distill", {}).items()
            }
        )

    def forward(self, x_lw: torch.Tensor, x_s: torch.Tensor) -> dict[str, Any]:
        """``{kind: (logits of x_lw, feature-perturbed logits of x_lw, logits of x_s)}``; with
        translators also ``{TRANSLATED: {kind: {teacher: [B, n, n, C] tokens of x_lw}}}``."""
        out: dict[str, Any] = {}
        translated: dict[str, dict[str, torch.Tensor]] = {}
        for kind, student in self.students.items():
            top: list[torch.Tensor] = []
            hook = None
            if kind in self.translators:  # the backbone's clean maps of x_lw (before FP)
                hook = student.backbone.register_forward_hook(_keep_top(top))
            logits, logits_fp = student(x_lw, need_fp=True)
            if hook is not None:
                hook.remove()
                tokens = top[0].permute(0, 2, 3, 1)  # [B, C, n, n] -> [B, n, n, C]
                translated[kind] = {t: m(tokens) for t, m in self.translators[kind].items()}
            out[kind] = (logits, logits_fp, student(x_s))
        if translated:
            out[TRANSLATED] = translated
        return out


def _keep_top(kept: list[torch.Tensor]) -> Callable[..., None]:
    """A forward hook appending a backbone's top map (the last of its pyramid) to ``kept``."""

    def hook(module: nn.Module, inputs: Any, output: Sequence[torch.Tensor]) -> None:
        kept.append(output[-1])

    return hook


def _translator(dim: int, channels: int) -> nn.Module:
    """RS-MTDF's translator MLP (`trainer.student`): ``dim -> hidden -> channels``."""
    hidden = StudentConfig.translator_hidden
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))


@contextmanager
def step_seeded_rng(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Inside: the global RNG seeded from the step's generator; after: restored as it was.

    The feature-perturbed stream's channel dropout (`F.dropout2d`) draws from the global RNG,
    which does not replay after a resume (a resumed run creates its loader iterators, which
    draw from it, at another point); seeded from the step's generator it does, on every rank
    its own (the generator's seed has the rank). Measured on the real LoveDA sample
    (tests/trainer/test_co2s_loveda.py): without it a run killed at step 7 and resumed diverged
    from the uninterrupted one at the first step with a confident pixel in the stream.
    """
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed.item()))
        yield


def _student_factory() -> Callable[..., nn.Module]:
    """`trainer.co2s.student.build_co2s_student` (imported here: tests swap it)."""
    from trainer.co2s.student import build_co2s_student

    return build_co2s_student


def _text_reader() -> Callable[..., Any]:
    """`featstore.text.read_text_embeddings` (imported here: tests swap it)."""
    from featstore.text import read_text_embeddings

    return read_text_embeddings


def text_embeddings(store: Any, variant: str, num_classes: int) -> torch.Tensor:
    """The store's class text embeddings ``[K, D]`` (float32), or an error saying how to write
    them (`featcache text`)."""
    fix = (
        f"write them with `featcache text STORE --classes ... --concepts builtin` "
        f"(variant {variant!r}, co2s.text_variant / --text-variant)"
    )
    if store is None:
        raise TrainConfigError(f"--method co2s reads class text embeddings from a store: {fix}")
    try:
        emb, _ = _text_reader()(store, variant=variant)
    except (FeatcacheError, KeyError, FileNotFoundError) as err:
        raise TrainConfigError(
            f"--method co2s: the store has no usable {variant!r} class text embeddings "
            f"({err}); {fix}"
        ) from err
    emb = torch.as_tensor(emb, dtype=torch.float32)
    if emb.ndim != 2 or emb.shape[0] != num_classes:
        raise TrainConfigError(
            f"--method co2s: the store's {variant!r} text embeddings have shape "
            f"{tuple(emb.shape)}, not one row per class ({num_classes}); {fix}"
        )
    return emb


@register_method
class Co2S(Method):
    """Two heterogeneous students (CLIP with class text embeddings, DINOv3 with learnable
    queries), each trained with UniMatch's weak/strong/feature-perturbed streams, coupled by the
    confidence-arbitrated stability loss."""

    name = "co2s"
    summary = (
        "CLIP + DINOv3 students, UniMatch dual stream each, confidence-arbitrated stability "
        "loss; no EMA, no teacher (--co2s-distill: the store's); evaluated with sliding windows "
        "at stride 5/6 crop; best.pt "
        "chosen on the run's val set (the official code chooses on its test split)"
    )
    distils = False
    uses_ema = False
    evaluated_names = ("clip", "dinov3", "fused")

    def __init__(self, cfg: TrainConfig, data: Any, source: Any, device: torch.device) -> None:
        super().__init__(cfg, data, source, device)
        self.step, self.total = 0, 1

    @classmethod
    def data_lines(cls, cfg: TrainConfig, data: Any) -> list[str]:
        """Which class text rows the CLIP student reads and which tower made them; a random
        tower is said out loud (its rows carry no meaning)."""
        variant = cfg.co2s.text_variant
        try:
            _, attrs = _text_reader()(data.store, variant=variant)
        except (FeatcacheError, KeyError, FileNotFoundError):
            return []  # build_model stops with the error that says how to write them
        made = str(attrs.get("weights_sha256", "?"))
        line = (
            f"class text: {variant!r} rows of the store's text group (--text-variant), "
            f"{attrs.get('model', '?')}, weights {made[:12]}"
        )
        if made.startswith("random"):
            return [f"WARNING: {line}: a RANDOM text tower; re-run `featcache text` with --weights"]
        return [line]

    @classmethod
    def configure(cls, cfg: TrainConfig) -> None:
        """No teachers; the official evaluation (sliding windows at 5/6 crop); best.pt on the
        CLIP student unless ``eval.best_model`` names another of `evaluated_names`."""
        if DISTILLED[cfg.co2s.distill]:  # beyond both papers: the store's teachers too
            if cfg.distill.standardize:
                raise TrainConfigError(
                    "--co2s-distill does not standardise targets yet: drop --standardize"
                )
            cfg.distill.enabled = True  # model.teachers unset: every teacher of the store
        elif cfg.model.teachers:
            raise TrainConfigError(
                f"--method co2s trains without distillation teachers, but model.teachers names "
                f"{[t.name for t in cfg.model.teachers]}: drop --teacher, or distil them into "
                "the students with --co2s-distill clip|dinov3|both"
            )
        else:
            cfg.model.teachers, cfg.distill.enabled = None, False
        cfg.eval.mode = "sliding"  # the only protocol of the official code (reference §3)
        if cfg.eval.stride is None:
            cfg.eval.stride = official_stride(cfg.crop_size)
        if cfg.eval.best_model == "student":  # the library default names no Co2S model
            cfg.eval.best_model = DEFAULT_BEST
        if cfg.eval.best_model not in cls.evaluated_names:
            raise TrainConfigError(
                f"eval.best_model {cfg.eval.best_model!r}: --method co2s evaluates "
                f"{list(cls.evaluated_names)} (no EMA); pick one of them"
            )

    # ------------------------------------------------------------------ model

    def _record(self) -> dict[str, Any]:
        c = self.cfg.co2s
        return {
            "method": RECORD,
            "num_classes": int(self.data.num_classes),
            "size": "tiny" if self.cfg.model.tiny else "base",
            "finetune": c.finetune,
            "clip_act": c.clip_act,
            "text_variant": c.text_variant,
            "crop": int(self.cfg.crop_size),
        }

    def build_model(self, teachers: Mapping[str, Any] | None) -> nn.Module:
        """Both students, seeded by ``runtime.seed`` (every rank starts identical)."""
        record, c = self._record(), self.cfg.co2s
        text = text_embeddings(self.data.store, c.text_variant, record["num_classes"])
        if DISTILLED[c.distill]:
            from trainer.prepare import teacher_channels

            channels = teacher_channels(self.cfg, self.data, teachers)
            record["distill"] = {kind: dict(channels) for kind in DISTILLED[c.distill]}
        build = _student_factory()
        torch.manual_seed(self.cfg.runtime.seed)
        students = {
            kind: build(
                kind,
                record["num_classes"],
                text if kind == "clip" else None,
                size=record["size"],
                finetune=c.finetune,
                clip_act=c.clip_act,
                weights=c.clip_weights if kind == "clip" else c.dino_weights,
                random_weights=self.cfg.model.random_weights,
                checkpointing=self.cfg.runtime.grad_checkpointing,
                crop=self.cfg.crop_size,
            )
            for kind in KINDS
        }
        return Co2SPair(students, record)

    def optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        """One AdamW per student over its groups (backbone / head / queries learning rates;
        a distilled student's translators at the head's rate, like RS-MTDF's)."""
        c, out, pair = self.cfg.co2s, [], _unwrap(model)
        for kind in KINDS:
            groups = pair.students[kind].param_groups(
                c.lr_backbone, c.lr_head, c.lr_queries, c.weight_decay
            )
            if kind in pair.translators:
                params = list(pair.translators[kind].parameters())
                groups.append(dict(params=params, lr=c.lr_head, weight_decay=c.weight_decay))
            for g in groups:
                g.setdefault("base_lr", g["lr"])  # the poly schedule scales from it
            out.append(torch.optim.AdamW(groups))
        return out

    @classmethod
    def check_checkpoint(cls, ckpt: Mapping[str, Any], path: Any) -> None:
        record = ckpt.get("student_config")
        if not isinstance(record, dict) or record.get("method") != RECORD:
            raise CheckpointError(
                f"checkpoint {path} is not a Co2S run's (its student_config records no "
                f"method {RECORD!r}); resume it with its own --method"
            )

    @classmethod
    def load_models(
        cls, ckpt: Mapping[str, Any], names: Sequence[str], path: Any
    ) -> dict[str, nn.Module]:
        """The pair rebuilt from its record (random init, zero text rows of the stored shape:
        the checkpoint's weights and text buffer replace them), then the models ``names`` of
        `evaluated_names` over it."""
        cls.check_checkpoint(ckpt, path)
        record, state = ckpt["student_config"], weight_set(dict(ckpt), "student", path)
        missing = [k for k in REBUILD_FIELDS if k not in record]
        if missing or TEXT_KEY not in state:
            raise CheckpointError(
                f"checkpoint {path}: the Co2S record lacks {missing or [TEXT_KEY]}; it was "
                "edited or written by another tool. Use the best.pt / latest.pt of a co2s run"
            )
        build = _student_factory()
        students = {
            kind: build(
                kind,
                int(record["num_classes"]),
                torch.zeros_like(state[TEXT_KEY]) if kind == "clip" else None,
                size=record["size"],
                finetune=record["finetune"],
                clip_act=record["clip_act"],
                random_weights=True,  # overwritten at once by the checkpoint's weights
                crop=int(record["crop"]),
            )
            for kind in KINDS
        }
        pair = Co2SPair(students, dict(record))
        load_state(pair, state, f"{path} [co2s students]")
        return {name: _evaluation_models(pair)[name] for name in names}

    def architecture(self, model: nn.Module) -> dict[str, Any]:
        return dict(_unwrap(model).record)

    def check_architecture(self, ckpt: Mapping[str, Any], model: nn.Module, path: Any) -> None:
        theirs, mine = ckpt.get("student_config", {}), self.architecture(model)
        diffs = [f"{k}: {theirs.get(k)!r} vs {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} holds other Co2S students ({'; '.join(diffs)}); use a "
                "checkpoint of this model or the same options"
            )

    # ------------------------------------------------------------------ step

    def set_progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    @torch.no_grad()
    def _partner_pseudo(self, pair: nn.Module, views: Co2SViews) -> dict[str, PseudoLabels]:
        """The no-grad, eval-mode pass of each student on the CutMix partners (reference §2.2)."""
        was = pair.training
        pair.eval()
        x, valid = normalize(views.x_partner), views.valid_partner
        out = {}
        with autocast(x.device, self.cfg.runtime.bf16):
            for kind in KINDS:
                out[kind] = pseudo_from_logits(pair.students[kind](x), valid)
        pair.train(was)
        return out

    def _student_terms(
        self,
        logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        views: Co2SViews,
        other: PseudoLabels,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One student's UniMatch terms and its weak logits (the stability loss's input)."""
        b_l, tau = views.x_l.shape[0], self.cfg.fixmatch.conf_thresh
        lw, lw_fp, ls = (t.float() for t in logits)
        pred_x, pred_w = lw[:b_l], lw[b_l:]
        pred_s1, pred_s2 = ls.chunk(2)
        weak = pseudo_from_logits(pred_w, views.valid_u)
        mixed1 = mix_pseudo(weak, other, views.boxes1)
        mixed2 = mix_pseudo(weak, other, views.boxes2)
        terms = {
            "loss_x": supervised_ce(pred_x, views.y_l),
            "loss_s1": masked_ce(pred_s1, mixed1.pseudo, mixed1.conf, mixed1.valid, tau),
            "loss_s2": masked_ce(pred_s2, mixed2.pseudo, mixed2.conf, mixed2.valid, tau),
            "loss_fp": masked_ce(lw_fp[b_l:], weak.pseudo, weak.conf, weak.valid, tau),
        }
        return terms, pred_w

    def losses(
        self,
        model: nn.Module,
        ema_model: nn.Module | None,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """``loss`` = sum of both students' losses; per-student terms under ``<kind>/...``."""
        del ema_model  # uses_ema = False
        if batch_u is None:
            raise TrainConfigError("--method co2s needs unlabeled views (--batch L+U, U >= 1)")
        fm = self.cfg.fixmatch
        views = render_co2s(
            batch_l,
            batch_u,
            self.device,
            generator,
            fm.cutmix_p,
            fm.photometric,
            fm.jitter_order,
            fm.blur,
            self.cfg.data.scale_range,
            self.cfg.data.flip_p,
        )
        others = self._partner_pseudo(_unwrap(model), views)
        x_lw = normalize(torch.cat([views.x_l, views.x_w]))
        x_s = normalize(torch.cat([views.x_s1, views.x_s2]))
        with step_seeded_rng(generator, x_lw.device), autocast(x_lw.device, self.cfg.runtime.bf16):
            outputs = model(x_lw, x_s)
        terms: dict[str, torch.Tensor] = {}
        weak: dict[str, torch.Tensor] = {}
        for kind in KINDS:
            parts, weak[kind] = self._student_terms(outputs[kind], views, others[kind])
            terms[f"{kind}/loss"] = student_loss(**parts)
            terms.update({f"{kind}/{k}": v for k, v in parts.items()})
        stab = stability_loss(
            weak[KINDS[0]], weak[KINDS[1]], fm.conf_thresh, self.cfg.co2s.stability_detach
        )
        lam = stability_weight(self.step, self.total)
        total = weak[KINDS[0]].new_zeros(())
        for kind, term in zip(KINDS, stab, strict=True):
            terms[f"{kind}/stability"] = term
            terms[f"{kind}/loss"] = terms[f"{kind}/loss"] + lam * term
            total = total + terms[f"{kind}/loss"]
        terms["stability_weight"] = total.new_tensor(lam)
        if TRANSLATED in outputs:  # --co2s-distill: added after the stability term
            for kind, per in self._distill_terms(outputs[TRANSLATED], views, batch_l, batch_u):
                mean = torch.stack(list(per.values())).mean()  # mean over teachers, weight 1
                terms.update({f"{kind}/distill/{t}": v for t, v in per.items()})
                terms[f"{kind}/distill"] = mean
                terms[f"{kind}/loss"] = terms[f"{kind}/loss"] + mean
                total = total + mean
        return {"loss": total, **terms}

    def _distill_terms(
        self,
        translated: Mapping[str, Mapping[str, torch.Tensor]],
        views: Co2SViews,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any],
    ) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """Per distilled student, the MSE of its translated tokens of ``cat(labeled, weak)``
        against the run's target source, per teacher.

        The source returns the targets of ``cat(labeled, strong)`` with the strong views'
        CutMix; the weak views are those views without CutMix (no box), so the targets come
        from the same sources as RS-MTDF's (cached, grid-aligned, bank, online), unchanged.
        """
        dev = self.device
        plain = Views(
            views.x_l,
            views.y_l,
            ViewGeometry.from_params(batch_l["view"], dev),
            views.x_w,
            views.x_w,  # the teachers (online source) see what the translators read
            ~views.valid_u,
            ViewGeometry.from_params(batch_u["view"], dev),
            torch.zeros(views.x_w.shape[0], 4, dtype=torch.int64, device=dev),  # no CutMix
        )
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for kind, per_key in translated.items():
            per: dict[str, torch.Tensor] = {}
            for t in self.cfg.teacher_list:
                pred = per_key[_module_key(t.name)].float()
                if t.name not in targets:
                    targets[t.name] = self.source(t.name, pred.shape[1], plain, batch_l, batch_u)
                target, valid = targets[t.name]
                per[t.name] = distill_loss(pred, target, valid, self.cfg.distill.masked)
            out.append((kind, per))
        return out

    def evaluated(self, model: nn.Module, ema_model: nn.Module | None) -> dict[str, nn.Module]:
        """Each student, and their per-pixel fusion by confidence."""
        return _evaluation_models(_unwrap(model))


def _evaluation_models(pair: nn.Module) -> dict[str, nn.Module]:
    """`Co2S.evaluated_names` over a pair: each student, and their fusion by confidence."""
    students = pair.students
    return {
        "clip": StudentLogits(students["clip"]),
        "dinov3": StudentLogits(students["dinov3"]),
        "fused": FusedLogits(students["clip"], students["dinov3"]),
    }


__all__ = ["KINDS", "Co2S", "Co2SPair", "text_embeddings"]
