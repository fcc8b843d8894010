"""Batched, on-device augmentation of rendered views: photometric ops and CutMix.

Views are rendered by ``featviews.render`` (the one renderer of extraction, bank and trainer).
Photometric ops draw per-sample parameters and use plain tensor math (torchvision's batched
functional ops share one parameter set across the batch). Hue is shifted in HSV space like
torchvision. Two choices have an official variant (``fixmatch.jitter_order`` / ``fixmatch.blur``):

* colour-jitter op order: ``"batch"`` (default) draws one order per batch; ``"sample"`` draws one
  per sample, as torchvision's ``ColorJitter`` does per call in the official per-sample loader.
  Both evaluate the same number of ops: at each of the four positions every sample gets exactly
  one op (samples are grouped by the op they get there; the grouping adds a gather/scatter).
* blur: ``"gaussian"`` (default) is a sampled Gaussian truncated at ``ceil(3 sigma_max)`` px with
  mirrored borders; ``"pil"`` is what the official ``ImageFilter.GaussianBlur(radius=sigma)``
  computes: three passes per axis of an extended box filter (Gwosdek et al. 2011, Pillow's
  ``ImagingGaussianBlur``) with repeated border pixels, here in float (PIL rounds to uint8 after
  every pass: at most 3/255 apart, see tests/trainer/test_official_fidelity.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
JITTER_ORDERS = ("batch", "sample")
BLURS = ("gaussian", "pil")
PIL_BLUR_PASSES = 3  # Pillow's ImageFilter.GaussianBlur always runs 3 box passes per axis


# ---------------------------------------------------------------- photometric (strong views)


@dataclass
class PhotometricParams:
    """Per-sample photometric parameters (identity values where an op is not applied)."""

    brightness: torch.Tensor  # [B] factor, 1 = identity
    contrast: torch.Tensor  # [B] factor, 1 = identity
    saturation: torch.Tensor  # [B] factor, 1 = identity
    hue: torch.Tensor  # [B] shift in turns, 0 = identity
    # jitter op order (0 b, 1 c, 2 s, 3 h): a tuple shared by the batch, or int64 [B, 4] per sample
    order: tuple[int, ...] | torch.Tensor
    gray: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] blur sigma in px, 0 = no blur


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=gen.device, dtype=torch.float64)


def draw_photometric(
    batch: int,
    generator: torch.Generator,
    p_jitter: float = 0.8,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.25,
    p_gray: float = 0.2,
    p_blur: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    jitter_order: str = "batch",
) -> PhotometricParams:
    """Draw the official strong-view parameters (ColorJitter p, RandomGrayscale, blur).

    ``jitter_order``: ``"batch"``: one op order for the batch; ``"sample"``: one per sample
    (official).
    """
    _check_choice("jitter_order", jitter_order, JITTER_ORDERS)
    g = generator
    jit = torch.rand(batch, generator=g, device=g.device) < p_jitter
    one = torch.ones(batch, dtype=torch.float64, device=g.device)

    def factor(amount: float) -> torch.Tensor:
        return torch.where(jit, _uniform(batch, max(0.0, 1 - amount), 1 + amount, g), one)

    b, c, s = factor(brightness), factor(contrast), factor(saturation)
    h = torch.where(jit, _uniform(batch, -hue, hue, g), 0 * one)
    order: tuple[int, ...] | torch.Tensor
    if jitter_order == "sample":  # argsort of iid uniforms: a uniform permutation per row
        order = torch.rand(batch, 4, generator=g, device=g.device).argsort(1)
    else:
        order = tuple(int(i) for i in torch.randperm(4, generator=g, device=g.device).tolist())
    gray = torch.rand(batch, generator=g, device=g.device) < p_gray
    blur = torch.rand(batch, generator=g, device=g.device) < p_blur
    sig = torch.where(blur, _uniform(batch, sigma[0], sigma[1], g), 0 * one)
    return PhotometricParams(b, c, s, h, order, gray, sig)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of RGB ``[B, 3, H, W]``."""
    w = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.to(x.dtype).view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns per sample (HSV round trip; shift 0 returns ``x``)."""
    mx, amx = x.max(1)
    mn = x.min(1).values
    d = mx - mn
    dd = torch.where(d > 0, d, torch.ones_like(d))
    r, g, b = x.unbind(1)
    h6 = torch.where(
        amx == 0, (g - b) / dd % 6, torch.where(amx == 1, (b - r) / dd + 2, (r - g) / dd + 4)
    )
    h6 = (h6 + 6 * shift.to(x.dtype).view(-1, 1, 1)) % 6
    sat = torch.where(mx > 0, d / torch.where(mx > 0, mx, torch.ones_like(mx)), 0 * mx)
    out = []
    for n in (5.0, 3.0, 1.0):  # R, G, B of the standard HSV -> RGB closed form
        k = (n + h6) % 6
        out.append(mx - mx * sat * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    rotated = torch.stack(out, 1)
    return torch.where(shift.view(-1, 1, 1, 1) != 0, rotated, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` (0 = untouched), reflect padding.

    One grouped conv per direction: the batch and channels become groups with their own kernel.
    """
    bsz, ch, hgt, wid = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    s = sigma.to(device=x.device, dtype=torch.float64).view(-1, 1)
    k = torch.exp(-0.5 * (t / torch.where(s > 0, s, torch.ones_like(s))) ** 2)
    k = torch.where(s > 0, k / k.sum(1, keepdim=True), (t == 0).to(k.dtype))
    k = k.to(x.dtype).repeat_interleave(ch, 0)  # [B*C, K]
    y = x.reshape(1, bsz * ch, hgt, wid)
    y = F.conv2d(
        F.pad(y, (radius, radius, 0, 0), mode="reflect"),
        k.view(-1, 1, 1, 2 * radius + 1),
        groups=bsz * ch,
    )
    y = F.conv2d(
        F.pad(y, (0, 0, radius, radius), mode="reflect"),
        k.view(-1, 1, 2 * radius + 1, 1),
        groups=bsz * ch,
    )
    return y.view(bsz, ch, hgt, wid)


