"""Co2S step: losses on hand-built maps, the lambda ramp, views, sliding windows, fusion, and
short runs of the method through the engine (tiny students, synthetic store).

Expected values are written out by hand (or from the formula of co2s-reference §2.3 evaluated
with plain Python floats), never by the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featstore import open_store
from tests.helpers import build_store, tiny_config
from trainer.co2s.losses import (
    masked_ce,
    stability_loss,
    stability_masks,
    stability_weight,
    student_loss,
)
from trainer.co2s.sliding import FusedLogits, StudentLogits, fuse_by_confidence, official_stride
from trainer.co2s.views import PseudoLabels, mix_pseudo
from trainer.engine import Trainer, train
from trainer.errors import TrainConfigError
from trainer.evaluate import logits_sliding
from trainer.methods import Co2S
from trainer.step import normalize

TAU = 0.95


def _logits(p0: list[float]) -> torch.Tensor:
    """``[1, 2, 1, N]`` logits whose softmax gives class 0 probability ``p0[i]`` at pixel i."""
    p = torch.tensor(p0, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, -1).float()


# --- stability loss --------------------------------------------------------------------------

# pixel 0: a confident, b not -> b learns; 1: b confident, a not -> a learns;
# 2: both confident, a more -> b learns; 3: both below -> nobody.
P_A = [0.99, 0.60, 0.98, 0.70]
P_B = [0.60, 0.97, 0.96, 0.80]


def test_stability_masks_follow_the_three_cases() -> None:
    conf_a, conf_b = torch.tensor([P_A]), torch.tensor([P_B])
    m = stability_masks(conf_a, conf_b, TAU)
    assert m.a_learns.tolist() == [[False, True, False, False]]
    assert m.b_learns.tolist() == [[True, False, True, False]]


def test_stability_values_and_gradients_on_hand_built_maps() -> None:
    la, lb = _logits(P_A).requires_grad_(), _logits(P_B).requires_grad_()
    loss_a, loss_b = stability_loss(la, lb, TAU)
    # K = 2: sum over classes of (p_s - p_t)^2 = 2 (p0_s - p0_t)^2, divided by (#pixels * K)
    want_a = 2 * (0.60 - 0.97) ** 2 / (1 * 2)
    want_b = (2 * (0.60 - 0.99) ** 2 + 2 * (0.96 - 0.98) ** 2) / (2 * 2)
    assert float(loss_a.detach()) == pytest.approx(want_a, rel=1e-5)
    assert float(loss_b.detach()) == pytest.approx(want_b, rel=1e-5)
    (loss_a + loss_b).backward()
    ga, gb = la.grad[0, 0, 0], lb.grad[0, 0, 0]  # gradient on the class-0 logit per pixel
    # the learner is pulled towards the teacher's class-0 probability (descent raises it here)
    assert gb[0] < 0 and gb[2] < 0 and ga[1] < 0
    # the more confident student of a pixel gets nothing; nobody on pixel 3
    assert ga[0] == 0 and ga[2] == 0 and gb[1] == 0
    assert ga[3] == 0 and gb[3] == 0


def test_equal_confidence_pulls_both_students() -> None:
    # same confidence 0.97, opposite classes: mutual learning, both get a gradient
    la, lb = _logits([0.97]).requires_grad_(), _logits([0.03]).requires_grad_()
    loss_a, loss_b = stability_loss(la, lb, TAU)
    want = 2 * (0.97 - 0.03) ** 2 / 2
    assert float(loss_a.detach()) == pytest.approx(want, rel=1e-5)
    assert float(loss_b.detach()) == pytest.approx(want, rel=1e-5)
    (loss_a + loss_b).backward()
    assert la.grad[0, 0, 0, 0] > 0 and lb.grad[0, 0, 0, 0] < 0  # towards each other


def test_stability_detach_has_the_official_value_and_no_gradient() -> None:
    la, lb = _logits(P_A).requires_grad_(), _logits(P_B).requires_grad_()
    got = stability_loss(la, lb, TAU, detach=True)
    want = stability_loss(la, lb, TAU)
    assert [float(t.detach()) for t in got] == pytest.approx([float(t.detach()) for t in want])
    assert not any(t.requires_grad for t in got)


def test_no_selected_pixel_gives_zero() -> None:
    loss_a, loss_b = stability_loss(_logits([0.6, 0.7]), _logits([0.8, 0.5]), TAU)
    assert float(loss_a) == 0.0 and float(loss_b) == 0.0


def test_stability_weight_ramp() -> None:
    # total 55 -> T_up = 11 iterations: 0.5 * (1 - cos(pi t / 10)) / 2
    assert stability_weight(0, 55) == 0.0
    assert stability_weight(2, 55) == pytest.approx(0.25 * (1 - math.cos(0.2 * math.pi)))
    assert stability_weight(5, 55) == pytest.approx(0.25)  # mid-ramp
    assert stability_weight(10, 55) == pytest.approx(0.5)  # end of the ramp
    assert stability_weight(11, 55) == 0.5 and stability_weight(54, 55) == 0.5  # after


# --- UniMatch terms --------------------------------------------------------------------------


def test_masked_ce_divides_by_valid_pixels_not_by_confident_ones() -> None:
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])  # [1, 2, 1, 3]
    pseudo = torch.tensor([[[0, 1, 0]]])
    conf = torch.tensor([[[0.99, 0.50, 0.96]]])  # pixel 1 below the threshold
    valid = torch.tensor([[[True, True, False]]])  # pixel 2 is padding
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(masked_ce(logits, pseudo, conf, valid, TAU)) == pytest.approx(ce0 / 2)


def test_student_loss_weights() -> None:
    t = [torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0)]
    assert float(student_loss(*t)) == pytest.approx((1 + 0.25 * 2 + 0.25 * 3 + 0.5 * 4) / 2)


def test_mix_pseudo_takes_the_partner_inside_the_box() -> None:
    own = PseudoLabels(
        torch.zeros(1, 4, 4, dtype=torch.long),
        torch.zeros(1, 4, 4),
        torch.ones(1, 4, 4, dtype=torch.bool),
    )
    other = PseudoLabels(
        torch.ones(1, 4, 4, dtype=torch.long),
        torch.ones(1, 4, 4),
        torch.zeros(1, 4, 4, dtype=torch.bool),
    )
    mixed = mix_pseudo(own, other, torch.tensor([[1, 2, 2, 1]]))  # rows 1-2, column 2
    inside = torch.zeros(1, 4, 4, dtype=torch.bool)
    inside[0, 1:3, 2] = True
    assert torch.equal(mixed.pseudo, inside.long())
    assert torch.equal(mixed.conf, inside.float())
    assert torch.equal(mixed.valid, ~inside)


def _batch(n: int, tile: int = 16, crop: int = 16) -> dict[str, Any]:
    """A hand-made unlabeled/labeled batch: random tiles, identity views."""
    from featviews.draw import ViewParams

    g = torch.Generator().manual_seed(3)
    return {
        "image": torch.randint(0, 256, (n, 3, tile, tile), generator=g, dtype=torch.uint8),
        "mask": torch.zeros(n, tile, tile, dtype=torch.uint8),
        "view": [ViewParams(tile, 0, 0, False, tile, crop) for _ in range(n)],
    }


def test_partner_is_the_same_tile_in_another_view_pasted_inside_the_boxes() -> None:
    from trainer.co2s.views import render_co2s

    batch = _batch(2)
    gen = torch.Generator().manual_seed(0)
    # the partner's whole-tile view at scale 1, no flip: exactly the weak view of the same tile
    same = render_co2s(
        batch, batch, torch.device("cpu"), gen, 1.0, False, scale_range=(1, 1), flip_p=0
    )
    torch.testing.assert_close(same.x_partner, same.x_w)
    # flipped partner views (flip_p 1): inside box 1 the pixels are the mirrored tile
    gen = torch.Generator().manual_seed(0)
    v = render_co2s(
        batch, batch, torch.device("cpu"), gen, 1.0, False, scale_range=(1, 1), flip_p=1
    )
    torch.testing.assert_close(v.x_partner, v.x_w.flip(-1))
    for x_s, boxes in ((v.x_s1, v.boxes1), (v.x_s2, v.boxes2)):
        for i, (y, x, h, w) in enumerate(boxes.tolist()):
            assert h * w > 0  # cutmix_p = 1
            inside = torch.zeros(16, 16, dtype=torch.bool)
            inside[y : y + h, x : x + w] = True
            want = torch.where(inside, v.x_w[i].flip(-1), v.x_w[i])
            torch.testing.assert_close(x_s[i], want)
    assert not torch.equal(v.boxes1, v.boxes2)  # independent boxes


# --- evaluation ------------------------------------------------------------------------------


class _PixelModel(nn.Module):
    """Logits that depend on the window's content and position: a 3x3 conv, zero padded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _official_sliding(model: nn.Module, x: torch.Tensor, crop: int) -> torch.Tensor:
    """ZegCLIP's ``slide_inference`` written out: grids, last window snapped, logits averaged."""
    stride = int(crop * 5 / 6)
    _, _, h, w = x.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    acc, count = torch.zeros(1, 4, h, w), torch.zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            acc[..., y1:y2, x1:x2] += model(x[..., y1:y2, x1:x2])
            count[..., y1:y2, x1:x2] += 1
    return acc / count


