"""The wiring inside a training step, pinned with models whose logits are a known per-pixel
function of their input and hand-built batches.

Official behaviour (earth-insights/RS-MTDF, fixmatch_distill_with_models.py:172-194, reference
sections 2.1, 2.4 and 4): the EMA pseudo-label, its confidence and the ignore mask are CutMixed
with exactly the box and partner (the batch reversed) of the strong view's pixels; the
unsupervised loss reads the student's logits of the (CutMixed) strong unlabeled views; labeled
views get no photometric augmentation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import trainer.methods.rs_mtdf as rs_mtdf
from featstore import open_store
from featviews.draw import ViewParams
from featviews.sources import Views
from tests.helpers import DINO, build_store, tiny_config
from trainer.config import TeacherConfig
from trainer.engine import Trainer
from trainer.step import LossSettings, compute_losses, pseudo_labels, render_batch
from trainer.student import StudentOutput

MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)  # ImageNet, written out
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
TILE, CROP = 6, 8  # views padded right/bottom by 2 px: an L-shaped strip of padding


class PixelModel(nn.Module):
    """Logits ``scale * x + bias`` per pixel (3 classes = the 3 input channels)."""

    def __init__(self, scale: float, bias: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("bias", torch.tensor(bias).view(1, 3, 1, 1))
        self.gain = nn.Parameter(torch.ones(()))  # gives the loss a graph

    def forward(self, x: torch.Tensor, need_translated: bool = True) -> StudentOutput:
        return StudentOutput(self.gain * (self.scale * x + self.bias), {})


def hand_logits(x01: np.ndarray, scale: float, bias=(0.0, 0.0, 0.0)) -> np.ndarray:
    """What `PixelModel` must output for views ``x01`` in [0, 1] (normalised first)."""
    return scale * (x01 - MEAN) / STD + np.array(bias).reshape(1, 3, 1, 1)


def hand_mix(maps: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Official CutMix: inside sample b's box (y, x, h, w), take sample B-1-b's values."""
    out = maps.copy()
    last = len(maps) - 1
    for b, (y, x, h, w) in enumerate(boxes):
        out[b, ..., y : y + h, x : x + w] = maps[last - b, ..., y : y + h, x : x + w]
    return out


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def padded(img: np.ndarray) -> np.ndarray:
    """Tiles ``[B, 3, T, T]`` uint8 -> views in [0, 1] padded with black to CROP (scale 1)."""
    out = np.zeros((img.shape[0], 3, CROP, CROP))
    out[:, :, :TILE, :TILE] = img / 255.0
    return out


def batch(seed: int, n: int, labeled: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (n, 3, TILE, TILE), generator=g, dtype=torch.uint8)
    out = {
        "view": [ViewParams(TILE, 0, 0, False, TILE, CROP)] * n,
        "image": img,
        "index": torch.arange(n),
    }
    if labeled:
        out["mask"] = torch.randint(0, 3, (n, TILE, TILE), generator=g, dtype=torch.uint8)
    return out


BOXES = [(1, 2, 3, 4), (2, 2, 2, 2), (0, 5, 8, 3)]  # (y, x, h, w); sample 1 mixes with itself


