"""Storage planner (`featcache plan`): bytes per tile against fidelity, on a sample of the data.

1. Extract a small sample of tiles with the largest candidate level set (``MULTI_SCALES`` +
   flip) in fp16, into a temporary store.
2. Measure every candidate configuration (level set x scale blend x codec) with one audit
   per teacher (``featcache.audit.audit_store(codecs=...)``): the mean token cosine between the
   candidate's cached target and the teacher run on random RS-MTDF views (at the audit's
   teacher grid). A candidate's cached grids are the sample store's stored tokens of its levels
   re-encoded with its codec and decoded on the device as training decodes them
   (``featcache.audit_reads.ReencodedReads``), read through the trainer's ``warp`` source; the
   teacher runs once per view for all candidates. Fit/score split: a PCA basis is fitted as
   extraction fits it (scale-1 tokens, at most ``PCA_MAX_TOKENS`` evenly spaced) on the first
   half of the sample tiles, and the audit draws its views only from the other half, so no
   basis is scored on the tiles it was fitted on (one sample tile: it serves both, stated in
   the meta).
   For comparison the old *estimate (product rule)* is kept beside it: cache cosine (the same
   audit under fp16, which re-encodes the fp16 sample exactly) x codec round-trip cosine on the
   held-out tiles' stored tokens of the candidate's levels. Both are means over teachers
   (each teacher weighs the same); the outputs report how far they differ.
3. Bytes per tile from the sample store's stored shapes: per teacher and level,
   ``grid**2 x stored_channels x itemsize(stored_dtype)`` plus the codec's float32 side data
   (``aux_shape``), summed over the levels and teachers (the PCA basis, stored once per
   teacher, is left out).
4. The frontier (no other configuration has fewer or equal bytes and a higher or equal cosine,
   one of them strictly) as a markdown table, a PNG and a JSON; the best configuration under the
   budget (highest cosine, ties: fewer bytes) as an extraction config YAML for
   ``featcache extract --config``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featstore.constants import MULTI_SCALES
from featstore.errors import FeatcacheError

# Candidate level sets: label -> (scales, flip). Subsets of the default quarter-octave levels:
# every other one is the half-octave set, every fourth the octave set.
LEVEL_SETS: dict[str, tuple[tuple[float, ...], bool]] = {
    "9 scales + flip": (MULTI_SCALES, True),
    "5 scales + flip": (MULTI_SCALES[::2], True),
    "3 scales + flip": (MULTI_SCALES[::4], True),
    "scale 1 only": ((1.0,), False),
}
DEFAULT_PCA_KS = (64, 128, 256)
AUX_ITEMSIZE = 4  # codecs' side data (int8 scale and offset) are float32 (featstore.codecs)
RULE = (
    "measured cosine = mean over teachers of the audit's mean token cosine between the "
    "candidate's cached target (sample tokens of its levels re-encoded with its codec, decoded "
    "on the device; PCA fitted on the other sample tiles) and the teacher run on random views "
    "of the held-out sample tiles"
)
ESTIMATE_RULE = (
    "estimate (product rule) = mean over teachers of (cache cosine, the same audit under fp16 x "
    "codec round-trip cosine on the held-out tiles' stored tokens); kept for comparison"
)
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


class PlanError(FeatcacheError, ValueError):
    """The planner cannot plan or nothing fits; the message names the option and the fix."""


def default_blend() -> float:
    """The trainer's default scale blend (``distill.scale_blend``): the blended candidates'."""
    from trainer.config import DistillConfig

    return float(DistillConfig().scale_blend)


def parse_budget(text: str) -> int:
    """Bytes of ``8MiB`` / ``512KiB`` / ``1.5GiB`` / ``4096B`` (binary units only)."""
    m = _BUDGET_RE.match(str(text))
    unit = m.group(2) if m else ""
    if not m or unit not in _UNITS:
        why = (
            f"unit {unit!r} is ambiguous or unknown (1 MB = 10**6 or 2**20?)"
            if m and unit
            else "write a number with a unit"
        )
        raise PlanError(
            f"--budget {text!r}: {why}; write bytes per tile with B, KiB, MiB or GiB, "
            "e.g. --budget 8MiB"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise PlanError(f"--budget {text!r} is zero; give a positive size, e.g. --budget 8MiB")
    return value


def parse_pca_ks(text: str) -> tuple[int, ...]:
    """``64,128`` -> (64, 128): the PCA sizes k of the pca-int8 candidates (``--pca-k``)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise PlanError(f"--pca-k {text!r}: write positive integers, e.g. --pca-k 64,128,256")
    return tuple(sorted({int(p) for p in parts}))