def test_official_stride() -> None:
    assert official_stride(512) == 426 and official_stride(256) == 213  # reference §2.5 table


def test_sliding_window_equals_the_official_loop() -> None:
    model = _PixelModel()
    x = torch.rand(1, 3, 50, 77)
    crop = 32
    with torch.no_grad():
        # evaluate normalises the pixels before the model: the hand loop gets them normalised
        want = _official_sliding(model, normalize(x), crop)
        got = logits_sliding(StudentLogits(model), x, crop, official_stride(crop))
    torch.testing.assert_close(got, want)


def test_fusion_takes_the_more_confident_student_per_pixel() -> None:
    a = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]]])  # pixel 0 confident, pixel 1 flat
    b = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]]]])  # pixel 0 less, pixel 1 flat (tie -> a)
    fused = fuse_by_confidence(a, b)
    assert torch.equal(fused[..., 0], a[..., 0]) and torch.equal(fused[..., 1], a[..., 1])
    b2 = torch.tensor([[[[0.0, 0.0]], [[1.0, 5.0]]]])  # now b is surer at pixel 1
    fused = fuse_by_confidence(a, b2)
    assert torch.equal(fused[..., 1], b2[..., 1])
    out = FusedLogits(lambda x: a, lambda x: b2)(torch.zeros(1))  # type: ignore[arg-type]
    assert torch.equal(out.logits, fused)


