"""The frozen-teacher interface: canvas in, channels-last token grid out."""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from featstore.constants import DEFAULT_CROP as DEFAULT_BASE_SIZE
from featstore.errors import FeatcacheError
from featstore.schema import ResizeSpec, TeacherSpec

# interpolate() accepts align_corners / antialias only for these modes.
_ALIGNABLE = {"linear", "bilinear", "bicubic", "trilinear"}
_ANTIALIASABLE = {"bilinear", "bicubic"}


class TeacherInputError(FeatcacheError, ValueError):
    """Images handed to a teacher are not a float [B, 3, H, H] batch."""


def resize_images(x: torch.Tensor, size: int, resize: ResizeSpec) -> torch.Tensor:
    """Resize a [B, C, H, W] batch to ``size × size`` as ``resize`` says (no-op when equal)."""
    if x.shape[-2:] == (size, size):
        return x
    kwargs: dict[str, object] = {}
    if resize.mode in _ALIGNABLE:
        kwargs["align_corners"] = resize.align_corners
    if resize.mode in _ANTIALIASABLE:
        kwargs["antialias"] = resize.antialias
    return F.interpolate(x, size=(size, size), mode=resize.mode, **kwargs)


def snap_down(px: int, stride: int) -> int:
    """Largest multiple of ``stride`` not above ``px`` (at least ``stride``)."""
    return max(stride, px // stride * stride)


class Teacher(nn.Module, abc.ABC):
    """A frozen feature extractor with a :class:`TeacherSpec`.

    ``forward(images)`` takes float [B, 3, H, H] images in [0, 1] (a square canvas), resizes them
    to ``spec.input_px(H, base_size)`` with ``spec.resize``, normalises with ``spec.mean/std`` and
    returns float32 [B, g, g, C] tokens (channels last) from :meth:`features`.

    Attributes:
        spec: What the teacher computes (stored with every cached feature).
        base_size: Canvas size that ``spec.input_size`` refers to.
    """

    def __init__(self, spec: TeacherSpec, base_size: int = DEFAULT_BASE_SIZE) -> None:
        super().__init__()
        self.spec = spec
        self.base_size = int(base_size)
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1), False)

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, g, g, C] of a resized, normalised input batch [B, 3, P, P]."""

    def freeze(self) -> Teacher:
        """Put the teacher in eval mode and switch off gradients of all parameters."""
        for param in self.parameters():
            param.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode (dropout/BN statistics frozen) whatever the caller asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the teacher's buffers."""
        return self.pixel_mean.device

    def input_px(self, canvas: int) -> int:
        """Teacher input size for a square canvas of ``canvas`` px."""
        return self.spec.input_px(canvas, self.base_size)

    def grid_size(self, canvas: int) -> int:
        """Output tokens per side for a square canvas of ``canvas`` px."""
        return self.spec.grid_size(canvas, self.base_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize a validated canvas batch to the teacher input and normalise it."""
        x = images.to(self.device, torch.float32)
        x = resize_images(x, self.input_px(x.shape[-1]), self.spec.resize)
        return (x - self.pixel_mean) / self.pixel_std

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise TeacherInputError(
                f"teacher {self.spec.name!r} needs float images [B, 3, H, H] (a square canvas), "
                f"got shape {tuple(images.shape)}; pad the rendered tile to a square canvas"
            )
        if not images.is_floating_point():
            raise TeacherInputError(
                f"teacher {self.spec.name!r} needs float images in [0, 1], got {images.dtype}; "
                "convert uint8 with images.float() / 255"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float [B, 3, H, H] canvas in [0, 1] → float32 [B, g, g, C] tokens."""
        self._check(images)
        # no_grad rather than inference_mode: online-teacher targets must stay usable in
        # autograd graphs (inference tensors cannot be saved for backward).
        with torch.no_grad():
            out = self.features(self.preprocess(images))
        return out.float().contiguous()

    def extra_repr(self) -> str:
        """Short description for ``print(teacher)``."""
        s = self.spec
        return f"name={s.name!r}, arch={s.arch!r}, input={s.input_size}, stride={s.stride}"


def tokens_to_grid(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, prefix + gh*gw, C] sequence → [B, gh, gw, C] with the prefix tokens dropped."""
    b, _, c = tokens.shape
    return tokens[:, prefix:].reshape(b, grid[0], grid[1], c)
