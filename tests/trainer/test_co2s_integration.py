"""Co2S through the application: `featcache predict` / `featcache evaluate` from a Co2S checkpoint
(no text tower or text group needed), the run's recipe and departures, and the demo.

A tiny co2s run (the real tiny students, class rows from the tiny text tower) trains 2 iterations
once per module. Expected predictions are computed by hand from the in-memory students of that run:
the official sliding window loop written out (ZegCLIP's ``slide_inference``) and the fusion rule
written out per pixel, never through `trainer.predict` / `trainer.evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result
from PIL import Image

from featcache.cli import main
from featstore import open_store
from tests.helpers import build_store, tiny_config
from trainer.checkpoint import CheckpointError
from trainer.engine import Trainer

CROP = 64  # a multiple of the students' patch 16 (the store's tiles are 64 px)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-iteration tiny co2s run: its folder, store, the trained pair and a 100x90 image."""
    from pipelines.text import TextConfig, run_text

    root = tmp_path_factory.mktemp("co2s_app")
    url = build_store(root, n_images=5)
    run_text(TextConfig(url, concepts="names", tiny=True))
    ids = [t.tile_id for t in open_store(url).tiles]
    cfg = tiny_config(root, url, ids, None, iters=2)
    cfg.method, cfg.crop_size = "co2s", CROP
    cfg.schedule.batch_labeled = cfg.schedule.batch_unlabeled = 1
    cfg.schedule.eval_interval = 2
    trainer = Trainer(cfg)
    trainer.run()
    image = np.random.default_rng(5).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    (root / "img").mkdir()
    Image.fromarray(image).save(root / "img" / "scene.png")
    return {
        "root": root,
        "store": url,
        "pair": trainer.model.eval(),
        "latest": root / "run" / "latest.pt",
        "image": image,
        "summary": trainer.summary,
    }


@pytest.fixture
def no_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading class text rows (the store's text group) fails: predict must not need them."""
    from trainer.methods import co2s

    def refuse() -> Any:
        raise AssertionError("predict/evaluate read the text embeddings")

    monkeypatch.setattr(co2s, "_text_reader", refuse)


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _official_sliding(model: Any, x: torch.Tensor, crop: int) -> torch.Tensor:
    """ZegCLIP's ``slide_inference``: stride int(crop 5/6), last window snapped, logits averaged."""
    stride = int(crop * 5 / 6)
    _, _, h, w = x.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    acc, count = None, torch.zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = model(x[..., y1:y2, x1:x2])
            acc = torch.zeros(1, out.shape[1], h, w) if acc is None else acc
            acc[..., y1:y2, x1:x2] += out
            count[..., y1:y2, x1:x2] += 1
    assert acc is not None
    return acc / count


def _fused_by_hand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per pixel the logits of the student with the larger max softmax (ties: CLIP)."""
    pa, pb = a.softmax(1).amax(1, keepdim=True), b.softmax(1).amax(1, keepdim=True)
    return a * (pa >= pb) + b * (pa < pb)


def _want(run: dict[str, Any], use: str) -> np.ndarray:
    x = torch.from_numpy(run["image"]).permute(2, 0, 1)[None].float() / 255
    x = (x - MEAN) / STD
    students = run["pair"].students
    with torch.no_grad():
        if use == "fused":

            def model(w: torch.Tensor) -> torch.Tensor:
                return _fused_by_hand(students["clip"](w), students["dinov3"](w))

        else:
            model = students[use]
        logits = _official_sliding(model, x, CROP)
    return logits.argmax(1)[0].numpy().astype(np.uint8)


@pytest.mark.parametrize("use", [None, "clip", "dinov3", "fused"])
def test_predict_from_a_co2s_checkpoint_equals_the_trained_students(
    run: dict[str, Any], tmp_path: Path, no_text: None, use: str | None
) -> None:
    args = ["predict", run["latest"], run["root"] / "img", "--out", tmp_path, "--no-progress"]
    res = _cli(*args, *(["--use", use] if use else []))
    assert res.exit_code == 0, res.output
    got = np.asarray(Image.open(tmp_path / "scene.png"))
    assert got.shape == (100, 90)
    # default: the model best.pt is chosen on (eval.best_model: clip), the official protocol
    assert np.array_equal(got, _want(run, use or "clip"))


def test_evaluate_a_co2s_checkpoint_reports_both_students_and_the_fusion(
    run: dict[str, Any], no_text: None
) -> None:
    """The metrics of the loaded models equal the run's own evaluation of its in-memory pair."""
    res = _cli("evaluate", run["latest"], "--store", run["store"], "--no-progress")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    recorded = torch.load(run["latest"], map_location="cpu", weights_only=True)["metrics"]
    for name in ("clip", "dinov3", "fused"):
        assert doc[name]["miou"] == pytest.approx(recorded[name]["miou"], abs=1e-12)
        assert doc[name]["pixels"] == recorded[name]["pixels"] == 64 * 64
    assert "student" not in doc and "ema" not in doc
    args = ("--store", run["store"], "--use", "dinov3", "--no-progress")
    one = json.loads(_cli("evaluate", run["latest"], *args).output)
    assert set(one) - {"class_names", "protocol"} == {"dinov3"}


def test_loaded_pair_gives_the_trained_logits(run: dict[str, Any], no_text: None) -> None:
    from trainer.predict import load_models

    models, ckpt = load_models(run["latest"], "all")
    assert list(models) == ["clip", "dinov3", "fused"] and ckpt["method"] == "co2s"
    x = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        for kind in ("clip", "dinov3"):
            want = run["pair"].students[kind](x)
            torch.testing.assert_close(models[kind](x).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--use", "ema"), "holds a co2s model, which evaluates clip, dinov3, fused"),
        (("--use", "both"), "holds a co2s model, which evaluates clip, dinov3, fused"),
    ],
)
def test_co2s_checkpoint_refuses_student_names_with_the_choices(
    run: dict[str, Any], args: tuple[str, ...], says: str
) -> None:
    res = _cli("evaluate", run["latest"], "--store", run["store"], *args, "--no-progress")
    assert res.exit_code == 1 and says in res.output, res.output


