"""Class text embeddings for Co2S: the CLIP ViT-B/16 text tower on concept prompts.

Co2S (design/co2s-reference.md §1.4) embeds ``"a photo of a {concept}"`` with OpenAI's CLIP
ViT-B/16 text tower and keeps three matrices per dataset: the class names alone (``single``),
every concept (``concepts``) and the concept average (``conceptavg`` = L2-normalise of the mean
of the *unnormalised* concept embeddings; the one its training uses). ``run_text`` computes them
for a store's classes and writes them into the store (``featstore.text``), so training needs no
text tower.

The tower is open_clip's ``ViT-B-16`` text transformer with QuickGELU (the activation OpenAI's
weights were trained with), its tokenizer (OpenAI's BPE, lower-cased, 77 tokens), loaded from a
local file. Weights follow the teachers' policy (``pipelines.teachers.weights``): the file's
sha256 is recorded, TorchScript archives are refused, and random init happens only when asked
for (``random_weights``, or ``tiny`` for the small test tower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from featstore.constants import CO2S_PROMPT_TEMPLATE
from featstore.errors import FeatcacheError
from featstore.text import (
    TextEmbeddings,
    TextInputs,
    text_is_current,
    write_text_embeddings,
)
from pipelines.concepts import ConceptList, builtin_concepts, resolve_concepts
from pipelines.teachers.weights import (
    RandomWeightsRefusedError,
    WeightsError,
    WeightsSource,
    _is_torchscript,
    load_strict,
    read_state_dict,
    resolve_weights,
    torchscript_refused,
)

ARCH = "ViT-B-16"
TEMPLATE = CO2S_PROMPT_TEMPLATE
# The tiny test tower keeps the real context and vocabulary, so the real tokenizer feeds it.
TINY_TEXT = {"width": 32, "layers": 2, "heads": 2}
TINY_EMBED_DIM = 16
RANDOM_SEED = 0
# Entries of full CLIP checkpoints that are not text-tower weights (OpenAI's JIT state dict
# carries the three metadata entries; open_clip's has logit_scale).
NON_TEXT_KEYS = ("logit_scale", "input_resolution", "context_length", "vocab_size")
PROMPTS_PER_BATCH = 64


class TextOptionError(FeatcacheError, ValueError):
    """``featcache text`` options that do not fit the store or each other."""


@dataclass(frozen=True)
class TextConfig:
    """What ``featcache text`` computes and where it writes.

    Attributes:
        store: The store (path or URL) that receives the ``text/`` group.
        classes: None (the store's class table), a shipped dataset name, ``A,B,...`` or a file
            of names; when the store records classes they must be the same, in order.
        concepts: ``builtin`` (the shipped list of the store's dataset), a shipped list name,
            ``names`` (each class's name only) or a JSON/YAML file.
        weights: Local CLIP ViT-B/16 checkpoint (open_clip or OpenAI state dict); None: random
            init, refused unless ``random_weights`` or ``tiny``.
        random_weights: Accept a random full-size tower (smoke runs).
        tiny: The small random text tower (tests); with ``weights``, a file of that tower.
        device: Torch device of the tower.
        overwrite: Replace a text group made from other inputs.
    """

    store: str
    classes: str | None = None
    concepts: str = "builtin"
    weights: str | None = None
    random_weights: bool = False
    tiny: bool = False
    device: str = "cpu"
    overwrite: bool = False


@dataclass(frozen=True)
class TextResult:
    """Outcome of ``run_text``: ``written`` is False when the store already held these inputs."""

    store: str
    written: bool
    inputs: TextInputs
    concepts_source: str


def model_id(tiny: bool) -> str:
    """The tower's id as recorded in the store."""
    base = f"open_clip {ARCH} text tower, QuickGELU, fp32"
    if not tiny:
        return base
    dims = ", ".join(f"{k} {v}" for k, v in TINY_TEXT.items())
    return f"{base}, TINY random test tower ({dims}, embed_dim {TINY_EMBED_DIM})"


def tokenizer_id() -> str:
    """The tokenizer's id as recorded in the store."""
    return f"open_clip.get_tokenizer({ARCH!r}): OpenAI CLIP BPE, lower-cased, context 77"


def weights_id(source: WeightsSource) -> str:
    """sha256 of the weights file, or ``random:seed<N>`` (random init is seeded)."""
    return source.sha256 if source.kind == "file" and source.sha256 else f"random:seed{RANDOM_SEED}"


def _text_cfg(tiny: bool) -> tuple[int, dict[str, Any]]:
    import open_clip

    cfg = open_clip.get_model_config(ARCH)
    text_cfg = dict(cfg["text_cfg"])
    if tiny:
        return TINY_EMBED_DIM, {**text_cfg, **TINY_TEXT}
    return int(cfg["embed_dim"]), text_cfg


def _text_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A full CLIP checkpoint holds the text tower at the top level beside visual.*; a
    # CustomTextCLIP one nests it under text.
    if any(k.startswith("text.") for k in state_dict):
        return {k[len("text.") :]: v for k, v in state_dict.items() if k.startswith("text.")}
    return {
        k: v
        for k, v in state_dict.items()
        if not k.startswith("visual.") and k not in NON_TEXT_KEYS
    }


def weights_source(cfg: TextConfig) -> WeightsSource:
    """Resolve ``--weights``, refusing a silent random tower and pretrained tags.

    Raises:
        RandomWeightsRefusedError: no weights, and neither ``random_weights`` nor ``tiny``.
        WeightsError: a missing file, a TorchScript archive, or a tag.
    """
    source = resolve_weights(cfg.weights)
    if source.kind == "tag":
        raise WeightsError(
            f"--weights {cfg.weights!r} is not a file; featcache text reads a local CLIP "
            f"{ARCH} checkpoint (open_clip's open_clip_pytorch_model.bin / .safetensors of the "
            "OpenAI weights, or an OpenAI state dict): download it where the hub is reachable "
            "and pass its path"
        )
    if source.kind == "file" and _is_torchscript(source.path):
        raise WeightsError(torchscript_refused(source.path, "--weights PATH"))
    if source.kind == "random" and not (cfg.random_weights or cfg.tiny):
        raise RandomWeightsRefusedError(
            f"no --weights given: the CLIP {ARCH} text tower would run with random "
            "initialisation, which gives meaningless class embeddings. Pass --weights PATH (a "
            "local OpenAI CLIP ViT-B/16 checkpoint), or --random-weights to accept random init "
            "(smoke runs), or --tiny for the tiny random test tower"
        )
    return source


def build_text_tower(source: WeightsSource, tiny: bool) -> nn.Module:
    """open_clip's ``TextTransformer`` of ``ViT-B-16`` (QuickGELU), eval, with ``source`` loaded.

    Random init (``source.kind == "random"``) is seeded, so it is reproducible.

    Raises:
        WeightsMismatchError: the file does not hold this tower's weights.
    """
    from open_clip.model import _build_text_tower  # no public text-only builder exists

    embed_dim, text_cfg = _text_cfg(tiny)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        tower = _build_text_tower(embed_dim, text_cfg, quick_gelu=True)
    if source.kind == "file":
        state = _text_state(read_state_dict(source.path))
        load_strict(tower, state, f"file {source.value}")
    return tower.eval().requires_grad_(False)


def encode_prompts(tower: nn.Module, prompts: list[str], device: str) -> torch.Tensor:
    """float32 ``[len(prompts), D]`` text embeddings, not normalised (CPU)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(ARCH)
    tower = tower.to(device)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), PROMPTS_PER_BATCH):
            tokens = tokenizer(prompts[start : start + PROMPTS_PER_BATCH]).to(device)
            out.append(tower(tokens).float().cpu())
    return torch.cat(out)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def compute_text_embeddings(
    tower: nn.Module, inputs: TextInputs, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(single [K, D], concepts [sum C_k, D], conceptavg [K, D]), float32, rows L2-normalised."""
    single = _normalise(encode_prompts(tower, inputs.prompts("single"), device))
    raw = encode_prompts(tower, inputs.prompts("concepts"), device)
    owner = torch.from_numpy(inputs.concept_class()).long()
    # Mean of the *unnormalised* concept embeddings of each class, then normalised (official).
    sums = torch.zeros(len(inputs.class_names), raw.shape[1]).index_add_(0, owner, raw)
    counts = torch.bincount(owner, minlength=len(inputs.class_names)).unsqueeze(1)
    avg = _normalise(sums / counts)
    return single.numpy(), _normalise(raw).numpy(), avg.numpy()


def resolve_classes(
    spec: str | None, store_classes: tuple[str, ...], store: str
) -> tuple[str, ...]:
    """The classes to embed: the store's table, checked against ``--classes`` when given.

    Raises:
        TextOptionError: the store has no class table and no ``--classes``, or they differ.
    """
    if spec is None:
        if not store_classes:
            raise TextOptionError(
                f"store {store!r} records no class names; pass --classes NAME,NAME,... (or a "
                "file, one name per line, or a dataset name such as loveda) in label order"
            )
        return store_classes
    given = _named_classes(spec)
    if store_classes and given != store_classes:
        raise TextOptionError(
            f"--classes {spec!r} gives {list(given)} but store {store!r} has classes "
            f"{list(store_classes)} (label order); the embeddings must follow the store's class "
            "table: drop --classes"
        )
    return given


def _named_classes(spec: str) -> tuple[str, ...]:
    from pipelines.concepts import BUILTIN_FILES
    from pipelines.sources.labels import read_class_names

    if spec in BUILTIN_FILES:
        return builtin_concepts(spec).class_names
    return read_class_names(spec)


def text_inputs(
    class_names: tuple[str, ...], concepts: ConceptList, source: WeightsSource, tiny: bool
) -> TextInputs:
    """The inputs record of one computation."""
    return TextInputs(
        class_names=class_names,
        concepts=concepts.concepts,
        template=TEMPLATE,
        model=model_id(tiny),
        weights_sha256=weights_id(source),
        tokenizer=tokenizer_id(),
    )


def run_text(cfg: TextConfig) -> TextResult:
    """Compute the class text embeddings of ``cfg.store``'s classes and write them into it.

    A store already holding embeddings of the same inputs is left as it is (no tower is built);
    other inputs are refused unless ``cfg.overwrite``.
    """
    from featstore.reader import open_store

    schema = open_store(cfg.store).schema
    class_names = resolve_classes(cfg.classes, schema.class_names, cfg.store)
    concepts = resolve_concepts(cfg.concepts, schema.dataset, class_names)
    concepts.check_classes(class_names, cfg.store)
    source = weights_source(cfg)
    inputs = text_inputs(class_names, concepts, source, cfg.tiny)
    if text_is_current(cfg.store, inputs, cfg.overwrite):
        return TextResult(cfg.store, False, inputs, concepts.source)
    tower = build_text_tower(source, cfg.tiny)
    single, every, avg = compute_text_embeddings(tower, inputs, cfg.device)
    provenance = {
        "weights": source.value,
        "concepts_source": concepts.source,
        "device": str(cfg.device),
        "torch": torch.__version__,
        "open_clip": _open_clip_version(),
    }
    emb = TextEmbeddings(inputs, single, every, avg, provenance)
    written = write_text_embeddings(cfg.store, emb, overwrite=cfg.overwrite)
    return TextResult(cfg.store, written, inputs, concepts.source)


def _open_clip_version() -> str:
    import open_clip

    return str(getattr(open_clip, "__version__", "unknown"))


__all__ = [
    "ARCH",
    "TEMPLATE",
    "TextConfig",
    "TextOptionError",
    "TextResult",
    "build_text_tower",
    "compute_text_embeddings",
    "encode_prompts",
    "model_id",
    "resolve_classes",
    "run_text",
    "text_inputs",
    "tokenizer_id",
    "weights_source",
]