@dataclass
class Candidate:
    """One storage configuration and what it costs and keeps."""

    level_set: str
    scales: tuple[float, ...]
    flip: bool
    blend: float
    codec: dict[str, Any]
    bytes_per_tile: int = 0
    cache_cosine: float = float("nan")
    codec_cosine: float = float("nan")
    cosine: float = float("nan")  # measured (RULE)
    estimate: float = float("nan")  # product rule (ESTIMATE_RULE)
    on_frontier: bool = False
    per_teacher: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def codec_text(self) -> str:
        """The codec as ``--codec`` writes it (``pca-int8:64``)."""
        return codec_text(self.codec)

    @property
    def label(self) -> str:
        return f"{self.level_set}, blend {self.blend:g}, {self.codec_text}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label"] = self.label
        return d


def codec_text(codec: dict[str, Any]) -> str:
    """A codec as ``--codec`` writes it (``pca-int8:64``): the candidates' codec label."""
    extra = [str(v) for k, v in codec.items() if k != "name"]
    return ":".join([codec["name"], *extra])


def level_keys(scales: tuple[float, ...], flip: bool) -> list[str]:
    """Store level keys of a level set (``s1.00``, ``s1.00f``, ...), as extraction names them."""
    from pipelines.shards import level_specs

    return [lv.key for lv in level_specs(scales, flip)]


def codec_candidates(ks: tuple[int, ...], channels: int) -> list[dict[str, Any]]:
    """fp16, int8, and pca-int8:k for each k <= ``channels`` (the smallest teacher's)."""
    return [{"name": "fp16"}, {"name": "int8"}] + [
        {"name": "pca-int8", "k": k} for k in ks if k <= channels
    ]


def level_bytes(grid: int, channels: int, codec: dict[str, Any]) -> int:
    """Stored bytes of one tile's level: ``grid x grid`` tokens through ``codec``, plus aux."""
    from featstore import get_codec

    c = get_codec(codec)
    data = grid * grid * c.stored_channels(channels) * np.dtype(c.stored_dtype).itemsize
    aux = c.aux_shape(channels)
    return int(data + (int(np.prod(aux)) * AUX_ITEMSIZE if aux else 0))


def tile_bytes(store: Any, keys: list[str], codec: dict[str, Any]) -> int:
    """Bytes per tile of ``keys`` through ``codec``, all of the store's teachers summed."""
    total = 0
    for entry in store.schema.teachers:
        name, channels = entry.spec.name, entry.spec.channels
        for key in keys:
            total += level_bytes(store.level_geometry(name, key).grid, channels, codec)
    return total


# ----------------------------------------------------------------------------- fidelity