def test_export_of_a_co2s_checkpoint_says_what_reads_it(
    run: dict[str, Any], tmp_path: Path
) -> None:
    res = _cli("export", run["latest"], tmp_path / "m.safetensors")
    assert res.exit_code == 1
    assert "holds a 'co2s' model" in res.output and "featcache predict" in res.output


def test_whole_mode_runs_co2s_at_multiples_of_16(run: dict[str, Any], tmp_path: Path) -> None:
    res = _cli(
        "predict", run["latest"], run["root"] / "img", "--out", tmp_path, "--mode", "whole",
        "--use", "dinov3", "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    x = torch.from_numpy(run["image"]).permute(2, 0, 1)[None].float() / 255
    xr = F.interpolate(x, (96, 96), mode="bilinear", align_corners=True)  # 100, 90 -> 96
    with torch.no_grad():
        logits = run["pair"].students["dinov3"]((xr - MEAN) / STD)
    want = F.interpolate(logits, (100, 90), mode="bilinear", align_corners=True).argmax(1)
    got = np.asarray(Image.open(tmp_path / "scene.png"))
    assert np.array_equal(got, want[0].numpy().astype(np.uint8))


def test_a_co2s_record_without_its_fields_is_a_checkpoint_error(
    run: dict[str, Any], tmp_path: Path
) -> None:
    from trainer.checkpoint import save_checkpoint
    from trainer.predict import load_models

    ckpt = torch.load(run["latest"], map_location="cpu", weights_only=True)
    ckpt["student_config"] = {k: v for k, v in ckpt["student_config"].items() if k != "crop"}
    ckpt.pop("format")
    save_checkpoint(tmp_path / "edited.pt", ckpt)
    with pytest.raises(CheckpointError, match=r"lacks \['crop'\]"):
        load_models(tmp_path / "edited.pt", "clip")


# --- the run's first lines and resume ---------------------------------------------------------


def test_co2s_run_prints_its_students_and_its_recipe(run: dict[str, Any]) -> None:
    lines = run["summary"]
    assert "students: tiny CLIP and DINOv3 test networks (--tiny)" in lines
    assert not any("DINOv2" in line or "vit_small" in line for line in lines)
    head = next(line for line in lines if line.startswith("recipe: "))
    assert head.endswith("from the official Co2S recipe (XavierJiezou/Co2S):")
    listed = {line.split(" = ")[0].strip() for line in lines if line.startswith("  co2s.")}
    assert {"co2s.stability_detach", "co2s.clip_act", "co2s.layernorm_eps"} <= listed
    # the class text rows and the tower that made them (here the tiny random one): said
    text = [line for line in lines if "class text: 'conceptavg' rows" in line]
    assert len(text) == 1 and text[0].startswith("WARNING: ")
    assert "weights random:seed" in text[0] and "RANDOM text tower" in text[0]


def test_co2s_student_line_names_each_backbone_and_random_init() -> None:
    from trainer.config import TrainConfig
    from trainer.prepare import _student_line

    cfg = TrainConfig(method="co2s")
    line = _student_line(cfg)
    assert line.startswith(
        "WARNING: students: CLIP ViT-B/16 (RANDOM init), DINOv3 ViT-B/16 (RANDOM init)"
    )
    cfg.co2s.clip_weights, cfg.co2s.dino_weights = "c.pt", "d.pth"
    assert _student_line(cfg) == (
        "students: CLIP ViT-B/16 (weights c.pt), DINOv3 ViT-B/16 (weights d.pth); backbones "
        "train 'attn'"
    )


def test_resume_refuses_other_co2s_rates_and_stability_detach(tmp_path: Path) -> None:
    from trainer.config import TrainConfig, TrainConfigError
    from trainer.rundir import check_resume_recipe

    cfg = TrainConfig(method="co2s", crop_size=CROP)
    saved = cfg.to_dict()
    cfg.co2s.stability_detach, cfg.co2s.lr_head = True, 1e-2
    with pytest.raises(TrainConfigError) as err:
        check_resume_recipe(saved, cfg, tmp_path / "latest.pt")
    assert "--stability-detach (co2s.stability_detach) was False and is now True" in str(err.value)
    assert "co2s.lr_head (co2s.lr_head) was 0.001 and is now 0.01" in str(err.value)


# --- featcache demo --method co2s --------------------------------------------------------------


def test_co2s_demo_prints_each_student_and_the_fusion(tmp_path: Path) -> None:
    """The quick demo runs; its numbers are the run's metrics, which `featcache evaluate` of
    the run's checkpoint reproduces; the baseline is the hand count of the val masks."""
    out = tmp_path / "demo"
    res = _cli("demo", "--method", "co2s", "--quick", "--out", out)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "report" / "co2s.json").read_text())
    assert set(doc["metrics"]) == {"clip", "dinov3", "fused"}
    lines = res.output.splitlines()
    for name, m in doc["metrics"].items():
        want = f"  {name:<7} mIoU {100 * m['miou']:5.2f}  OA {100 * m['oa']:5.2f}"
        assert want in lines, (want, lines[-8:])
    store = open_store(str(out / "store.zarr"))
    ids = [t.tile_id for t in store.tiles]
    val = [ids.index(t) for t in (out / "splits" / "val.txt").read_text().split()]
    masks = np.stack([store.read_mask(i) for i in val])
    counts = np.bincount(masks[masks != 255].ravel())
    assert doc["baseline"]["oa"] == pytest.approx(counts.max() / counts.sum())
    assert doc["baseline"]["miou"] == pytest.approx(
        counts.max() / counts.sum() / (counts > 0).sum()
    )
    ckpt = out / "runs" / "co2s" / "latest.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo ran: the same float summation order
    try:
        res = _cli("evaluate", ckpt, "--store", out / "store.zarr", "--no-progress")
    finally:
        torch.set_num_threads(threads)
    again = json.loads(res.output)
    for name, m in doc["metrics"].items():
        assert again[name]["miou"] == pytest.approx(m["miou"], abs=1e-12)


