"""RS-MTDF student: DINOv2 ViT (timm, SDPA) + DPT head + teacher translators + fusion.

The network follows §3 of the RS-MTDF reference notes (design/rs-mtdf-reference.md): four
normed intermediate levels of the ViT feed a DPT head; per teacher a 2-layer MLP translator maps
the deepest student tokens to the teacher's channels and a linear projection maps them back; the
deepest level fed to the head is ``fusion_self * s + fusion_teacher * sum_t P_t(T_t(.))``.
"clip224" teachers read a second backbone pass on the input resized to ``clip_size`` (16x16
tokens at 224). Every grid other than the native one (37x37 at 518) gets its position embedding
by DINOv2's official rule (:func:`dinov2_pos_embed`), not timm's resize.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from featstore.constants import DEFAULT_CROP
from featstore.errors import FeatcacheError
from featstore.hub import hub_access
from featviews.pos_embed import use_dinov2_pos_embed
from trainer.dpt import DPTHead

__all__ = [
    "BRANCHES",
    "RS_MTDF_TEACHERS",
    "BackboneWeightsError",
    "RandomBackboneError",
    "Student",
    "StudentConfig",
    "StudentConfigError",
    "StudentOutput",
    "TeacherHead",
    "load_backbone_weights",
    "param_groups",
]

BRANCHES = ("full", "clip224")


class StudentConfigError(FeatcacheError, ValueError):
    """A StudentConfig value is invalid."""


class BackboneWeightsError(FeatcacheError, RuntimeError):
    """A backbone weight file cannot be loaded into the student's ViT."""


class RandomBackboneError(StudentConfigError):
    """The student would start from a random backbone and nobody asked for that."""


@dataclass(frozen=True)
class TeacherHead:
    """One distillation target of the student.

    Args:
        name: Teacher name (as in the store / registry).
        channels: Teacher token width ``C_t``.
        branch: ``"full"`` reads the deepest tokens of the full-resolution pass; ``"clip224"``
            reads the pass at ``clip_size`` (the official CLIP path).
    """

    name: str
    channels: int
    branch: str = "full"


RS_MTDF_TEACHERS = (
    TeacherHead("dinov2_vitb14", 768, "full"),
    TeacherHead("clip_vitl14", 1024, "clip224"),
)


@dataclass
class StudentConfig:
    """Student architecture. Defaults are the RS-MTDF values.

    ``backbone_weights``: a local file (``.pth``/``.safetensors``, DINOv2 or timm key layout),
    ``"timm"`` / ``"timm:<tag>"`` for timm's pretrained weights (needs the hub, or timm's local
    cache), or None: random init, refused unless ``random_weights`` (CLI ``--random-weights``;
    ``--tiny`` sets it). ``model_kwargs`` go to ``timm.create_model`` (e.g. a tiny ViT for tests).
    ``clip_from_full``: take the "clip224" tokens by resampling the full pass's deepest tokens to
    the CLIP grid (antialiased bilinear on token centres) instead of a second backbone pass.
    """

    num_classes: int = 7
    arch: str = "vit_small_patch14_dinov2"
    img_size: int = DEFAULT_CROP
    layers: tuple[int, ...] = (2, 5, 8, 11)
    features: int = 64
    out_channels: tuple[int, ...] = (48, 96, 192, 384)
    teachers: tuple[TeacherHead, ...] = RS_MTDF_TEACHERS
    translator_hidden: int = 1024
    fusion_self: float = 0.8
    fusion_teacher: float = 0.1
    clip_size: int = 224
    clip_from_full: bool = False
    grad_checkpointing: bool = False
    backbone_weights: str | None = None
    random_weights: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        self.out_channels = tuple(int(c) for c in self.out_channels)
        self.teachers = tuple(
            t if isinstance(t, TeacherHead) else TeacherHead(**t) for t in self.teachers
        )
        if len(self.layers) != 4 or len(self.out_channels) != 4:
            raise StudentConfigError(
                f"student.layers {self.layers} and student.out_channels {self.out_channels} "
                "must have 4 entries each (the DPT head reads 4 levels)"
            )
        if self.num_classes < 1:
            raise StudentConfigError(f"student.num_classes must be >= 1, got {self.num_classes}")
        if self.backbone_weights is None and not self.random_weights:
            raise RandomBackboneError(
                f"the student backbone {self.arch} has no weights and would start from random "
                "initialisation (far worse than DINOv2's). Pass --pretrained PATH (a DINOv2 "
                ".pth/.safetensors, e.g. dinov2_vits14_pretrain.pth) or --pretrained timm (where "
                "the model hub is reachable); or --random-weights to accept random init "
                "(config: model.random_weights: true; library: random_weights=True); or --tiny "
                "for a tiny random test student"
            )
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise StudentConfigError(f"student.teachers has duplicate names: {names}")
        for t in self.teachers:
            if t.branch not in BRANCHES:
                raise StudentConfigError(
                    f"student.teachers[{t.name}].branch={t.branch!r}; use one of {BRANCHES}"
                )