def test_pseudo_conf_and_ignore_are_mixed_inside_the_box() -> None:
    """Weak views with padding, hand-set boxes: each map is the EMA's weak-view map with the
    partner's values pasted inside the box, pixel by pixel."""
    gen = torch.Generator().manual_seed(0)
    x_w = torch.rand(3, 3, CROP, CROP, generator=gen, dtype=torch.float64).float()
    pad = torch.zeros(3, CROP, CROP, dtype=torch.bool)
    pad[0, :, 6:] = True  # different padding per sample, so mixing it is visible
    pad[2, 5:, :] = True
    views = Views(
        None,
        None,
        None,
        x_w=x_w,
        x_s=x_w,
        pad_u=pad,  # type: ignore[arg-type]
        boxes=torch.tensor(BOXES),
    )
    pseudo, conf, ignore = pseudo_labels(PixelModel(4.0), views, bf16=False)

    logp = log_softmax(hand_logits(x_w.double().numpy(), 4.0))
    want_pseudo = hand_mix(logp.argmax(1), BOXES)
    want_conf = hand_mix(np.exp(logp.max(1)), BOXES)
    want_ignore = hand_mix(pad.numpy(), BOXES)
    np.testing.assert_array_equal(pseudo.numpy(), want_pseudo)
    np.testing.assert_allclose(conf.numpy(), want_conf, rtol=1e-5)
    np.testing.assert_array_equal(ignore.numpy(), want_ignore)
    # the boxes matter: unmixed maps differ inside them
    assert (want_pseudo != logp.argmax(1)).any() and (want_ignore != pad.numpy()).any()


def test_label_box_is_the_pixel_box() -> None:
    """render_batch mixes the strong pixels with the boxes that pseudo_labels mixes labels with:
    for a per-pixel model, labels of the weak views mixed by the step equal the labels of the
    mixed strong view itself (photometric off, CutMix always on)."""
    gen = torch.Generator().manual_seed(1)
    views = render_batch(
        batch(1, 2, True),
        batch(2, 3, False),
        torch.device("cpu"),
        gen,
        cutmix_p=1.0,
        photometric=False,
    )
    assert bool((views.boxes[:, 2] > 0).all())
    boxes = [tuple(int(v) for v in b) for b in views.boxes]
    np.testing.assert_array_equal(views.x_s.numpy(), hand_mix(views.x_w.numpy(), boxes))
    pseudo, conf, _ = pseudo_labels(PixelModel(4.0), views, bf16=False)
    logp = log_softmax(hand_logits(views.x_s.double().numpy(), 4.0))
    np.testing.assert_array_equal(pseudo.numpy(), logp.argmax(1))
    np.testing.assert_allclose(conf.numpy(), np.exp(logp.max(1)), rtol=1e-5)


