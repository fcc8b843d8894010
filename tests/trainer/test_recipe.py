"""The RS-MTDF recipe, value by value, read from where our code uses it.

Every row names the official value and the file it comes from: the public repository
``earth-insights/RS-MTDF`` at HEAD ``5ee7da7`` (read in ../shared/design/rs-mtdf-reference.md,
which cites the lines), or the paper (../shared/seeds/000_fc4d4225b71cb358.txt, section 4.1.2).
Our value is read from the object the training run really uses: the optimizer the `Trainer`
built (and the learning rates it ran each step with), the student's modules, the sampling
parameters of the run's datasets, the augmentation functions' drawn parameters, the loss terms of
a step, and the config defaults that `featcache train` starts from. A value that drifts from the
official one fails its row.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import trainer.augment as augment
from featstore import open_store
from featviews.draw import draw_view, identity_view
from tests.helpers import CLIP, DINO, build_store, tiny_config
from trainer.config import TeacherConfig, TrainConfig
from trainer.data import iters_per_epoch
from trainer.ema import create_ema, ema_decay, update_ema
from trainer.engine import Trainer
from trainer.prepare import student_config
from trainer.step import LossSettings, compute_losses, render_batch
from trainer.student import Student

TRAIN_PY = "fixmatch_distill_with_models.py"
MODEL_PY = "model/semseg/dpt_distill_with_models_fuse.py"
TRANSFORM_PY = "dataset/transform.py"
SEMI_PY = "dataset/semi.py"
CONFIGS = "configs/{loveda,Potsdam,deepglobe}.yaml"
PAPER = "paper 4.1.2 (seeds/000_fc4d4225b71cb358.txt)"

ITERS = 4  # the tiny run's schedule length (poly is checked over all of it)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, list[list[float]]]:
    """A tiny cached run trained to the end, with the lr of each group at each optimizer step."""
    root = tmp_path_factory.mktemp("recipe")
    store = build_store(root, teachers=(DINO, CLIP))
    ids = [t.tile_id for t in open_store(store).tiles]
    teachers = [TeacherConfig(DINO, "full"), TeacherConfig(CLIP, "clip224")]
    trainer = Trainer(tiny_config(root, store, ids, teachers, iters=ITERS))
    used: list[list[float]] = []
    real_step = trainer.optimizer.step

    def spy(*args: object, **kwargs: object) -> object:
        used.append([g["lr"] for g in trainer.optimizer.param_groups])
        return real_step(*args, **kwargs)

    trainer.optimizer.step = spy  # type: ignore[method-assign]
    trainer.run()
    return trainer, used


@pytest.fixture(scope="module")
def full_student() -> Student:
    """The default (ViT-S/14) student of the official teacher pair, random init (no download)."""
    cfg = TrainConfig()
    cfg.model.teachers = [TeacherConfig(DINO, "full"), TeacherConfig(CLIP, "clip224")]
    cfg.model.random_weights = True
    torch.manual_seed(0)
    return Student(student_config(cfg, 7, {DINO: 768, CLIP: 1024})).eval()


# --------------------------------------------------------------------- config defaults


def _defaults() -> dict[str, object]:
    c = TrainConfig()  # what `featcache train` starts from (featcache/cli_train.py build_config)
    return {
        "crop_size": c.crop_size,
        "data.scale_range": tuple(c.data.scale_range),
        "data.flip_p": c.data.flip_p,
        "optim.lr": c.optim.lr,
        "optim.lr_multi": c.optim.lr_multi,
        "optim.weight_decay": c.optim.weight_decay,
        "optim.poly": c.optim.poly,
        "fixmatch.conf_thresh": c.fixmatch.conf_thresh,
        "fixmatch.ema_max": c.fixmatch.ema_max,
        "fixmatch.cutmix_p": c.fixmatch.cutmix_p,
        "fixmatch.photometric": c.fixmatch.photometric,
        "schedule.epochs": c.schedule.epochs,
        "schedule.batch_labeled": c.schedule.batch_labeled,
        "schedule.batch_unlabeled": c.schedule.batch_unlabeled,
    }


# (config key, official value, official source)
CONFIG_ROWS = [
    ("crop_size", 518, f"{CONFIGS} crop_size"),
    ("data.scale_range", (0.5, 2.0), f"{TRANSFORM_PY} resize ratio_range; {SEMI_PY}"),
    ("data.flip_p", 0.5, f"{TRANSFORM_PY} hflip p=0.5"),
    ("optim.lr", 5e-6, f"{CONFIGS} lr"),
    ("optim.lr_multi", 40.0, f"{CONFIGS} lr_multi"),
    ("optim.weight_decay", 0.01, f"{TRAIN_PY} AdamW(weight_decay=0.01); {PAPER}"),
    ("optim.poly", 0.9, f"{TRAIN_PY} lr * (1 - iters / total_iters) ** 0.9"),
    ("fixmatch.conf_thresh", 0.95, f"{CONFIGS} conf_thresh; {PAPER}"),
    ("fixmatch.ema_max", 0.996, f"{TRAIN_PY} ema_ratio = min(1 - 1 / (iters + 1), 0.996)"),
    ("fixmatch.cutmix_p", 0.5, f"{SEMI_PY} obtain_cutmix_box(p=0.5)"),
    ("fixmatch.photometric", True, f"{SEMI_PY} strong views: ColorJitter, grayscale, blur"),
    ("schedule.epochs", 60, f"{CONFIGS} epochs; {PAPER} 60 epochs"),
    ("schedule.batch_labeled", 8, f"{CONFIGS} batch_size 8 per GPU (x4 GPUs); {PAPER}"),
    ("schedule.batch_unlabeled", 8, f"{CONFIGS} batch_size 8 per GPU (x4 GPUs)"),
]


@pytest.mark.parametrize(
    ("key", "official", "source"), CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS]
)
def test_config_default_is_official(key: str, official: object, source: str) -> None:
    assert _defaults()[key] == official, f"{key}: official {official!r} ({source})"


# Official values our defaults depart from on purpose (each a named option listed among a run's
# departures), and the student's architecture values: `--preset official` must give all of them,
# and every row above, as read back from the config it builds.
PRESET_ONLY_ROWS = [
    ("fixmatch.jitter_order", "sample", f"{SEMI_PY} torchvision ColorJitter: order per call"),
    ("fixmatch.blur", "pil", f"{SEMI_PY} blur: PIL ImageFilter.GaussianBlur"),
    ("distill.masked", False, f"{MODEL_PY} MSE mean over all tokens, padding included"),
    ("eval.best_model", "student", f"{TRAIN_PY} best.pth chosen on the student's mIoU"),
    ("model.student.layers", (2, 5, 8, 11), "model/semseg/dpt.py intermediate_layer_idx small"),
    ("model.student.translator_hidden", 1024, f"{MODEL_PY} translators Linear(384, 1024)"),
    ("model.student.fusion_self", 0.8, f"{MODEL_PY} 0.8 * student features"),
    ("model.student.fusion_teacher", 0.1, f"{MODEL_PY} 0.1 * each projected teacher"),
    ("model.student.clip_size", 224, f"{MODEL_PY} F.interpolate(x, (224, 224))"),
    ("model.student.clip_from_full", False, f"{MODEL_PY} a second student pass at 224"),
]


@pytest.mark.parametrize(
    ("key", "official", "source"),
    CONFIG_ROWS + PRESET_ONLY_ROWS,
    ids=[r[0] for r in CONFIG_ROWS + PRESET_ONLY_ROWS],
)
def test_official_preset_gives_official_value(key: str, official: object, source: str) -> None:
    from trainer.presets import apply_preset, get_value

    got = get_value(apply_preset(TrainConfig(), "official"), key)
    assert _as_list(got) == _as_list(official), f"{key}: official {official!r} ({source})"


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, (tuple, list)) else value


# One row per dataset: the three official configs differ only in dataset/nclass; our config has
# no per-dataset table, so one set of defaults must equal all three. Iterations per epoch follow
# the official loader: an epoch is one pass over the unlabeled list, floor(ceil(N_u / 4) / 8)
# with 4 GPUs (N_u of the shipped 1 % splits; LoveDA's from DWL's lists, reference section 2.3).
DATASETS = [
    # dataset, epochs, batch per GPU, N_u at 1 %, iterations per epoch, total iterations
    ("loveda", 60, 8, 9988, 312, 18720),
    ("Potsdam", 60, 8, 3251, 101, 6060),
    ("deepglobe", 60, 8, 11925, 372, 22320),
]


@pytest.mark.parametrize(
    ("name", "epochs", "batch", "n_u", "per_epoch", "total"), DATASETS, ids=[d[0] for d in DATASETS]
)
def test_epochs_and_batches_per_dataset(
    name: str, epochs: int, batch: int, n_u: int, per_epoch: int, total: int
) -> None:
    d = _defaults()
    assert d["schedule.epochs"] == epochs, f"configs/{name}.yaml epochs"
    assert (d["schedule.batch_labeled"], d["schedule.batch_unlabeled"]) == (batch, batch), (
        f"configs/{name}.yaml batch_size (per GPU)"
    )
    # the loader's own count (trainer.data.iters_per_epoch, used by build_loaders)
    assert iters_per_epoch(n_u, 4, batch) == per_epoch == math.ceil(n_u / 4) // 8
    assert epochs * iters_per_epoch(n_u, 4, batch) == total


# --------------------------------------------------------------------- the built student


def test_student_layers_2_5_8_11(full_student: Student) -> None:
    """Levels 1-3 fed to the head are the normed outputs of blocks 2, 5, 8 (official
    ``get_intermediate_layers(x, [2, 5, 8, 11])``, model/semseg/dpt.py); checked against a
    manual block loop, not against the student's own indices."""
    m = full_student
    bb = m.backbone
    assert m.cfg.layers == (2, 5, 8, 11)
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = bb.norm_pre(bb._pos_embed(bb.patch_embed(x)))
        normed = []
        for blk in bb.blocks:
            h = blk(h)
            normed.append(bb.norm(h)[:, bb.num_prefix_tokens :])
        seen = _head_inputs(m, x)
    assert len(bb.blocks) == 12
    for got, block in zip(seen[:3], (2, 5, 8), strict=True):
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), normed[block])