# --- the method through the engine ----------------------------------------------------------

CO2S_CROP = 64  # a multiple of the students' patch 16 (the store's tiles are 64 px)
TEXT_DIM = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_store(tmp_path_factory.mktemp("co2s"), n_images=6)


@pytest.fixture
def text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Class text rows from a fixed generator instead of `featcache text` (tested there)."""
    from trainer.methods import co2s

    def read(store: Any, variant: str) -> tuple[np.ndarray, dict[str, Any]]:
        k = len(store.schema.class_names)  # the run's opened FeatureStore
        rows = np.random.default_rng(0).standard_normal((k, TEXT_DIM)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True), {"variant": variant}

    monkeypatch.setattr(co2s, "_text_reader", lambda: read)


class FakeStudent(nn.Module):
    """The Co2S student interface in a few convolutions (the real tiny students cost seconds
    per step here; tests/trainer/test_co2s_model.py tests them)."""

    def __init__(self, kind: str, num_classes: int, text: torch.Tensor | None, **_: Any) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Conv2d(8, num_classes, 1)
        self.queries = nn.Parameter(torch.zeros(num_classes)) if kind == "dinov3" else None

    def forward(self, x: torch.Tensor, need_fp: bool = False) -> Any:
        f = F.relu(self.backbone(x))
        if need_fp:  # the clean maps and a channel-dropout copy, decoded together
            f = torch.cat([f, F.dropout2d(f, 0.5)])
        out = self.head(f)
        if self.queries is not None:
            out = out + self.queries.view(1, -1, 1, 1)
        out = F.interpolate(out, x.shape[-2:], mode="bilinear", align_corners=False)
        return tuple(out.chunk(2)) if need_fp else out

    def param_groups(
        self, lr_backbone: float, lr_head: float, lr_queries: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        groups = [
            {"params": list(self.backbone.parameters()), "lr": lr_backbone},
            {"params": list(self.head.parameters()), "lr": lr_head},
        ]
        if self.queries is not None:
            groups.append({"params": [self.queries], "lr": lr_queries})
        return [{**g, "weight_decay": weight_decay} for g in groups]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, text: None) -> None:
    from trainer.methods import co2s

    monkeypatch.setattr(co2s, "_student_factory", lambda: FakeStudent)


def _co2s_config(root: Path, store: str, iters: int = 3, **co2s: Any) -> Any:
    ids = [t.tile_id for t in open_store(store).tiles]
    cfg = tiny_config(root, store, ids, None, iters=iters)
    cfg.method, cfg.crop_size = "co2s", CO2S_CROP
    for k, v in co2s.items():
        setattr(cfg.co2s, k, v)
    return cfg


def test_co2s_builds_two_students_two_optimizers_no_ema(
    store: str, tmp_path: Path, text: None
) -> None:
    trainer = Trainer(_co2s_config(tmp_path, store))
    assert type(trainer.method) is Co2S and trainer.ema is None
    assert len(trainer.optimizers) == 2
    students = trainer.model.students
    for opt, kind in zip(trainer.optimizers, ("clip", "dinov3"), strict=True):
        mine = {id(p) for g in opt.param_groups for p in g["params"]}
        assert mine <= {id(p) for p in students[kind].parameters()}
        assert all("base_lr" in g for g in opt.param_groups)
    cfg = trainer.cfg  # what configure settled: the official evaluation, best on CLIP
    assert (cfg.eval.mode, cfg.eval.stride, cfg.eval.best_model) == ("sliding", 53, "clip")


def test_co2s_poly_schedule_on_both_optimizers(store: str, tmp_path: Path, fake: None) -> None:
    """After optimizer step i (0-based) every group's lr is ``base * (1 - i / T) ** 0.9``."""
    cfg = _co2s_config(tmp_path, store, iters=4, lr_backbone=2e-3, lr_head=3e-3, lr_queries=5e-3)
    cfg.schedule.stop_after, cfg.fixmatch.photometric = 2, False
    trainer = Trainer(cfg)
    trainer.run()
    factor = (1 - 1 / 4) ** 0.9
    lrs = [sorted(g["lr"] for g in opt.param_groups) for opt in trainer.optimizers]
    assert lrs[0] == pytest.approx([2e-3 * factor, 3e-3 * factor])  # CLIP: no queries
    assert lrs[1] == pytest.approx([2e-3 * factor, 3e-3 * factor, 5e-3 * factor])