def _token_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-token cosine of ``[..., C]`` arrays (float64; 0 where either token is all zero)."""
    a = x.reshape(-1, x.shape[-1]).astype(np.float64)
    b = y.reshape(-1, y.shape[-1]).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-12)


def split_sample(tiles: int) -> tuple[list[int], list[int]]:
    """(fit tiles, scored tiles): first half / second half; one tile serves both."""
    if tiles < 2:
        return [0], [0]
    half = tiles // 2
    return list(range(half)), list(range(half, tiles))


def fit_codec(store: Any, name: str, codec: Any, fit: list[int], fit_key: str = "s1.00") -> Any:
    """``codec`` (a spec or a codec) ready to encode teacher ``name``: a PCA basis is fitted as
    extraction fits it, on the ``fit`` tiles' ``fit_key`` (scale-1) tokens, at most
    ``PCA_MAX_TOKENS`` of them evenly spaced (``pipelines.extract.pca_samples``)."""
    from featstore import get_codec
    from pipelines.extract import PCA_MAX_TOKENS

    c = get_codec(codec)
    if c.needs_fit and getattr(c, "basis", None) is None:
        tokens = np.concatenate([store.read(name, i, fit_key) for i in fit])
        tokens = tokens.reshape(-1, tokens.shape[-1])
        step = max(1, -(-len(tokens) // PCA_MAX_TOKENS))
        c.fit(tokens[::step])
    return c


def fit_codecs(store: Any, name: str, codecs: list[dict[str, Any]]) -> dict[str, Any]:
    """Codec label (``codec_text``) -> codec of teacher ``name``, fitted on the fit tiles."""
    fit, _ = split_sample(int(store.done().sum()))
    return {codec_text(c): fit_codec(store, name, c, fit) for c in codecs}


def codec_level_cosines(
    store: Any, name: str, codec: Any, keys: list[str]
) -> dict[str, tuple[float, int]]:
    """Per level key: (sum of token cosines, tokens) of ``codec``'s round trip of the sample's
    held-out tiles (the product rule's codec factor); an unfitted PCA codec is fitted first on
    the fit tiles' scale-1 tokens (``fit_codec``)."""
    fit, scored = split_sample(int(store.done().sum()))
    c = fit_codec(store, name, codec, fit, "s1.00" if "s1.00" in keys else keys[0])
    out = {}
    for key in keys:
        x = np.stack([store.read(name, i, key) for i in scored])
        data, aux = c.encode(x)
        cos = _token_cosines(x, np.asarray(c.decode(data, aux), np.float32))
        out[key] = (float(cos.sum()), int(cos.size))
    return out


def codec_cosine(stats: dict[str, tuple[float, int]], keys: list[str]) -> float:
    """Token-weighted mean codec cosine over the levels ``keys`` (from ``codec_level_cosines``)."""
    total = sum(stats[k][0] for k in keys)
    tokens = sum(stats[k][1] for k in keys)
    return total / tokens if tokens else float("nan")


Measured = dict[tuple[str, float, str], float]  # (level set, blend, codec label) -> cosine


def audit_cosines(
    store_url: str,
    name: str,
    cfg: Any,
    views: int,
    seed: int,
    blend: float,
    codecs: dict[str, Any],
    tiles: list[int],
) -> Measured:
    """Measured cosine per (level set, blend, codec) of teacher ``name`` (as typed; weights
    from ``cfg.weights``): one audit of every candidate set under every codec, views drawn from
    ``tiles``; with ``blend`` > 0 each multi-scale set is also read with its nearest level only
    (blend 0), so every candidate comes from the same views and one teacher pass per view."""
    from featcache.audit import NEAREST, audit_store, config_label

    sets = {label: level_keys(*spec) for label, spec in LEVEL_SETS.items()}
    result = audit_store(
        store_url,
        name,
        weights=cfg.weights.get(name),
        tiny=cfg.tiny,
        random_weights=cfg.random_weights,
        n_views=views,
        seed=seed,
        level_sets=sets,
        scale_blend=blend,
        ceiling=False,
        bank_views=0,
        identity_tiles=1,
        device=cfg.device,
        codecs=codecs,
        tiles=tiles,
    )
    row = result.row("all views", "overall").cosine
    out: Measured = {}
    for codec in codecs:
        for label, (scales, _) in LEVEL_SETS.items():
            out[(label, blend if len(scales) > 1 else 0.0, codec)] = row[config_label(label, codec)]
            if len(scales) > 1 and blend > 0:  # one scale: nothing to blend, blend 0 only
                out[(label, 0.0, codec)] = row[config_label(label + NEAREST, codec)]
    return out


# ----------------------------------------------------------------------------- candidates


def score_candidates(
    store: Any, measured: dict[str, Measured], codecs: dict[str, dict[str, Any]]
) -> list[Candidate]:
    """Every (level set, blend, codec) with its bytes per tile, measured cosine (``RULE``) and
    the product-rule estimate (``ESTIMATE_RULE``); ``codecs``: per teacher, label -> the fitted
    codec the audit used (the round trip uses the same basis)."""
    names = [e.spec.name for e in store.schema.teachers]
    all_keys = level_keys(*LEVEL_SETS["9 scales + flip"])
    configs = sorted({(label, blend) for label, blend, _ in measured[names[0]]})
    out = []
    for label_codec, codec in codecs[names[0]].items():
        stats = {n: codec_level_cosines(store, n, codecs[n][label_codec], all_keys) for n in names}
        for label, blend in configs:
            scales, flip = LEVEL_SETS[label]
            keys = level_keys(scales, flip)
            spec = codec.to_dict()
            cand = Candidate(label, scales, flip, blend, spec, tile_bytes(store, keys, spec))
            for n in names:
                cache, kc = measured[n][(label, blend, "fp16")], codec_cosine(stats[n], keys)
                cand.per_teacher[n] = {
                    "measured": measured[n][(label, blend, label_codec)],
                    "cache": cache,
                    "codec": kc,
                    "estimate": cache * kc,
                }
            for attr, key in (
                ("cosine", "measured"),
                ("estimate", "estimate"),
                ("cache_cosine", "cache"),
                ("codec_cosine", "codec"),
            ):
                setattr(cand, attr, float(np.mean([v[key] for v in cand.per_teacher.values()])))
            out.append(cand)
    return out


def estimate_gap(cands: list[Candidate]) -> dict[str, Any]:
    """How far the product rule is from the measurement: mean and largest |measured -
    estimate| over the candidates, and the largest signed difference (measured - estimate)."""
    diffs = np.array([c.cosine - c.estimate for c in cands], np.float64)
    if diffs.size == 0:
        return {"mean_abs": float("nan"), "max_abs": float("nan"), "max_signed": float("nan")}
    worst = int(np.abs(diffs).argmax())
    return {
        "mean_abs": float(np.abs(diffs).mean()),
        "max_abs": float(abs(diffs[worst])),
        "max_signed": float(diffs[worst]),
        "worst": cands[worst].label,
    }


def mark_frontier(cands: list[Candidate]) -> list[Candidate]:
    """Set ``on_frontier``: no other candidate has <= bytes and >= cosine, one strictly."""
    for c in cands:
        c.on_frontier = not any(
            o.bytes_per_tile <= c.bytes_per_tile
            and o.cosine >= c.cosine
            and (o.bytes_per_tile < c.bytes_per_tile or o.cosine > c.cosine)
            for o in cands
        )
    return cands


def choose(cands: list[Candidate], budget: int) -> Candidate | None:
    """Highest cosine with bytes <= ``budget``; ties: fewer bytes. None when nothing fits."""
    fits = [c for c in cands if c.bytes_per_tile <= budget]
    if not fits:
        return None
    return min(fits, key=lambda c: (-c.cosine, c.bytes_per_tile))


def refusal(cands: list[Candidate], budget: int) -> PlanError:
    """The error of a budget nothing fits: names the smallest configuration and its bytes."""
    small = min(cands, key=lambda c: (c.bytes_per_tile, -c.cosine))
    return PlanError(
        f"nothing fits --budget {budget} B ({budget / 2**20:.3f} MiB) per tile: the smallest "
        f"configuration, {small.label}, needs {small.bytes_per_tile} B "
        f"({small.bytes_per_tile / 2**20:.3f} MiB) per tile; raise --budget to at least "
        f"{small.bytes_per_tile}B"
    )


# ----------------------------------------------------------------------------- the plan


@dataclass
class PlanResult:
    """Every scored candidate (frontier marked), the budget and the chosen one (or None)."""

    candidates: list[Candidate]
    budget: int
    best: Candidate | None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "rule": RULE,
            "estimate_rule": ESTIMATE_RULE,
            "meta": self.meta,
            "best": None if self.best is None else self.best.label,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def sample_config(base: Any, tiles: int, out: str) -> Any:
    """``base`` (the user's source, teachers, sizes) as the sample extraction: the largest
    candidate level set, fp16, the first ``tiles`` tiles, one shard."""
    scales, flip = LEVEL_SETS["9 scales + flip"]
    return dataclasses.replace(
        base,
        out=out,
        scales=scales,
        flip=flip,
        codec={"name": "fp16"},
        limit=tiles,
        tiles_per_shard=tiles,
        store_pixels=True,  # the audit renders views from the stored pixels
        overwrite=False,
    ).validate()


def plan_storage(
    base: Any,
    budget: int,
    tiles: int = 8,
    views: int = 32,
    pca_ks: tuple[int, ...] = DEFAULT_PCA_KS,
    seed: int = 0,
    progress: bool = False,
) -> PlanResult:
    """Extract a sample of ``base.source``, measure every candidate, pick the best under
    ``budget`` bytes per tile (``best`` None when nothing fits: see ``refusal``)."""
    from featstore import open_store
    from pipelines.extract import run_extraction

    if tiles < 1 or views < 1:
        raise PlanError(f"--tiles ({tiles}) and --views ({views}) must be >= 1")
    with tempfile.TemporaryDirectory(prefix="featcache-plan-") as tmp:
        url = run_extraction(sample_config(base, tiles, str(Path(tmp) / "sample.zarr")), progress)
        store = open_store(url)
        names = [e.spec.name for e in store.schema.teachers]
        cands = mark_frontier(_measure(store, url, base, views, seed, pca_ks))
        n_tiles = int(store.done().sum())
    fit, scored = split_sample(n_tiles)
    meta = {
        "source": base.source,
        "teachers": names,
        "sample_tiles": n_tiles,
        "pca_fit_tiles": fit,
        "audit_view_tiles": scored,
        "fit_tiles_scored": fit == scored,  # one sample tile: the basis is scored where fitted
        "views": views,
        "seed": seed,
        "blends": sorted({c.blend for c in cands}),
        "tile_size": base.tile_size,
        "base_size": base.base_size,
        "keep_padding": base.keep_padding,
        "random_weights": bool(base.tiny or base.random_weights),
        "measured_minus_estimate": estimate_gap(cands),
    }
    return PlanResult(cands, budget, choose(cands, budget), meta)


def _measure(
    store: Any, url: str, base: Any, views: int, seed: int, pca_ks: tuple[int, ...]
) -> list[Candidate]:
    """Every candidate of the sample store measured: codecs fitted per teacher on the fit
    tiles, one audit per teacher on the held-out tiles (``audit_cosines``)."""
    from featstore.teacher_names import resolve_teacher_name

    specs = codec_candidates(pca_ks, min(e.spec.channels for e in store.schema.teachers))
    _, scored = split_sample(int(store.done().sum()))
    blend = default_blend()
    codecs, measured = {}, {}
    for typed in base.teachers:  # audited by the names typed (their --weights keys)
        name = resolve_teacher_name(store.schema, typed)
        codecs[name] = fit_codecs(store, name, specs)
        measured[name] = audit_cosines(url, typed, base, views, seed, blend, codecs[name], scored)
    return score_candidates(store, measured, codecs)


# ----------------------------------------------------------------------------- outputs


def markdown(result: PlanResult) -> str:
    """The frontier table: every candidate by bytes, frontier and chosen ones flagged."""
    from featcache.report import markdown_table

    rows = []
    for c in sorted(result.candidates, key=lambda c: (c.bytes_per_tile, -c.cosine)):
        flag = "yes" if c.on_frontier else ""
        if c is result.best:
            flag = (flag + " (chosen)").strip()
        rows.append(
            [
                c.label,
                f"{c.bytes_per_tile / 2**20:.4f}",
                _cos(c.cosine),
                _cos(c.estimate),
                _diff(c.cosine - c.estimate),
                _cos(c.cache_cosine),
                _cos(c.codec_cosine),
                flag,
            ]
        )
    table = markdown_table(
        [
            "configuration",
            "MiB/tile",
            "cosine (measured)",
            "estimate (product rule)",
            "measured - estimate",
            "cache cosine (fp16)",
            "codec round trip",
            "on frontier",
        ],
        rows,
    )
    m = result.meta
    gap = m.get("measured_minus_estimate", {})
    head = (
        f"Storage plan for {', '.join(m.get('teachers', []))} on {m.get('sample_tiles')} sample "
        f"tiles of {m.get('source')} ({m.get('views')} audit views of tiles "
        f"{m.get('audit_view_tiles')}, PCA fitted on tiles {m.get('pca_fit_tiles')}, seed "
        f"{m.get('seed')}); budget {result.budget / 2**20:.4f} MiB per tile. Cosine: {RULE}. "
        f"Beside it, the {ESTIMATE_RULE}: |measured - estimate| mean "
        f"{_diff(gap.get('mean_abs', float('nan')))}, largest "
        f"{_diff(gap.get('max_signed', float('nan')))} ({gap.get('worst', '-')})."
    )
    if m.get("fit_tiles_scored"):
        head += " One sample tile: the PCA bases are scored on the tile they were fitted on."
    if m.get("random_weights"):
        head += (
            " Random-init teachers (--tiny / --random-weights): their tokens are nearly low-rank, "
            "so PCA looks better than on real weights; not a fidelity figure."
        )
    return f"{head}\n\n{table}\n"


def _cos(x: float) -> str:
    # five decimals: int8 and fp16 differ in the fifth (four would show false ties)
    return "–" if x != x else f"{x:.5f}"


def _diff(x: float) -> str:
    return "–" if x != x else f"{x:+.5f}"


def extract_fields(best: Candidate, base: Any) -> dict[str, Any]:
    """The ``ExtractConfig`` fields that make ``extract --config`` build ``best``'s store."""
    fields: dict[str, Any] = {"teachers": list(base.teachers)}
    if base.weights:
        fields["weights"] = dict(base.weights)
    if base.tiny:
        fields["tiny"] = True
    if base.random_weights:
        fields["random_weights"] = True
    fields.update(
        scales=list(best.scales),
        flip=best.flip,
        codec=dict(best.codec),
        keep_padding=base.keep_padding,
        tile_size=base.tile_size,
        base_size=base.base_size,
    )
    return fields


def write_outputs(result: PlanResult, base: Any, out_dir: str | Path) -> dict[str, Path]:
    """plan.json, frontier.png and (when something fits) extract.yaml in ``out_dir``."""
    from featcache.plan_plot import plot_frontier
    from pipelines.config import extract_config_yaml

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PlanError(f"--out {str(out)!r} is a file; give a folder for the plan")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "plan.json", "png": out / "frontier.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    plot_frontier(result, paths["png"])  # featcache.plan_plot (matplotlib only when writing)
    best = result.best
    if best is not None:
        paths["yaml"] = out / "extract.yaml"
        comment = (
            f"written by featcache plan: {best.label}\n"
            f"{best.bytes_per_tile} B ({best.bytes_per_tile / 2**20:.4f} MiB) per tile, "
            f"measured cosine {best.cosine:.4f} (product-rule estimate {best.estimate:.4f})\n"
            f"use: featcache extract --config {paths['yaml']} SOURCE STORE\n"
            f"train with --scale-blend {best.blend:g} (distill.scale_blend: not an extraction "
            "setting)"
        )
        paths["yaml"].write_text(extract_config_yaml(extract_fields(best, base), comment))
    return paths