@pytest.mark.parametrize("thresh", [0.0, 0.6])
def test_unsupervised_loss_reads_the_strong_unlabeled_logits(thresh: float) -> None:
    """loss_u = sum(CE(student(strong), mixed pseudo) [conf >= t] [not ignored]) / #not ignored,
    with the student's logits of the unlabeled part of cat(labeled, strong); loss_x = CE of the
    labeled part. Student and EMA are different per-pixel functions, so a swap is visible."""
    gen = torch.Generator().manual_seed(3)
    b_l, b_u = batch(4, 2, True), batch(5, 3, False)
    views = render_batch(b_l, b_u, torch.device("cpu"), gen, cutmix_p=1.0, photometric=True)
    student, ema = PixelModel(3.0, (0.5, 0.0, -0.5)), PixelModel(5.0)
    with torch.no_grad():
        terms = compute_losses(
            student, ema, views, None, b_l, b_u, [], LossSettings(conf_thresh=thresh)
        )

    boxes = [tuple(int(v) for v in b) for b in views.boxes]
    ema_logp = log_softmax(hand_logits(views.x_w.double().numpy(), 5.0))
    pseudo = hand_mix(ema_logp.argmax(1), boxes)
    conf = hand_mix(np.exp(ema_logp.max(1)), boxes)
    pad = np.ones((3, CROP, CROP), bool)
    pad[:, :TILE, :TILE] = False
    ignore = hand_mix(pad, boxes)

    def loss_u_of(x01: np.ndarray) -> float:
        logp = log_softmax(hand_logits(x01, 3.0, (0.5, 0.0, -0.5)))
        ce = -np.take_along_axis(logp, pseudo[:, None], 1)[:, 0]
        keep = (conf >= thresh) & ~ignore
        return float((ce * keep).sum() / (~ignore).sum())

    want_u = loss_u_of(views.x_s.double().numpy())
    assert float(terms["loss_u"]) == pytest.approx(want_u, rel=1e-5)
    wrong = loss_u_of(views.x_w.double().numpy())  # weak instead of strong: another number
    assert abs(wrong - want_u) > 1e-3 * want_u

    y = views.y_l.numpy()
    logp_l = log_softmax(hand_logits(views.x_l.double().numpy(), 3.0, (0.5, 0.0, -0.5)))
    valid = y != 255
    ce_l = -np.take_along_axis(logp_l, np.where(valid, y, 0)[:, None], 1)[:, 0]
    assert float(terms["loss_x"]) == pytest.approx(float(ce_l[valid].mean()), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx((want_u + float(ce_l[valid].mean())) / 2, rel=1e-5)


def test_labeled_views_get_no_colour_augmentation() -> None:
    """Photometric and CutMix on: labeled views are the tiles /255 (padded) exactly, while the
    strong views differ from the weak ones."""
    gen = torch.Generator().manual_seed(6)
    b_l, b_u = batch(7, 4, True), batch(8, 4, False)
    views = render_batch(b_l, b_u, torch.device("cpu"), gen, cutmix_p=1.0, photometric=True)
    np.testing.assert_allclose(views.x_l.numpy(), padded(b_l["image"].numpy()), atol=1e-6)
    np.testing.assert_allclose(views.x_w.numpy(), padded(b_u["image"].numpy()), atol=1e-6)
    assert float((views.x_s - views.x_w).abs().max()) > 0.05
    mask = np.full((4, CROP, CROP), 255)
    mask[:, :TILE, :TILE] = b_l["mask"].numpy()
    np.testing.assert_array_equal(views.y_l.numpy(), mask)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_store(tmp_path_factory.mktemp("wiring"), teachers=(DINO,))


def test_engine_step_feeds_clean_labeled_and_strong_unlabeled(
    store: str, tmp_path, monkeypatch
) -> None:
    """One real `Trainer` step at scale 1, no flip: the student's input is
    normalise(cat(labeled, strong)); its labeled half is the stored tiles /255, untouched by
    colour augmentation; the strong half is not the weak view."""
    st = open_store(store)
    ids = [t.tile_id for t in st.tiles]
    cfg = tiny_config(tmp_path, store, ids, [TeacherConfig(DINO, "full")], iters=1)
    cfg.data.scale_range, cfg.data.flip_p = (1.0, 1.0), 0.0
    trainer = Trainer(cfg)
    seen: dict = {}
    real_render = rs_mtdf.render_batch

    def spy(batch_l, batch_u, *args, **kwargs):
        seen["batch_l"], seen["views"] = batch_l, real_render(batch_l, batch_u, *args, **kwargs)
        return seen["views"]

    monkeypatch.setattr(rs_mtdf, "render_batch", spy)

    def capture(module: nn.Module, args: tuple) -> None:  # None: the input is not replaced
        seen.setdefault("input", args[0].detach().clone())

    hook = trainer.model.register_forward_pre_hook(capture)
    try:
        trainer.run()
    finally:
        hook.remove()
    views, b_l = seen["views"], seen["batch_l"]
    n_l = views.x_l.shape[0]
    tile = views.geom_l.tile
    crop = cfg.crop_size
    want = np.zeros((n_l, 3, crop, crop))
    for k, i in enumerate(b_l["index"].tolist()):
        want[k, :, :tile, :tile] = st.read_image(i).transpose(2, 0, 1) / 255.0
    got = seen["input"].double().numpy()
    np.testing.assert_allclose(got[:n_l], (want - MEAN) / STD, atol=1e-5)
    strong = (views.x_s.double().numpy() - MEAN) / STD
    np.testing.assert_allclose(got[n_l:], strong, atol=1e-5)
    assert float((views.x_s - views.x_w).abs().max()) > 0.05