@dataclass
class StudentOutput:
    """Logits ``[B, K, H, W]`` and translated tokens per teacher ``[B, n, n, C_t]`` (NHWC)."""

    logits: torch.Tensor
    translated: dict[str, torch.Tensor]


def _module_key(name: str) -> str:
    # ModuleDict keys may not contain "."; teacher names like "timm:vit_b.augreg" do.
    return name.replace(".", "_")


def _enable_sdpa(model: nn.Module) -> None:
    """Force timm's fused (SDPA) attention even if TIMM_FUSED_ATTN disabled it globally."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True


def _create_backbone(cfg: StudentConfig) -> nn.Module:
    weights = cfg.backbone_weights
    arch, pretrained = cfg.arch, False
    if weights is not None and (weights == "timm" or weights.startswith("timm:")):
        pretrained = True
        tag = weights.partition(":")[2]
        arch = f"{cfg.arch}.{tag}" if tag else cfg.arch
    kwargs = {"img_size": cfg.img_size, "dynamic_img_size": True, "num_classes": 0}
    kwargs.update(cfg.model_kwargs)
    model = _timm_backbone(arch, pretrained, kwargs)
    depth = len(model.blocks)
    if not all(0 <= i < depth for i in cfg.layers):
        raise StudentConfigError(
            f"student.layers {cfg.layers} out of range for {cfg.arch} with {depth} blocks"
        )
    _enable_sdpa(model)
    _use_dinov2_pos_embed(model)
    if weights is not None and not pretrained:
        load_backbone_weights(model, weights)
    return model


def _use_dinov2_pos_embed(model: nn.Module) -> None:
    """Route the backbone's position step through :func:`dinov2_pos_embed` (instance only)."""
    if getattr(model, "pos_embed", None) is None or not getattr(model, "dynamic_img_size", False):
        return  # RoPE / fixed-size models have no learned grid to resample
    use_dinov2_pos_embed(model)


def _timm_backbone(arch: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs)
    with hub_access() as offline:
        try:
            return timm.create_model(arch, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as err:
            where = f"the model hub is unreachable ({offline})" if offline else "download failed"
            raise BackboneWeightsError(
                f"--pretrained timm: cannot fetch timm's {arch} weights: {where} "
                f"[{type(err).__name__}: {str(err)[:200]}]. Download a DINOv2 checkpoint where "
                "the hub is reachable and pass the file with --pretrained PATH"
            ) from err


def _tokens_resize(
    tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], **interp: Any
) -> torch.Tensor:
    """Bilinearly resize ``[B, h*w, C]`` tokens on an ``src`` grid to a ``dst`` grid."""
    b, _, c = tokens.shape
    grid = tokens.view(b, src[0], src[1], c).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=dst, mode="bilinear", **interp)
    return out.permute(0, 2, 3, 1).reshape(b, dst[0] * dst[1], c)