def test_co2s_step_terms_and_one_backward_equals_two(
    store: str, tmp_path: Path, fake: None
) -> None:
    """The summed loss's backward gives each student the gradient of its own loss."""
    cfg = _co2s_config(tmp_path, store)
    cfg.fixmatch.photometric = False  # colour changes nothing here; CutMix stays on
    trainer = Trainer(cfg)
    loader_l, loader_u = trainer.loaders.epoch(trainer.cfg, 0, 0)
    batch_l, batch_u = next(iter(loader_l)), next(iter(loader_u))
    trainer.method.set_progress(5, 10)  # mid-ramp: the stability terms weigh in

    def grads(which: str) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        torch.manual_seed(2)  # the feature-perturbation dropout
        trainer.model.zero_grad(set_to_none=True)
        terms = trainer.method.losses(trainer.model, None, batch_l, batch_u, gen)
        terms[which].backward()
        return {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }

    both, clip, dino = grads("loss"), grads("clip/loss"), grads("dinov3/loss")
    assert set(clip) | set(dino) == set(both) and not set(clip) & set(dino)
    for name, g in both.items():
        torch.testing.assert_close(g, (clip | dino)[name])


def test_co2s_detached_stability_leaves_the_gradient_of_the_plain_losses(
    store: str, tmp_path: Path, fake: None
) -> None:
    trainer = Trainer(_co2s_config(tmp_path, store, stability_detach=True))
    loader_l, loader_u = trainer.loaders.epoch(trainer.cfg, 0, 0)
    batch_l, batch_u = next(iter(loader_l)), next(iter(loader_u))
    gen = torch.Generator().manual_seed(1)
    terms = trainer.method.losses(trainer.model, None, batch_l, batch_u, gen)
    for kind in ("clip", "dinov3"):
        assert not terms[f"{kind}/stability"].requires_grad