# --- --co2s-distill ---------------------------------------------------------------------------


def test_co2s_distill_targets_gradients_and_checkpoint(
    run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--co2s-distill clip: the CLIP student's translated tokens of cat(labeled, weak) learn the
    store's teacher; the targets equal the source's per stream (no CutMix path at all), the term
    is the hand-written masked MSE, only the CLIP side gets its gradient, and predict/evaluate
    still rebuild the pair (translators included)."""
    from featviews.sources import Views
    from trainer.methods import co2s
    from trainer.predict import load_models

    ids = [t.tile_id for t in open_store(run["store"]).tiles]
    cfg = tiny_config(tmp_path, run["store"], ids, None, iters=1)
    cfg.method, cfg.crop_size, cfg.co2s.distill = "co2s", CROP, "clip"
    cfg.schedule.batch_labeled = cfg.schedule.batch_unlabeled = 1
    trainer = Trainer(cfg)
    assert list(trainer.model.translators) == ["clip"]
    seen: list[tuple[torch.Tensor, ...]] = []
    real = co2s.distill_loss

    def spy(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, masked: bool) -> Any:
        seen.append((pred.detach(), target, valid))
        return real(pred, target, valid, masked)

    monkeypatch.setattr(co2s, "distill_loss", spy)
    loader_l, loader_u = trainer.loaders.epoch(trainer.cfg, 0, 0)
    batch_l, batch_u = next(iter(loader_l)), next(iter(loader_u))
    gen = torch.Generator().manual_seed(1)
    terms = trainer.method.losses(trainer.model, None, batch_l, batch_u, gen)
    teacher = "dinov2_vitb14"
    assert f"clip/distill/{teacher}" in terms and "dinov3/distill" not in terms
    (pred, target, valid) = seen[0]
    n = CROP // 16
    assert pred.shape[:3] == (2, n, n)  # the labeled and the weak view, the student's grid
    # independent route: each stream asked alone, as a labeled stream (no CutMix code at all)
    from featviews.geometry import ViewGeometry

    want = []
    for batch in (batch_l, batch_u):
        geom = ViewGeometry.from_params(batch["view"], torch.device("cpu"))
        x = torch.zeros(1, 3, CROP, CROP)
        want.append(trainer.source(teacher, n, Views(x, x[:, 0], geom), batch, None))
    torch.testing.assert_close(target, torch.cat([want[0][0], want[1][0]]))
    torch.testing.assert_close(valid, torch.cat([want[0][1], want[1][1]]))
    v = valid[..., None]
    hand = (v * (pred - target) ** 2).sum() / (v.sum() * target.shape[-1])
    torch.testing.assert_close(terms[f"clip/distill/{teacher}"].detach(), hand)
    terms["clip/distill"].backward()
    pair = trainer.model
    assert all(p.grad is None for p in pair.students["dinov3"].parameters())
    assert all(p.grad is not None for p in pair.translators["clip"].parameters())
    assert any(p.grad is not None for p in pair.students["clip"].backbone.parameters())
    trainer.model.zero_grad(set_to_none=True)
    monkeypatch.setattr(co2s, "distill_loss", real)
    trainer.run()
    models, ckpt = load_models(tmp_path / "run" / "latest.pt", "all")
    assert ckpt["student_config"]["distill"] == {"clip": {teacher: 32}}
    assert set(models) == {"clip", "dinov3", "fused"}


def test_co2s_teachers_without_distill_name_the_option(run: dict[str, Any], tmp_path: Path) -> None:
    from trainer.config import TeacherConfig
    from trainer.errors import TrainConfigError

    ids = [t.tile_id for t in open_store(run["store"]).tiles]
    cfg = tiny_config(tmp_path, run["store"], ids, [TeacherConfig("dinov2_vitb14")], iters=1)
    cfg.method, cfg.crop_size = "co2s", CROP
    with pytest.raises(TrainConfigError, match="--co2s-distill clip"):
        Trainer(cfg)
