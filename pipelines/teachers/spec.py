"""Spec builder: the fields every teacher factory fills the same way, filled once.

A factory builds its network, records how in a :class:`NetBuild` (architecture, weights, tiny
overrides) and states only what its tap point makes different: input size, stride, channels,
layer, prefix tokens, final norm and any extra pairs. :func:`teacher_spec` adds the provenance
fields (family, arch text, weights, sha256, the ``tiny`` and ``weights_load`` extra pairs) and
the project's defaults (bilinear antialiased resize, ImageNet statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from featstore.constants import IMAGENET_MEAN, IMAGENET_STD
from featstore.schema import ResizeSpec, TeacherSpec
from pipelines.teachers.weights import WeightsSource

# timm's (and the official RS-MTDF DINOv2 path's) resize; CLIP's "rsmtdf" preprocess differs.
DEFAULT_RESIZE = ResizeSpec(mode="bilinear", antialias=True, align_corners=False)


def tiny_arch(arch: str, overrides: Mapping[str, Any]) -> str:
    """Architecture text of a tiny variant, so tiny specs never fingerprint like real ones."""
    body = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{arch}[tiny:{body}]"


def base_extra(source: WeightsSource, how: str, tiny: bool, **more: str) -> tuple:
    """Common ``extra`` pairs: tiny flag and weight loading mode."""
    pairs = {"tiny": "1" if tiny else "0", "weights_load": how, **more}
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True)
class NetBuild:
    """How a teacher's network was made: the provenance half of its spec.

    Attributes:
        arch: Library architecture name (timm model, open_clip config).
        source: The resolved ``weights`` argument.
        how: How the weights were loaded (``spec.extra["weights_load"]``).
        tiny: Built as the tiny test variant.
        overrides: Architecture overrides of the tiny variant (empty: the real architecture).
        family: Library family of the spec.
        part: Suffix naming the sub-network used (``".visual"``: CLIP's image tower).
    """

    arch: str
    source: WeightsSource
    how: str
    tiny: bool
    overrides: Mapping[str, Any] = field(default_factory=dict)
    family: str = "timm"
    part: str = ""

    @property
    def arch_text(self) -> str:
        """``spec.arch``: tiny variants carry their overrides in the text."""
        arch = tiny_arch(self.arch, self.overrides) if self.overrides else self.arch
        return arch + self.part


def teacher_spec(
    net: NetBuild, name: str, extra: Mapping[str, str] | None = None, **fields: Any
) -> TeacherSpec:
    """The :class:`TeacherSpec` of a teacher built as ``net``.

    Args:
        net: How the network was built (fills family, arch, weights, sha256 and the ``tiny`` /
            ``weights_load`` extra pairs).
        name: Spec name (the store's key of the teacher).
        extra: Factory-specific extra pairs, added to the common ones.
        **fields: The remaining :class:`TeacherSpec` fields (``input_size``, ``stride``,
            ``channels``, ``layer``, ``prefix_tokens_dropped``, ``final_norm``; ``resize``,
            ``mean`` and ``std`` default to bilinear antialias and ImageNet statistics).
    """
    defaults = {"resize": DEFAULT_RESIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return TeacherSpec(
        name=name,
        family=net.family,
        arch=net.arch_text,
        weights=net.source.value,
        weights_sha256=net.source.sha256,
        extra=base_extra(net.source, net.how, net.tiny, **(extra or {})),
        **{**defaults, **fields},
    )