def pil_blur_radius(sigma: torch.Tensor, passes: int = PIL_BLUR_PASSES) -> torch.Tensor:
    """Pillow's extended-box radius ``l + a`` for a Gaussian of std ``sigma`` in ``passes`` passes.

    Gwosdek et al. 2011, eqs. 7, 11, 14 as in Pillow's ``_gaussian_blur_radius``: per-pass
    variance ``s2 = sigma^2 / passes``, box length ``L = sqrt(12 s2 + 1)``, integer radius
    ``l = floor((L - 1) / 2)``, fraction ``a = (2l + 1)(l(l + 1) - 3 s2) / (6 (s2 - (l + 1)^2))``.
    """
    s2 = sigma.to(torch.float64) ** 2 / passes
    length = torch.sqrt(12 * s2 + 1)
    lo = torch.floor((length - 1) / 2)
    frac = (2 * lo + 1) * (lo * (lo + 1) - 3 * s2) / (6 * (s2 - (lo + 1) ** 2))
    return lo + frac


def _box_kernels(radius: torch.Tensor) -> torch.Tensor:
    """Float64 ``[B, 2 r_max + 3]`` extended-box kernels of float radii ``R`` (``r = floor R``).

    The ``2r + 1`` inner taps weigh ``1 / (2R + 1)``, the two taps at ``+-(r + 1)`` the rest,
    ``(R - r) / (2R + 1)`` each (Pillow's ``ww`` / ``fw``); zero beyond.
    """
    r = torch.floor(radius).view(-1, 1)
    half = int(r.max()) + 1
    t = torch.arange(-half, half + 1, device=radius.device, dtype=torch.float64).abs().view(1, -1)
    width = 2 * radius.view(-1, 1) + 1
    inner = torch.where(t <= r, 1 / width, torch.zeros_like(t))
    return torch.where(t == r + 1, (radius.view(-1, 1) - r) / width, inner)


