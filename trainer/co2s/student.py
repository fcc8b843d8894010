"""Co2S students: a backbone pyramid + class embeddings + the cost-volume decoder.

``build_co2s_student(kind, num_classes, text_embeddings, ...)`` is the one entry point (the
``co2s`` method and the benchmarks use it). Kinds are registered (``STUDENT_KINDS``,
``@register_student_kind``): ``"clip"`` (CLIP ViT-B/16, MaskCLIP value path, frozen text matrix)
and ``"dinov3"`` (DINOv3 ViT-B/16, learnable class queries). Sizes: ``"base"`` (the real ViT-B/16)
and ``"tiny"`` (width 64, 4 blocks, 2 heads, patch 16; always random; for tests).

Weights follow the student's policy (``trainer.student``): a local file, loaded strictly (missing
or unexpected keys raise an error naming the file), or random init, which a base-size student
only accepts when asked (``random_weights=True``); tiny students are always random.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.co2s.clip_backbone import PATCH, ClipBackbone, ClipSize, resize_pos_embed
from trainer.co2s.decoder import CostVolumeDecoder
from trainer.co2s.dino_backbone import DinoBackbone, DinoSize, LearnableQueries
from trainer.config import Co2SConfig
from trainer.student import (
    BackboneWeightsError,
    RandomBackboneError,
    StudentConfigError,
    _head,
    _read_state_dict,
    _strip_prefixes,
)

__all__ = [
    "FINETUNE_REGIMES",
    "FP_RATE",
    "STUDENT_KINDS",
    "Co2SStudent",
    "build_co2s_student",
    "register_student_kind",
]

# Channel-dropout rate of the feature-perturbed stream (official fp_rate).
FP_RATE = 0.5
TINY = "tiny"  # always random init

# Which backbone parameters train, by name. "attn" is the official regime (freeze_backbone with
# exclude_keys=['attn']: the fused QKV in-projection and the out-projection of every block).
FINETUNE_REGIMES: dict[str, Callable[[str], bool]] = {
    "attn": lambda name: "attn" in name,
    "full": lambda name: True,
    "frozen": lambda name: False,
}


@dataclass(frozen=True)
class _Parts:
    """What a kind builds: the backbone and exactly one class-embedding source."""

    backbone: nn.Module
    text: torch.Tensor | None = None
    queries: LearnableQueries | None = None


class StudentKind:
    """A registered student kind: builds its parts and loads a weights file into its backbone.

    Attributes:
        name: Registry name (set by :func:`register_student_kind`).
        sizes: Dimensions per size name (``"base"``, ``"tiny"``).
        layouts: The checkpoint layouts :meth:`adapt` accepts (for error messages).
    """

    name = ""
    sizes: Mapping[str, Any] = {}
    layouts = ""

    def build(
        self, num_classes: int, text: torch.Tensor | None, size: str, crop: int, clip_act: str
    ) -> _Parts:
        """Backbone and class embeddings of this kind."""
        raise NotImplementedError

    def weights_target(self, backbone: nn.Module) -> nn.Module:
        """The module a weights file's keys name."""
        raise NotImplementedError

    def adapt(
        self, state_dict: dict[str, torch.Tensor], target: nn.Module
    ) -> dict[str, torch.Tensor]:
        """Map a checkpoint's layout onto ``target``'s keys (documented conventions only)."""
        return state_dict


STUDENT_KINDS: dict[str, StudentKind] = {}


def register_student_kind(name: str) -> Callable[[type[StudentKind]], type[StudentKind]]:
    """Class decorator registering a :class:`StudentKind` under ``name``."""

    def deco(cls: type[StudentKind]) -> type[StudentKind]:
        kind = cls()
        kind.name = name
        STUDENT_KINDS[name] = kind
        return cls

    return deco


def _pick_size(sizes: Mapping[str, Any], size: str) -> Any:
    if size not in sizes:
        raise StudentConfigError(
            f"Co2S student size={size!r} is not known; use one of {sorted(sizes)}"
        )
    return sizes[size]