class Student(nn.Module):
    """DINOv2 ViT + DPT head with RS-MTDF translators and fusion.

    Args:
        cfg: Architecture config.
    """

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = _create_backbone(cfg)
        self.patch_size = int(self.backbone.patch_embed.patch_size[0])
        if cfg.clip_size % self.patch_size:
            raise StudentConfigError(
                f"student.clip_size={cfg.clip_size} must be a multiple of the patch size "
                f"{self.patch_size}"
            )
        dim = int(self.backbone.embed_dim)
        self.head = DPTHead(dim, cfg.num_classes, cfg.features, cfg.out_channels)
        self.translators = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        for t in cfg.teachers:
            key = _module_key(t.name)
            self.translators[key] = nn.Sequential(
                nn.Linear(dim, cfg.translator_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(cfg.translator_hidden, t.channels),
            )
            self.projections[key] = nn.Linear(t.channels, dim)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    @property
    def clip_grid(self) -> int:
        """Token grid side of the "clip224" branch (16 at 224)."""
        return self.cfg.clip_size // self.patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone blocks in backward (timm activation checkpointing)."""
        self.backbone.set_grad_checkpointing(enable)

    def translator(self, name: str) -> nn.Module:
        """Translator MLP of teacher ``name``."""
        return self.translators[_module_key(name)]

    def projection(self, name: str) -> nn.Module:
        """Back-projection of teacher ``name`` into the student width."""
        return self.projections[_module_key(name)]

    def _levels(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        # NLC keeps tokens contiguous for the translators; prefix (CLS) tokens are dropped.
        return self.backbone.forward_intermediates(
            x,
            indices=indices,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            stop_early=True,
        )

    def _clip_tokens(self, x: torch.Tensor, s: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Deepest tokens ``[B, g*g, D]`` of the ``clip_size`` branch."""
        g = self.clip_grid
        if self.cfg.clip_from_full:
            return _tokens_resize(s, grid, (g, g), align_corners=False, antialias=True)
        size = (self.cfg.clip_size, self.cfg.clip_size)
        # Official: bilinear, align_corners=True, no antialias, on the normalised tensor.
        x224 = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self._levels(x224, [self.cfg.layers[-1]])[0]

    def _fuse(
        self, x: torch.Tensor, s: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fused deepest level ``[B, h*w, D]`` and translated tokens per teacher (NHWC)."""
        b = s.shape[0]
        g = self.clip_grid
        s_clip: torch.Tensor | None = None
        acc: torch.Tensor | None = None
        translated: dict[str, torch.Tensor] = {}
        for t in self.cfg.teachers:
            if t.branch == "full":
                tr = self.translator(t.name)(s)
                back = self.projection(t.name)(tr)
                translated[t.name] = tr.view(b, grid[0], grid[1], t.channels)
            else:
                if s_clip is None:
                    s_clip = self._clip_tokens(x, s, grid)
                tr = self.translator(t.name)(s_clip)
                translated[t.name] = tr.view(b, g, g, t.channels)
                # P is affine and bilinear weights sum to 1, so P(resize(c)) == resize(P(c));
                # projecting the 16x16 map first is ~5x cheaper than the official order.
                back = _tokens_resize(self.projection(t.name)(tr), (g, g), grid, align_corners=True)
            acc = back if acc is None else acc + back
        if acc is None:  # no teachers: plain DPT (the FixMatch baseline)
            return s, translated
        return self.cfg.fusion_self * s + self.cfg.fusion_teacher * acc, translated

    def forward(self, x: torch.Tensor, need_translated: bool = True) -> StudentOutput:
        """Segment ``x`` (ImageNet-normalised ``[B, 3, H, W]``, H and W multiples of the patch).

        Args:
            x: Input batch.
            need_translated: Return the translated tokens (the fusion is computed either way).

        Returns:
            Logits at the input size and, if requested, translated tokens per teacher.
        """
        b, _, h_px, w_px = x.shape
        p = self.patch_size
        if h_px % p or w_px % p:
            raise ValueError(
                f"student input {h_px}x{w_px} is not a multiple of the patch size {p}; resize "
                "to the nearest multiple (e.g. 512 -> 518) before calling the model"
            )
        grid = (h_px // p, w_px // p)
        levels = self._levels(x, list(self.cfg.layers))
        fused, translated = self._fuse(x, levels[-1], grid)
        levels[-1] = fused
        dim = fused.shape[-1]
        # NHWC-strided NCHW views: no copy, convolutions accept channels-last memory.
        feats = [lvl.view(b, grid[0], grid[1], dim).permute(0, 3, 1, 2) for lvl in levels]
        logits = self.head(feats, (h_px, w_px))
        return StudentOutput(logits, translated if need_translated else {})


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DDP wrapper
    return inner if isinstance(inner, nn.Module) else model


def param_groups(
    model: nn.Module, lr: float, lr_multi: float, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups as in the official code: backbone at ``lr``, the rest at ``lr * lr_multi``.

    Weight decay applies to every parameter (official). Each group carries ``base_lr`` for the
    poly schedule.
    """
    backbone, rest = [], []
    for name, param in _unwrap(model).named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(param)
    return [
        {
            "params": backbone,
            "lr": lr,
            "base_lr": lr,
            "weight_decay": weight_decay,
            "name": "backbone",
        },
        {
            "params": rest,
            "lr": lr * lr_multi,
            "base_lr": lr * lr_multi,
            "weight_decay": weight_decay,
            "name": "head",
        },
    ]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``--pretrained`` file as tensors only (safetensors, or torch.load weights_only)."""
    try:
        obj = _read_tensors(path)
    except BackboneWeightsError:
        raise
    except OSError as err:
        raise BackboneWeightsError(
            f"cannot read --pretrained {path}: {err.strerror or err}; check the path and its "
            "permissions"
        ) from err
    except Exception as err:  # noqa: BLE001 - torch.load and safetensors raise many types
        raise BackboneWeightsError(
            f"cannot read --pretrained {path}: {str(err)[:300]}. It may be truncated or not a "
            "weights file: download it again, or save plain tensors with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from err
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneWeightsError(
            f"--pretrained {path} holds no state dict (looked at the top level and under "
            "'model' / 'state_dict'); save one with torch.save(model.state_dict(), path)"
        )
    return obj


def _read_tensors(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        # torch.load(weights_only=True) refuses these too, but with a message about torch.load
        raise BackboneWeightsError(
            f"--pretrained {path} is a TorchScript archive; featcache reads weights as plain "
            "tensors only, because loading TorchScript runs the code inside the file. Export a "
            "state dict where you trust the file: model = torch.jit.load(path); "
            "torch.save(model.state_dict(), 'weights.pth'), and pass --pretrained weights.pth"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # not a zip: torch.load says what it is
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a whole segmentation checkpoint
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load ViT weights (DINOv2 or timm layout) into ``model`` (a Student or its backbone).

    Raises:
        BackboneWeightsError: The file is missing or its keys/shapes do not match the backbone.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    backbone = _unwrap(model)
    backbone = getattr(backbone, "backbone", backbone)
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(
            f"backbone weights {path} not found; pass --pretrained PATH with an existing "
            "DINOv2 .pth/.safetensors file, --pretrained timm (needs the hub), or "
            "--random-weights for random init"
        )
    sd = checkpoint_filter_fn(_strip_prefixes(_read_state_dict(path)), backbone)
    try:
        result = backbone.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise BackboneWeightsError(
            f"backbone weights {path} do not fit {type(backbone).__name__} "
            f"(embed_dim={backbone.embed_dim}, depth={len(backbone.blocks)}): {err}. "
            "Check student.arch matches the checkpoint (e.g. ViT-S/14 for dinov2_vits14)"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise BackboneWeightsError(
            f"backbone weights {path} do not match student.arch: missing "
            f"{_head(result.missing_keys)}, unexpected {_head(result.unexpected_keys)}. "
            "Use the original DINOv2 checkpoint of the same size or a timm state dict"
        )


def _head(keys: list[str], n: int = 6) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return f"{keys[:n]}{more}"