def test_fusion_weights_and_deepest_level_11(full_student: Student) -> None:
    """``fused = 0.8 s + 0.1 (P_dino(T_dino(s)) + P_clip(c))`` (MODEL_PY forward), s = normed
    block 11. With every projection weight zero and known biases the fused level is
    ``0.8 s + 0.1 (b_dino + b_clip)``, whatever the translators and the 224 branch compute."""
    m = full_student
    bb = m.backbone
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    saved = {k: (p.weight.clone(), p.bias.clone()) for k, p in m.projections.items()}
    b_dino = torch.linspace(-1, 1, 384)
    b_clip = torch.linspace(2, 3, 384)
    try:
        with torch.no_grad():
            for p, b in ((m.projection(DINO), b_dino), (m.projection(CLIP), b_clip)):
                p.weight.zero_()
                p.bias.copy_(b)
            h = bb.norm_pre(bb._pos_embed(bb.patch_embed(x)))
            for blk in bb.blocks:
                h = blk(h)
            s = bb.norm(h)[:, bb.num_prefix_tokens :]
            seen = _head_inputs(m, x)
    finally:
        with torch.no_grad():
            for k, (w, b) in saved.items():
                m.projections[k].weight.copy_(w)
                m.projections[k].bias.copy_(b)
    assert (m.cfg.fusion_self, m.cfg.fusion_teacher) == (0.8, 0.1)
    want = 0.8 * s + 0.1 * (b_dino + b_clip)
    torch.testing.assert_close(seen[3].flatten(2).transpose(1, 2), want, rtol=1e-5, atol=1e-5)