@register_student_kind("clip")
class ClipKind(StudentKind):
    """CLIP ViT-B/16 + frozen text matrix. Tiny: blocks (0, 1, 3) of 4 (for 0, 4, 11 of 12)."""

    sizes = {
        "base": ClipSize(width=768, layers=12, heads=12, blocks=(0, 4, 11), output_dim=512),
        TINY: ClipSize(width=64, layers=4, heads=2, blocks=(0, 1, 3)),
    }
    layouts = "an OpenAI/open_clip ViT-B-16 state dict (the whole model or its visual.* part)"

    def build(
        self, num_classes: int, text: torch.Tensor | None, size: str, crop: int, clip_act: str
    ) -> _Parts:
        dims = _pick_size(self.sizes, size)
        text = _check_text(text, num_classes, dims.output_dim)
        backbone = ClipBackbone(dims, crop, output_dim=text.shape[1], act=clip_act)
        return _Parts(backbone, text=text)

    def weights_target(self, backbone: nn.Module) -> nn.Module:
        return backbone.visual

    def adapt(
        self, state_dict: dict[str, torch.Tensor], target: nn.Module
    ) -> dict[str, torch.Tensor]:
        # A whole CLIP checkpoint (OpenAI/open_clip layout): its image tower is the visual.* part.
        if any(k.startswith("visual.") for k in state_dict):
            state_dict = {k[7:]: v for k, v in state_dict.items() if k.startswith("visual.")}
        pos = state_dict.get("positional_embedding")
        if pos is not None and pos.ndim == 2:
            # The official code resizes the 14x14 (224 px) grid to crop/16 once, at load time.
            grid = target.grid_size
            state_dict["positional_embedding"] = resize_pos_embed(pos, grid)
        return state_dict


@register_student_kind("dinov3")
class DinoKind(StudentKind):
    """DINOv3 ViT-B/16 + learnable queries. Tiny: blocks (1, 2, 3) of 4 (for 2, 7, 11 of 12)."""

    sizes = {
        "base": DinoSize(blocks=(2, 7, 11), width=768),
        TINY: DinoSize(
            blocks=(1, 2, 3),
            width=64,
            overrides=(("embed_dim", 64), ("depth", 4), ("num_heads", 2)),
        ),
    }
    layouts = "a DINOv3 ViT-B/16 checkpoint (Meta's .pth or timm's vit_base_patch16_dinov3_qkvb)"

    def build(
        self, num_classes: int, text: torch.Tensor | None, size: str, crop: int, clip_act: str
    ) -> _Parts:
        dims = _pick_size(self.sizes, size)
        # text_embeddings are ignored: DINOv3's guidance is implicit (learnable queries)
        return _Parts(DinoBackbone(dims, crop), queries=LearnableQueries(num_classes, dims.width))

    def weights_target(self, backbone: nn.Module) -> nn.Module:
        return backbone.vit

    def adapt(
        self, state_dict: dict[str, torch.Tensor], target: nn.Module
    ) -> dict[str, torch.Tensor]:
        from timm.models.eva import checkpoint_filter_fn

        # timm's own rule maps Meta's DINOv3 layout (storage_tokens, ls1.gamma, ...) to timm's.
        return checkpoint_filter_fn(state_dict, target)


def _check_text(text: torch.Tensor | None, num_classes: int, dim: int | None) -> torch.Tensor:
    if text is None:
        raise StudentConfigError(
            "the CLIP Co2S student needs the class text embeddings [K, D]; write them into the "
            "store with `featcache text STORE ...`"
        )
    text = torch.as_tensor(text).detach().float()
    if text.ndim != 2 or text.shape[0] != num_classes:
        raise StudentConfigError(
            f"text embeddings have shape {tuple(text.shape)}, expected [{num_classes}, D] (one "
            "row per class, in the store's class order); rewrite them with `featcache text`"
        )
    if dim is not None and text.shape[1] != dim:
        raise StudentConfigError(
            f"text embeddings have {text.shape[1]} columns but the CLIP ViT-B/16 projection has "
            f"{dim}; encode them with the ViT-B-16 text tower (`featcache text STORE --weights "
            "ViT-B-16 file`), not a tiny test tower"
        )
    return text