def test_co2s_run_learns_and_replays(store: str, tmp_path: Path, fake: None) -> None:
    """Losses fall on the tiny store; the same seed gives the same run; kill + resume too."""
    runs = {}
    for name, stop in (("a", None), ("b", None), ("c", 3)):
        root = tmp_path / name
        root.mkdir()
        cfg = _co2s_config(root, store, iters=8, lr_backbone=1e-2, lr_head=1e-2, lr_queries=1e-2)
        cfg.schedule.eval_interval = 8
        cfg.schedule.stop_after = stop
        first = train(cfg)
        if stop is not None:
            assert first.step == stop
            cfg.schedule.stop_after, cfg.runtime.resume = None, "auto"
            train(cfg)
        runs[name] = (first, torch.load(root / "run" / "latest.pt", weights_only=True))
    (res_a, a), (res_b, b), (_, c) = runs["a"], runs["b"], runs["c"]
    assert res_a.losses == res_b.losses
    losses = res_a.losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), f"same seed differs in {k}"
        assert torch.equal(a["student"][k], c["student"][k]), f"resume differs in {k}"
    assert set(a["metrics"]) == {"clip", "dinov3", "fused"}
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"]) == json.dumps(c["metrics"])
    assert isinstance(a["optimizer"], list) and len(a["optimizer"]) == 2
    assert a["ema"] == {} and a["student_config"]["method"] == "co2s"


def test_co2s_without_text_embeddings_names_featcache_text(store: str, tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="featcache text"):
        Trainer(_co2s_config(tmp_path, store))


def test_co2s_crop_must_be_a_multiple_of_16(store: str, tmp_path: Path) -> None:
    cfg = _co2s_config(tmp_path, store)
    cfg.crop_size = 70
    with pytest.raises(TrainConfigError, match="multiple of 16"):
        cfg.validate()


# ~45 s on a shared CPU (the real tiny students decode per class): in the default suite, the
# one end-to-end check of the real students with stored text
def test_co2s_real_tiny_students_with_stored_text(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """End to end with the real pieces: `featcache text`'s tiny tower writes the class rows,
    the real tiny students train one step and all three models are evaluated."""
    from pipelines.text import TextConfig, run_text

    url = build_store(tmp_path_factory.mktemp("co2s_text"), n_images=6)
    run_text(TextConfig(url, concepts="names", tiny=True))
    cfg = _co2s_config(tmp_path, url, iters=1)
    cfg.schedule.eval_interval = 1
    result = train(cfg)
    assert result.step == 1 and set(result.metrics) == {"clip", "dinov3", "fused"}
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["student_config"]["size"] == "tiny"
    assert any(k.startswith("students.clip.") for k in ckpt["student"])


# two processes of the real tiny students, about a minute on a shared CPU: in the default suite
# (issue 17 asks for a working 2-process gloo run)
def test_co2s_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    """``featcache train --method co2s`` under torchrun (gloo): DDP over the pair of students."""
    import os
    import socket
    import subprocess
    import sys

    from pipelines.text import TextConfig, run_text
    from tests.helpers import write_ids

    url = build_store(tmp_path, n_images=6)
    run_text(TextConfig(url, concepts="names", tiny=True))
    ids = [t.tile_id for t in open_store(url).tiles]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    sets = {"l": ids[:2], "u": ids[2:4], "v": ids[4:]}
    files = {k: write_ids(tmp_path / f"{k}.txt", v) for k, v in sets.items()}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), "-m", "featcache.cli", "train", "--store", url,
        "--method", "co2s", "--tiny", "--crop", str(CO2S_CROP), "--iters", "2",
        "--batch", "1+1", "--labeled", files["l"], "--unlabeled", files["u"], "--val", files["v"],
        "--eval-interval", "2", "--device", "cpu", "--workers", "0", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["run"]["step"] == 2 and set(ckpt["metrics"]) == {"clip", "dinov3", "fused"}
    # each rank evaluated one val tile; the all-reduced matrix counts both
    assert ckpt["metrics"]["fused"]["pixels"] == 2 * 64 * 64


def test_co2s_refuses_teachers_and_an_ema_best_model(store: str, tmp_path: Path) -> None:
    from trainer.config import TeacherConfig

    cfg = _co2s_config(tmp_path, store)
    cfg.model.teachers = [TeacherConfig("dinov2_vitb14")]
    with pytest.raises(TrainConfigError, match="--method co2s trains without distillation"):
        Trainer(cfg)
    cfg = _co2s_config(tmp_path, store)
    cfg.eval.best_model = "ema"
    with pytest.raises(TrainConfigError, match=r"evaluates \['clip', 'dinov3', 'fused'\]"):
        Trainer(cfg)


def test_co2s_bf16_step_is_finite(store: str, tmp_path: Path, fake: None) -> None:
    cfg = _co2s_config(tmp_path, store, iters=1)
    cfg.runtime.bf16, cfg.fixmatch.photometric = True, False
    result = train(cfg)
    assert result.step == 1 and all(math.isfinite(v) for v in result.losses)