def test_translators_hidden_1024_and_widths(full_student: Student) -> None:
    """T_dino 384 -> 1024 -> 768, T_clip 384 -> 1024 -> 1024, P_dino 768 -> 384, P_clip
    1024 -> 384, Linear-ReLU-Linear (MODEL_PY __init__)."""
    m = full_student
    for name, out in ((DINO, 768), (CLIP, 1024)):
        t = m.translator(name)
        kinds = [type(layer).__name__ for layer in t]
        assert kinds == ["Linear", "ReLU", "Linear"], name
        assert (t[0].in_features, t[0].out_features) == (384, 1024), name
        assert (t[2].in_features, t[2].out_features) == (1024, out), name
        p = m.projection(name)
        assert (p.in_features, p.out_features) == (out, 384), name


def test_crop_518_gives_37x37_grid(full_student: Student) -> None:
    """crop_size 518 (CONFIGS) = the student's img_size: a 37 x 37 learned position grid."""
    bb = full_student.backbone
    assert full_student.cfg.img_size == 518
    assert tuple(bb.patch_embed.grid_size) == (37, 37)
    assert bb.pos_embed.shape[1] == 37 * 37 + bb.num_prefix_tokens


def _bilinear_align_corners(x: np.ndarray, out: int) -> np.ndarray:
    """Hand bilinear resize with align_corners=True: source px = i (in - 1) / (out - 1)."""
    n = x.shape[-1]
    pos = np.arange(out) * (n - 1) / (out - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n - 2)
    f = pos - lo
    rows = x[..., lo, :] * (1 - f)[:, None] + x[..., lo + 1, :] * f[:, None]
    return rows[..., lo] * (1 - f) + rows[..., lo + 1] * f