class Co2SStudent(nn.Module):
    """Backbone pyramid -> cost-volume decoder -> logits at the input size.

    Args:
        kind: Registered kind name.
        parts: Backbone and class embeddings (a frozen text matrix or learnable queries).
        num_classes: K.
    """

    def __init__(self, kind: str, parts: _Parts, num_classes: int) -> None:
        super().__init__()
        self.kind = kind
        self.num_classes = num_classes
        self.fp_rate = FP_RATE
        self.backbone = parts.backbone
        # A buffer: saved in the state dict (predict needs no text tower), never trained.
        self.register_buffer("text_embeddings", parts.text, persistent=parts.text is not None)
        self.queries = parts.queries
        embed_dim = parts.backbone.embed_dim
        self.decoder = CostVolumeDecoder(embed_dim, parts.backbone.skip_dims)

    def class_embeddings(self, batch: int) -> torch.Tensor:
        """``[batch, K, C]``: the text rows (CLIP) or the learnable queries (DINOv3)."""
        if self.queries is not None:
            return self.queries(batch)
        return self.text_embeddings[None].expand(batch, -1, -1)

    def forward(
        self, x: torch.Tensor, need_fp: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Segment ImageNet-normalised ``x [B, 3, H, W]`` (H, W multiples of 16).

        Args:
            x: Input batch.
            need_fp: Also decode the feature-perturbed stream: every pyramid map (top and both
                skips) is concatenated with a ``dropout2d(p=fp_rate)`` copy (applied in train
                and eval, as the official ``F.dropout2d(x, p)``), the class embeddings are
                duplicated, and the two halves of the 2B decoded maps are returned.

        Returns:
            Logits ``[B, K, H, W]``, or ``(logits, logits_fp)`` with ``need_fp``.
        """
        h, w = x.shape[-2:]
        if h % PATCH or w % PATCH:
            raise StudentConfigError(
                f"Co2S student input {h}x{w} is not a multiple of the patch {PATCH}; use a crop "
                "size that is a multiple of 16 (e.g. 512)"
            )
        skip2, skip1, top = self.backbone(x)
        classes = self.class_embeddings(x.shape[0])
        if need_fp:
            skip2, skip1, top = (
                torch.cat([m, F.dropout2d(m, self.fp_rate, training=True)])
                for m in (skip2, skip1, top)
            )
            classes = torch.cat([classes, classes])
        logits = self.decoder(top, (skip1, skip2), classes)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits.chunk(2) if need_fp else logits

    def param_groups(
        self,
        lr_backbone: float = Co2SConfig.lr_backbone,
        lr_head: float = Co2SConfig.lr_head,
        lr_queries: float = Co2SConfig.lr_queries,
        weight_decay: float = Co2SConfig.weight_decay,
    ) -> list[dict[str, Any]]:
        """AdamW groups of the trainable parameters (reference §2.4; empty groups left out).

        Defaults: the official rates (``trainer.config.Co2SConfig``: backbone 1e-6, head 1e-3,
        queries 1e-4, weight decay 0.01).

        Each group carries ``name`` and ``base_lr`` (for the poly schedule); every group gets
        ``weight_decay`` (the official norm/ln no-decay keys never fire).
        """
        parts = (
            ("backbone", self.backbone, lr_backbone),
            ("head", self.decoder, lr_head),
            ("queries", self.queries, lr_queries),
        )
        groups = []
        for name, module, lr in parts:
            params = [] if module is None else [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append(
                    dict(params=params, lr=lr, base_lr=lr, weight_decay=weight_decay, name=name)
                )
        return groups


def _load_weights(student: Co2SStudent, kind: StudentKind, path: Path) -> None:
    if not path.is_file():
        raise BackboneWeightsError(
            f"Co2S {kind.name} weights file {path} not found; pass an existing local checkpoint"
        )
    target = kind.weights_target(student.backbone)
    raw = _strip_prefixes(_read_state_dict(path))
    try:
        state_dict = kind.adapt(dict(raw), target)
    except (KeyError, RuntimeError, ValueError, IndexError):
        state_dict = raw  # a layout the adapter cannot map: the strict check below names keys
    try:
        result = target.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise BackboneWeightsError(
            f"Co2S {kind.name} weights {path} do not fit the backbone: {str(err)[:400]}. "
            f"Pass {kind.layouts} of the same size"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise BackboneWeightsError(
            f"Co2S {kind.name} weights {path} do not match the backbone: missing "
            f"{_head(result.missing_keys)}, unexpected {_head(result.unexpected_keys)}. "
            f"Pass {kind.layouts}"
        )


def _random_refused(kind: StudentKind) -> RandomBackboneError:
    return RandomBackboneError(
        f"the Co2S {kind.name} student has no weights and would start from random "
        f"initialisation. Pass its local weights file (library: weights=PATH; {kind.layouts}), "
        "or accept "
        "random init explicitly (library: random_weights=True; CLI --random-weights), or use "
        "size='tiny' for a tiny random test student"
    )


def build_co2s_student(
    kind: str,
    num_classes: int,
    text_embeddings: torch.Tensor | None,
    *,
    size: str = "base",
    finetune: str = "attn",
    clip_act: str = "quickgelu",
    weights: Path | str | None = None,
    random_weights: bool = False,
    checkpointing: bool = False,
    crop: int,
) -> Co2SStudent:
    """Build one Co2S student.

    Args:
        kind: ``"clip"`` or ``"dinov3"`` (``STUDENT_KINDS``).
        num_classes: K.
        text_embeddings: ``[K, 512]`` class text rows for ``"clip"`` (``[K, D]`` of a tiny text
            tower for ``size="tiny"``); ignored by ``"dinov3"``.
        size: ``"base"`` (ViT-B/16) or ``"tiny"`` (tests; always random init).
        finetune: ``"attn"`` (official: attention projections only), ``"full"`` or ``"frozen"``.
        clip_act: ``"quickgelu"`` (matches OpenAI weights) or ``"gelu"`` (official code).
        weights: Local backbone checkpoint, loaded strictly.
        random_weights: Accept random init of a base-size backbone without ``weights``.
        checkpointing: Activation checkpointing of the backbone blocks.
        crop: Training crop (CLIP's position embedding is sized for it).

    Raises:
        StudentConfigError: an unknown kind/size/regime/activation, or text of the wrong shape.
        RandomBackboneError: no weights, base size, and random init not asked for.
        BackboneWeightsError: the weights file is missing or does not fit.
    """
    if kind not in STUDENT_KINDS:
        raise StudentConfigError(
            f"Co2S student kind {kind!r} is not known; use one of {sorted(STUDENT_KINDS)}"
        )
    if finetune not in FINETUNE_REGIMES:
        raise StudentConfigError(
            f"finetune={finetune!r} is not known; use one of {sorted(FINETUNE_REGIMES)}"
        )
    spec = STUDENT_KINDS[kind]
    if weights is None and size != TINY and not random_weights:
        raise _random_refused(spec)
    student = Co2SStudent(
        kind, spec.build(num_classes, text_embeddings, size, crop, clip_act), num_classes
    )
    if weights is not None:
        _load_weights(student, spec, Path(weights).expanduser())
    trainable = FINETUNE_REGIMES[finetune]
    for name, param in student.backbone.named_parameters():
        param.requires_grad_(trainable(name))
    student.backbone.set_grad_checkpointing(checkpointing)
    return student