def pil_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` per sample, in float (0 = untouched).

    Three extended-box passes along the width, then three along the height, each pass reading
    repeated edge pixels beyond the border (Pillow's box blur clamps its indices).
    """
    bsz, ch, hgt, wid = x.shape
    s = sigma.to(device=x.device, dtype=torch.float64)
    # sigma 0 gives R = 0: the kernel is the unit impulse, so those samples come out unchanged
    k = _box_kernels(pil_blur_radius(s.clamp(min=0)))
    half = k.shape[1] // 2
    k = k.to(x.dtype).repeat_interleave(ch, 0)  # [B*C, K]
    y = x.reshape(1, bsz * ch, hgt, wid)
    for _ in range(PIL_BLUR_PASSES):
        y = F.conv2d(
            F.pad(y, (half, half, 0, 0), mode="replicate"),
            k.view(-1, 1, 1, 2 * half + 1),
            groups=bsz * ch,
        )
    for _ in range(PIL_BLUR_PASSES):
        y = F.conv2d(
            F.pad(y, (0, 0, half, half), mode="replicate"),
            k.view(-1, 1, 2 * half + 1, 1),
            groups=bsz * ch,
        )
    return y.view(bsz, ch, hgt, wid)


def _jitter_op(
    x: torch.Tensor, op: int, p: PhotometricParams, rows: torch.Tensor | None
) -> torch.Tensor:
    """Colour-jitter op ``op`` on ``x`` with the parameters of batch ``rows`` (None: all)."""

    def par(v: torch.Tensor) -> torch.Tensor:
        v = v.to(x.device)
        return v if rows is None else v[rows]

    if op == 0:
        return (x * par(p.brightness).to(x).view(-1, 1, 1, 1)).clamp(0, 1)
    if op == 1:
        return _blend(x, to_gray(x).mean((-2, -1), keepdim=True), par(p.contrast))
    if op == 2:
        return _blend(x, to_gray(x), par(p.saturation))
    return adjust_hue(x, par(p.hue))


def _apply_jitter(
    x: torch.Tensor, order: tuple[int, ...] | torch.Tensor, p: PhotometricParams
) -> torch.Tensor:
    """Jitter ops in a shared order (tuple) or a per-sample order (``[B, 4]`` tensor).

    Per-sample: at each position the samples are grouped by the op they get there, so every
    sample still goes through exactly one op per position (the op count of a shared order).
    """
    if isinstance(order, tuple):
        for op in order:
            x = _jitter_op(x, op, p, None)
        return x
    orders = order.cpu()  # one host sync for the whole call
    for pos in range(orders.shape[1]):
        col = orders[:, pos]
        out = torch.empty_like(x)
        for op in col.unique().tolist():
            rows = (col == op).nonzero().squeeze(1).to(x.device)
            out[rows] = _jitter_op(x[rows], int(op), p, rows)
        x = out
    return x


def apply_photometric(
    views: torch.Tensor, p: PhotometricParams, blur_radius: int, blur: str = "gaussian"
) -> torch.Tensor:
    """Apply drawn parameters: jitter ops in ``p.order``, then grayscale, then blur.

    ``blur``: ``"gaussian"`` (truncated at ``blur_radius`` px, mirrored borders) or ``"pil"``
    (PIL's extended-box passes; ``blur_radius`` unused).
    """
    _check_choice("blur", blur, BLURS)
    x = _apply_jitter(views, p.order, p)
    x = torch.where(p.gray.to(x.device).view(-1, 1, 1, 1), to_gray(x).expand_as(x), x)
    if bool((p.sigma > 0).any()):
        sig = p.sigma.to(x.device)
        x = pil_gaussian_blur(x, sig) if blur == "pil" else gaussian_blur(x, sig, blur_radius)
    return x


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"{name} {value!r} is not one of {', '.join(choices)} (config: fixmatch.{name})"
        )


def strong_photometric(
    views: torch.Tensor,
    generator: torch.Generator,
    p_jitter: float = 0.8,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.25,
    p_gray: float = 0.2,
    p_blur: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    jitter_order: str = "batch",
    blur: str = "gaussian",
) -> torch.Tensor:
    """The official strong augmentation, per-sample parameters, batched on the views' device.

    ``jitter_order`` / ``blur``: see the module docstring (official: ``"sample"`` / ``"pil"``).
    Gaussian blur kernels reach ``ceil(3 * sigma_max)`` px each side.
    """
    params = draw_photometric(
        views.shape[0],
        generator,
        p_jitter,
        brightness,
        contrast,
        saturation,
        hue,
        p_gray,
        p_blur,
        sigma,
        jitter_order,
    )
    return apply_photometric(views, params, math.ceil(3 * sigma[1]), blur)


# ---------------------------------------------------------------- CutMix


def cutmix_boxes(
    batch: int,
    view: int,
    generator: torch.Generator,
    p: float = 0.5,
    size_min: float = 0.02,
    size_max: float = 0.4,
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    max_rounds: int = 10000,
) -> torch.Tensor:
    """Draw CutMix boxes with the official rule, batched.

    With probability ``p``: area ``A = U(size_min, size_max) V^2``; then repeat (fresh aspect
    ``r = U(ratio)``, ``w = floor(sqrt(A / r))``, ``h = floor(sqrt(A r))``, top-left ``x, y``
    uniform integers in ``[0, V)``) until the box fits in the view.

    Returns:
        int64 ``[B, 4]`` ``(y, x, h, w)`` on the generator's device; zeros where not applied.
    """
    g, dev = generator, generator.device
    pending = torch.rand(batch, generator=g, device=dev) < p
    area = _uniform(batch, size_min, size_max, g) * view * view
    boxes = torch.zeros(batch, 4, dtype=torch.int64, device=dev)
    for _ in range(max_rounds):
        if not bool(pending.any()):
            return boxes
        r = _uniform(batch, ratio[0], ratio[1], g)
        w = torch.sqrt(area / r).floor().long()
        h = torch.sqrt(area * r).floor().long()
        x = torch.randint(0, view, (batch,), generator=g, device=dev)
        y = torch.randint(0, view, (batch,), generator=g, device=dev)
        ok = pending & (x + w <= view) & (y + h <= view)
        boxes[ok] = torch.stack([y, x, h, w], 1)[ok]
        pending &= ~ok
    raise RuntimeError(
        f"cutmix_boxes: no box fitted in {max_rounds} rounds; check size_max "
        f"({size_max}) and ratio ({ratio}) against the view size {view}"
    )


def box_mask(boxes: torch.Tensor, view: int) -> torch.Tensor:
    """Bool ``[B, V, V]``: rows ``y..y+h-1``, columns ``x..x+w-1`` of each box."""
    r = torch.arange(view, device=boxes.device).view(1, -1)
    y, x, h, w = (boxes[:, k : k + 1] for k in range(4))
    iy = (r >= y) & (r < y + h)
    ix = (r >= x) & (r < x + w)
    return iy.unsqueeze(2) & ix.unsqueeze(1)


def paste(x: torch.Tensor, other: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``other`` inside each box, ``x`` elsewhere; any ``[B, ..., V, V]``."""
    view = x.shape[-1]
    m = box_mask(boxes.to(x.device), view)
    return torch.where(m.view(m.shape[0], *([1] * (x.dim() - 3)), view, view), other, x)


def cutmix_pixels(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Paste the partner's (batch reversed) pixels inside each box; any ``[B, ..., V, V]``."""
    return paste(x, x.flip(0), boxes)


__all__ = [
    "BLURS",
    "JITTER_ORDERS",
    "PhotometricParams",
    "adjust_hue",
    "apply_photometric",
    "box_mask",
    "cutmix_boxes",
    "cutmix_pixels",
    "draw_photometric",
    "gaussian_blur",
    "paste",
    "pil_blur_radius",
    "pil_gaussian_blur",
    "strong_photometric",
    "to_gray",
]