def test_clip_branch_input_224_bilinear_align_corners(full_student: Student) -> None:
    """The CLIP branch reads a 224 px pass of the normalised input resized bilinearly with
    align_corners=True, no antialias (MODEL_PY forward: F.interpolate(x, (224, 224)))."""
    m = full_student
    seen: list[torch.Tensor] = []
    hook = m.backbone.patch_embed.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    try:
        with torch.no_grad():
            out = m(x)
    finally:
        hook.remove()
    assert m.cfg.clip_size == 224 and not m.cfg.clip_from_full
    assert [tuple(t.shape[-2:]) for t in seen] == [(28, 28), (224, 224)]
    want = _bilinear_align_corners(x.double().numpy(), 224)
    np.testing.assert_allclose(seen[1].double().numpy(), want, rtol=0, atol=1e-5)
    assert out.translated[CLIP].shape == (1, 16, 16, 1024)


def _head_inputs(model: Student, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda m, args: seen.extend(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return seen


# --------------------------------------------------------------------- the built optimizer


def test_optimizer_groups_lr_x40_and_weight_decay(run: tuple[Trainer, list]) -> None:
    """AdamW, betas (0.9, 0.999); group 0 = backbone at lr 5e-6, group 1 = everything else
    (head, translators, projections) at 5e-6 x 40; weight decay 0.01 on every parameter
    (TRAIN_PY optimizer; CONFIGS lr / lr_multi)."""
    trainer, _ = run
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    g0, g1 = opt.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.") for p in g0["params"])
    assert not any(names[id(p)].startswith("backbone.") for p in g1["params"])
    assert len(g0["params"]) + len(g1["params"]) == len(names)  # every parameter trained
    assert {n.split(".")[0] for n in (names[id(p)] for p in g1["params"])} == {
        "head",
        "translators",
        "projections",
    }
    assert g0["base_lr"] == 5e-6
    assert g1["base_lr"] == pytest.approx(5e-6 * 40, rel=1e-12)
    for g in (g0, g1):
        assert g["weight_decay"] == 0.01
        assert tuple(g["betas"]) == (0.9, 0.999)


def test_poly_lr_after_each_step(run: tuple[Trainer, list]) -> None:
    """Official: after step i, lr = base (1 - i / total) ** 0.9, so step 0 and step 1 both run
    at the base value (TRAIN_PY, poly update after optimizer.step). The lrs recorded at each real
    optimizer step of the run must follow that hand schedule."""
    trainer, used = run
    base = [5e-6, 5e-6 * 40]
    want = []
    for k in range(ITERS):
        factor = 1.0 if k == 0 else (1 - (k - 1) / ITERS) ** 0.9
        want.append([b * factor for b in base])
    assert len(used) == ITERS
    np.testing.assert_allclose(np.array(used), np.array(want), rtol=1e-12)
    last = [g["lr"] for g in trainer.optimizer.param_groups]
    np.testing.assert_allclose(
        last, [b * (1 - (ITERS - 1) / ITERS) ** 0.9 for b in base], rtol=1e-12
    )


def test_threshold_095_in_the_step_settings(run: tuple[Trainer, list]) -> None:
    """conf_thresh 0.95 (CONFIGS) is what the step's loss settings hold."""
    trainer, _ = run
    assert trainer.method.settings.conf_thresh == 0.95


# --------------------------------------------------------------------- EMA


def test_ema_cap_and_ramp(run: tuple[Trainer, list]) -> None:
    """ratio after step i = min(1 - 1/(i + 1), 0.996) (TRAIN_PY EMA update): 0, 0.5, ...,
    0.996 from i = 249 on."""
    trainer, _ = run
    for i in range(400):
        want = min(1 - 1 / (i + 1), 0.996)
        assert ema_decay(trainer.ema, i) == pytest.approx(want, abs=1e-12), i
    assert ema_decay(trainer.ema, 248) < 0.996 <= ema_decay(trainer.ema, 249)


def test_ema_update_is_the_hand_formula() -> None:
    """ema <- ema r + param (1 - r) for parameters and buffers, with the run's cap."""
    torch.manual_seed(0)
    net = torch.nn.BatchNorm1d(3)  # a parameter and buffers
    ema = create_ema(net, TrainConfig().fixmatch.ema_max)
    hand = {k: v.clone().double() for k, v in ema.module.state_dict().items()}
    for step in range(4):
        with torch.no_grad():
            net.weight.add_(1.0 + step)
            net.running_mean.add_(2.0 + step)
        update_ema(ema, net, step)
        r = min(1 - 1 / (step + 1), 0.996)
        for k in ("weight", "running_mean", "bias"):
            hand[k] = hand[k] * r + net.state_dict()[k].double() * (1 - r)
            torch.testing.assert_close(ema.module.state_dict()[k].double(), hand[k])


# --------------------------------------------------------------------- augmentation


def test_scale_range_and_flip_of_the_run(run: tuple[Trainer, list]) -> None:
    """Long side randint(int(0.5 L), int(2.0 L)) inclusive, flip p = 0.5 (TRANSFORM_PY resize
    and hflip), read from the sampling the run's datasets draw with."""
    trainer, _ = run
    s = trainer.loaders.ds_l.source.ctx.sampling
    assert tuple(s.scale_range) == (0.5, 2.0) and s.flip_p == 0.5
    assert trainer.loaders.ds_u is not None and trainer.loaders.ds_u.source.ctx.sampling == s
    rng = np.random.default_rng(0)
    views = [draw_view(rng, 512, 518, tuple(s.scale_range), s.flip_p) for _ in range(4000)]
    sizes = np.array([v.size for v in views])
    assert sizes.min() == 256 and sizes.max() == 1024  # both ends reachable (inclusive)
    assert abs(np.mean([v.flip for v in views]) - 0.5) < 0.03


def test_cutmix_probability_area_aspect() -> None:
    """obtain_cutmix_box(518, p=0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1/0.3)
    (SEMI_PY): the defaults the step draws with, and the boxes they give."""
    sig = inspect.signature(augment.cutmix_boxes).parameters
    assert sig["size_min"].default == 0.02 and sig["size_max"].default == 0.4
    assert sig["ratio"].default == (0.3, 1 / 0.3)
    p = TrainConfig().fixmatch.cutmix_p
    boxes = augment.cutmix_boxes(20000, 518, torch.Generator().manual_seed(0), p)
    on = boxes[:, 2] > 0
    assert abs(float(on.float().mean()) - 0.5) < 0.015
    h, w = boxes[on, 2].double(), boxes[on, 3].double()
    area = h * w / 518**2
    assert float(area.max()) <= 0.4 and float(area.max()) > 0.38
    assert float(area.min()) > 0.015 and float(area.min()) < 0.022  # floors shave a little
    aspect = h / w  # r = h / w up to the floors
    assert 0.28 < float(aspect.min()) < 0.32 and 3.1 < float(aspect.max()) < 3.5


def test_strong_augmentation_probabilities_and_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8, RandomGrayscale p 0.2, blur p 0.5 with
    sigma ~ U(0.1, 2.0) (SEMI_PY strong views): the parameters `strong_photometric` (what
    `render_batch` calls) really draws."""
    drawn: list[augment.PhotometricParams] = []
    real = augment.draw_photometric

    def spy(*args: object, **kwargs: object) -> augment.PhotometricParams:
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(augment, "draw_photometric", spy)
    # only the draw is under test: skip the pixel work (blur needs views wider than 2 px)
    monkeypatch.setattr(augment, "apply_photometric", lambda views, *a, **k: views)
    n = 20000
    augment.strong_photometric(torch.rand(n, 3, 2, 2), torch.Generator().manual_seed(0))
    (p,) = drawn
    jit = p.brightness != 1
    assert abs(float(jit.double().mean()) - 0.8) < 0.015
    for f, lo, hi in (
        (p.brightness, 0.5, 1.5),
        (p.contrast, 0.5, 1.5),
        (p.saturation, 0.5, 1.5),
        (p.hue, -0.25, 0.25),
    ):
        v = f[jit].double()
        assert lo <= float(v.min()) < lo + 0.01 and hi - 0.01 < float(v.max()) <= hi
    assert abs(float(p.gray.double().mean()) - 0.2) < 0.015
    blur = p.sigma > 0
    assert abs(float(blur.double().mean()) - 0.5) < 0.015
    s = p.sigma[blur].double()
    assert 0.1 <= float(s.min()) < 0.11 and 1.99 < float(s.max()) <= 2.0


# --------------------------------------------------------------------- loss weights


def test_distillation_weights_and_total(run: tuple[Trainer, list]) -> None:
    """total = (loss_x + loss_u + dis_loss) / 3, dis_loss = (MSE_dino + MSE_clip) / 2, each
    MSE a mean over all elements (TRAIN_PY losses; MODEL_PY compute_loss)."""
    trainer, _ = run
    crop = trainer.cfg.crop_size
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8)
    view = identity_view(64, crop, crop)
    batch_l = {
        "view": [view] * 2,
        "image": img,
        "mask": torch.zeros(2, 64, 64, dtype=torch.uint8),
        "index": torch.arange(2),
    }
    batch_u = {"view": [view] * 2, "image": img.flip(0), "index": torch.arange(2, 4)}
    views = render_batch(batch_l, batch_u, torch.device("cpu"), gen, 0.5)
    model = trainer.model.eval()
    targets = {}

    def provider(name: str, n: int, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        ch = model.translator(name)[2].out_features
        g = torch.Generator().manual_seed(len(name))
        targets[name] = torch.randn(4, n, n, ch, generator=g)
        return targets[name], torch.ones(4, n, n)

    with torch.no_grad():
        terms = compute_losses(
            model,
            trainer.ema.module,
            views,
            provider,
            batch_l,
            batch_u,
            [DINO, CLIP],
            LossSettings(masked=False),
        )
        out = model(_normalized(views.student_input))
    mse = {t: float((out.translated[t] - targets[t]).square().mean()) for t in (DINO, CLIP)}
    for t in (DINO, CLIP):
        assert float(terms[f"distill/{t}"]) == pytest.approx(mse[t], rel=1e-5)
    want = (float(terms["loss_x"]) + float(terms["loss_u"]) + (mse[DINO] + mse[CLIP]) / 2) / 3
    assert float(terms["loss"]) == pytest.approx(want, rel=1e-5)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    # ImageNet statistics written out (dataset/transform.py normalize)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std
