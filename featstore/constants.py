"""The one home of the numbers every layer shares (torch-free, import-free).

featstore is the bottom layer, so pipelines, trainer and the CLI can all import these without
an upward import. Each value used to be written out in several modules; a value changed in one
place and not the others would silently split the contract (e.g. a teacher normalising with one
mean and the student with another). ``trainer.presets.OFFICIAL`` keeps its own record of the
official values on purpose: it states what the paper used, not what our defaults are.
"""

from __future__ import annotations

# ImageNet statistics of [0, 1] RGB pixels: the student's input normalisation, and the teachers'
# (DINOv2, SAM, and CLIP as RS-MTDF feeds it).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# OpenAI CLIP's own statistics (``clip_vitl14`` with ``preprocess="openai"``).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# ViT-S/B/L-14 patch side: crops and eval sizes are multiples of it.
PATCH_SIZE = 14

# Canvas side of a scale-1 tile, the training crop and the native DINOv2 input (37 x 37 tokens):
# RS-MTDF's crop size. Extraction's base size and the trainer's crop must agree.
DEFAULT_CROP = 518

# RS-MTDF's random rescale range of a tile's side (official ``ratio_range``).
SCALE_RANGE: tuple[float, float] = (0.5, 2.0)

# Quarter-octave steps (2**(k/4), two decimals) over SCALE_RANGE: no view is more than
# 2**0.125 = 1.09x in zoom from a cached level, and the trainer's scale blend mixes 2-4
# neighbouring levels. Measured against the previous half-octave default (5 scales) in
# BENCHMARKS.md section 6: needed to reach 0.85 cosine with the online teacher.
MULTI_SCALES: tuple[float, ...] = (0.5, 0.59, 0.71, 0.84, 1.0, 1.19, 1.41, 1.68, 2.0)

# Mask value of ignored pixels (mmseg's convention; uint8 masks).
IGNORE_INDEX = 255

# The default codec of cached grids: per-channel int8, the knee of the measured bytes-vs-cosine
# frontier (BENCHMARKS.md §6: half of fp16's bytes at a cosine change of 3e-5 on the real Lite0).
DEFAULT_CODEC = "int8"

# Co2S's class prompts: one template, no ensemble (official model/text_embeddings.py), and the
# text variant its training reads (official builder: the concept average, whatever the config
# says). `featcache text` writes every variant; `featstore.text` reads them.
CO2S_PROMPT_TEMPLATE = "a photo of a {concept}"
CO2S_TEXT_VARIANT = "conceptavg"

__all__ = [
    "CO2S_PROMPT_TEMPLATE",
    "CO2S_TEXT_VARIANT",
    "DEFAULT_CODEC",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_CROP",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MULTI_SCALES",
    "PATCH_SIZE",
    "SCALE_RANGE",
]
