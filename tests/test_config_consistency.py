"""One home for shared constants, codec names from featstore's registry, CLI defaults = library's.

The checks here are against written-out values (the official numbers, the quarter-octave
formula) or against the other side of a contract (what the CLI builds with no option given vs
what the library uses with no argument given), never against a copy of the code under test.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from featstore import constants as C
from featstore.codecs import CODECS, Float16Codec
from pipelines.config import ExtractConfig, ExtractConfigError, parse_codec

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("featstore", "featviews", "pipelines", "trainer", "featcache")


# --- (1) one constants module -------------------------------------------------------------------


def test_constants_are_the_official_values() -> None:
    """Written out from the sources they come from (torchvision/timm, OpenAI CLIP, RS-MTDF)."""
    assert C.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert C.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert C.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert C.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert (C.DEFAULT_CROP, C.PATCH_SIZE, C.IGNORE_INDEX) == (518, 14, 255)
    assert C.DEFAULT_CROP % C.PATCH_SIZE == 0  # 37 x 37 tokens
    assert C.SCALE_RANGE == (0.5, 2.0)
    # quarter-octave steps 2**(k/4), k = -4..4, rounded to two decimals
    assert tuple(round(2 ** (k / 4), 2) for k in range(-4, 5)) == C.MULTI_SCALES


def test_modules_import_the_constants_instead_of_copying_them() -> None:
    """Each module's name is the constants module's object itself, not an equal copy."""
    from featcache import audit
    from featstore import schema
    from pipelines import config
    from pipelines.sources import conventions
    from pipelines.teachers import base, clip
    from trainer import step

    pairs = [
        (schema.IMAGENET_MEAN, C.IMAGENET_MEAN),
        (schema.IMAGENET_STD, C.IMAGENET_STD),
        (clip.IMAGENET_MEAN, C.IMAGENET_MEAN),
        (clip.OPENAI_MEAN, C.CLIP_MEAN),
        (clip.OPENAI_STD, C.CLIP_STD),
        (step.IMAGENET_MEAN, C.IMAGENET_MEAN),
        (step.IMAGENET_STD, C.IMAGENET_STD),
        (config.MULTI_SCALES, C.MULTI_SCALES),
        (audit.OFFICIAL_SCALE_RANGE, C.SCALE_RANGE),
    ]
    for got, want in pairs:
        assert got is want
    # small ints are shared objects in CPython, so ``is`` proves nothing for them: the scan
    # below is what keeps them single
    assert (base.DEFAULT_BASE_SIZE, step.IGNORE, conventions.IGNORE_INDEX) == (518, 255, 255)


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _defaults(tree: ast.Module) -> list[tuple[str, Any, int]]:
    """(name, literal value, line) of every assignment, class field and parameter default."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                out.append((target.id, _literal(node.value), node.lineno))
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            if isinstance(node.target, ast.Name):
                out.append((node.target.id, _literal(node.value), node.lineno))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            with_default = positional[len(positional) - len(args.defaults) :]
            pairs = list(zip(with_default, args.defaults, strict=True))
            kw = zip(args.kwonlyargs, args.kw_defaults, strict=True)
            pairs += [(a, d) for a, d in kw if d is not None]
            out += [(a.arg, _literal(d), d.lineno) for a, d in pairs]
    return out


def _copies(name: str, value: Any) -> list[str]:
    tuples = {
        C.IMAGENET_MEAN: "IMAGENET_MEAN",
        C.IMAGENET_STD: "IMAGENET_STD",
        C.CLIP_MEAN: "CLIP_MEAN",
        C.CLIP_STD: "CLIP_STD",
        C.SCALE_RANGE: "SCALE_RANGE",
        C.MULTI_SCALES: "MULTI_SCALES",
    }
    found = []
    if isinstance(value, tuple) and value in tuples:
        found.append(tuples[value])
    if value == C.DEFAULT_CROP and not isinstance(value, bool):
        found.append("DEFAULT_CROP")
    if value == C.IGNORE_INDEX and ("ignore" in name.lower() or name == "pad_value"):
        found.append("IGNORE_INDEX")
    return found


def test_no_module_redefines_a_shared_constant() -> None:
    """A literal copy of a shared value as a constant or default is a second home: refused.

    ``trainer/presets.py`` is the table of official values (what the paper used, kept apart
    from our defaults on purpose); its values are dict entries, which this scan does not read.
    """
    bad = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "featstore" / "constants.py":
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, value, line in _defaults(tree):
                for const in _copies(name, value):
                    rel = path.relative_to(REPO)
                    bad.append(f"{rel}:{line} {name} = {value!r} (import {const})")
    assert not bad, "copies of featstore.constants:\n" + "\n".join(bad)


# --- (2) codec names from featstore's registry --------------------------------------------------


class _TestCodec(Float16Codec):
    name = "test_codec"


@pytest.fixture
def test_codec(monkeypatch: pytest.MonkeyPatch) -> str:
    """A codec registered in featstore for this test only (the registry is restored after)."""
    monkeypatch.setitem(CODECS, "test_codec", _TestCodec)
    return "test_codec"


def test_a_codec_registered_in_featstore_is_accepted(test_codec: str) -> None:
    assert parse_codec(test_codec) == {"name": "test_codec"}
    cfg = ExtractConfig(source="s", out="o", codec=parse_codec(test_codec)).validate()
    assert cfg.codec == {"name": "test_codec"}


def test_an_unknown_codec_names_the_registered_ones(test_codec: str) -> None:
    with pytest.raises(ExtractConfigError, match=r"--codec 'nope'.*fp16.*int8.*pca:K.*test_codec"):
        parse_codec("nope")
    with pytest.raises(ExtractConfigError, match="unknown"):
        ExtractConfig(source="s", out="o", codec={"name": "nope"}).validate()


def test_codec_arguments() -> None:
    assert parse_codec("pca:64") == {"name": "pca", "k": 64}
    with pytest.raises(ExtractConfigError, match="int8 takes no argument.*pca:K.*--codec int8"):
        parse_codec("int8:3")
    with pytest.raises(ExtractConfigError, match="pca:64"):
        parse_codec("pca:x")
    with pytest.raises(ExtractConfigError, match="--codec fp16: bad parameters"):
        ExtractConfig(source="s", out="o", codec={"name": "fp16", "k": 2}).validate()


# --- (3) CLI defaults = library defaults, and extract options = ExtractConfig fields -----------

# ExtractConfig field -> extract option (parameter) name, where they differ.
EXTRACT_RENAMED = {
    "source": "source",
    "out": "store",
    "teachers": "teacher",
    "store_pixels": "no_pixels",
}
# extract options that set no ExtractConfig field, with why.
EXTRACT_CLI_ONLY = {
    "quiet": "progress display of this command, not an extraction setting",
    "config_file": "a YAML file of fields (--config), not a field",
}


def test_every_extract_config_field_has_an_extract_option_and_back() -> None:
    from featcache.cli_extract import extract_command

    options = {p.name for p in extract_command.params}
    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    mapped = {EXTRACT_RENAMED.get(f, f) for f in fields}
    assert sorted(mapped - options) == [], "ExtractConfig fields without an extract option"
    assert sorted(options - mapped - set(EXTRACT_CLI_ONLY)) == [], "options without a field"


def test_extract_cli_defaults_equal_extract_config_defaults() -> None:
    """`featcache extract SRC STORE -t T` builds exactly ``ExtractConfig(SRC, STORE, (T,))``."""
    from featcache.cli_extract import _config, extract_command

    ctx = extract_command.make_context("extract", ["SRC", "STORE", "-t", "dinov2_vitb14"])
    opts = {k: v for k, v in ctx.params.items() if k not in EXTRACT_CLI_ONLY}
    cli = dataclasses.asdict(_config(**opts))
    lib = dataclasses.asdict(ExtractConfig(source="SRC", out="STORE", teachers=("dinov2_vitb14",)))
    differ = {k: (cli[k], lib[k]) for k in lib if cli[k] != lib[k]}
    assert not differ, f"field: (CLI default, library default) {differ}"
    # the default the issue found differing (1 scale vs 9 scales + flip), written out
    assert lib["scales"] == (0.5, 0.59, 0.71, 0.84, 1.0, 1.19, 1.41, 1.68, 2.0) and lib["flip"]


def test_train_cli_defaults_equal_train_config_defaults() -> None:
    """`featcache train --store S` builds the library's default ``TrainConfig`` with that store.

    Every train option defaults to None or an off flag, so no option may change a default.
    """
    from featcache.cli_train import build_config, train_cmd
    from trainer.config import TrainConfig

    params = train_cmd.make_context("train", ["--store", "S"]).params
    set_by_default = {k: v for k, v in params.items() if v not in (None, False, ())}
    assert set_by_default == {"store": "S"}
    lib = TrainConfig()
    lib.data.store = "S"
    assert build_config(params).to_dict() == lib.validate().to_dict()


def _library_defaults(func: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(func).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _captured_call(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, args: list[str], command: Any
) -> dict[str, Any]:
    """The keyword arguments `command` passes to ``module.name`` when only ``args`` are given."""
    calls: list[dict[str, Any]] = []

    def fake(*_: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise SystemExit(0)  # stop before the command reads a result

    monkeypatch.setattr(module, name, fake)
    result = CliRunner().invoke(command, args)
    assert len(calls) == 1, result.output
    return calls[0]


# Deliberate differences, with why (reported, not changed: either side changing would change
# what existing audit commands or library callers compute).
AUDIT_CLI_DIFFERS = {
    "aligned_views": "CLI: half of --views (a grid-aligned comparison row by default); "
    "library: 0 (callers ask for it)",
    "progress": "a command shows a progress bar, a library call stays quiet",
}
BANK_CLI_DIFFERS = {"progress": "a command shows a progress bar, a library call stays quiet"}
# Same meaning, other spelling: build_view_bank reads ``dict(weights or {})``, so the CLI's
# empty NAME=PATH dict and the library's None both mean "no weights given".
BANK_SAME_MEANING = {"weights": ({}, None)}


def test_audit_cli_defaults_equal_audit_store_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import featcache.audit
    from featcache.cli_report import audit_command

    lib = _library_defaults(featcache.audit.audit_store)  # before the fake replaces it
    passed = _captured_call(
        monkeypatch, featcache.audit, "audit_store", ["S", "-t", "T"], audit_command
    )
    assert set(passed) <= set(lib)
    differ = {k: (v, lib[k]) for k, v in passed.items() if v != lib[k]}
    assert set(differ) == set(AUDIT_CLI_DIFFERS), differ
    assert differ["aligned_views"] == (64 // 2, 0)


def test_bank_cli_defaults_equal_build_view_bank_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pipelines.viewbank
    from featcache.cli_extract import bank_command

    lib = _library_defaults(pipelines.viewbank.build_view_bank)  # before the fake replaces it
    passed = _captured_call(monkeypatch, pipelines.viewbank, "build_view_bank", ["S"], bank_command)
    assert set(passed) <= set(lib)
    differ = {k: (v, lib[k]) for k, v in passed.items() if v != lib[k]}
    assert {k: differ.pop(k) for k in BANK_SAME_MEANING} == BANK_SAME_MEANING
    assert set(differ) == set(BANK_CLI_DIFFERS), differ
    # the CLI's `--k 8 --seed 0 --batch-size 16` (its --help), written out
    assert (passed["k"], passed["seed"], passed["batch_size"]) == (8, 0, 16)


def test_an_extract_config_file_round_trips(tmp_path: Path) -> None:
    """`extract_config_yaml` -> `load_extract_config` gives back every field's value and type."""
    from pipelines.config import extract_config_yaml, load_extract_config

    fields = {
        "teachers": ("dinov2_vitb14", "clip_vitl14"),
        "weights": {"dinov2_vitb14": "w.pt"},
        "scales": (0.5, 1.0, 2.0),
        "flip": False,
        "codec": {"name": "pca-int8", "k": 64},
        "keep_padding": False,
        "tile_size": 256,
        "bands": (3, 2, 1),
        "limit": None,
    }
    path = tmp_path / "x.yaml"
    path.write_text(extract_config_yaml(fields, comment="a comment\nand another"))
    assert path.read_text().startswith("# a comment\n# and another\n")
    assert load_extract_config(str(path)) == fields
    cfg = ExtractConfig(source="s", out="o", **load_extract_config(str(path))).validate()
    assert (cfg.scales, cfg.codec) == ((0.5, 1.0, 2.0), {"name": "pca-int8", "k": 64})
    path.write_text("scales: 1,2\ncodec: int8\nteachers: dinov2_vitb14\n")  # text forms
    assert load_extract_config(str(path)) == {
        "scales": (1.0, 2.0),
        "codec": {"name": "int8"},
        "teachers": ("dinov2_vitb14",),
    }
    path.write_text("out: somewhere\nscale: [1]\n")
    with pytest.raises(ExtractConfigError, match=r"--config .*x.yaml.*\['out', 'scale'\].*SOURCE"):
        load_extract_config(str(path))


def test_extract_config_file_fills_defaults_and_typed_options_win(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pipelines.extract
    from featcache.cli_extract import extract_command

    seen: list[Any] = []

    def fake(cfg: Any, progress: bool = True) -> str:
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(pipelines.extract, "run_extraction", fake)
    path = tmp_path / "c.yaml"
    path.write_text("teachers: [dinov2_vitb14]\nscales: [1, 2]\nflip: false\ncodec: int8\n")
    args = ["--config", str(path), "SRC", "STORE", "--scales", "1", "--no-pixels"]
    result = CliRunner().invoke(extract_command, args)
    assert len(seen) == 1, result.output
    cfg = seen[0]
    assert cfg.scales == (1.0,)  # typed on the command line: wins over the file's [1, 2]
    assert (cfg.flip, cfg.codec, cfg.teachers) == (False, {"name": "int8"}, ("dinov2_vitb14",))
    assert cfg.store_pixels is False and (cfg.source, cfg.out) == ("SRC", "STORE")
    assert ExtractConfig(source="SRC", out="STORE").batch_size == cfg.batch_size  # untouched
    result = CliRunner().invoke(extract_command, ["SRC", "STORE"])  # neither gives a teacher
    assert result.exit_code != 0 and not seen[1:]
    assert "--teacher NAME (or teachers: in --config)" in str(result.exception)


def test_multi_scales_cover_the_rescale_range_at_quarter_octaves() -> None:
    """Why MULTI_SCALES is the default: every zoom of SCALE_RANGE is within 2**0.125 of a level."""
    logs = np.log2(C.MULTI_SCALES)
    zooms = np.log2(np.linspace(*C.SCALE_RANGE, 1001))
    worst = np.abs(zooms[:, None] - logs[None, :]).min(axis=1).max()
    assert worst <= 0.125 + 0.01  # two-decimal rounding of the levels


# --- train options <-> TrainConfig fields --------------------------------------------------------

# One example per train option, each set alone beside `--store S` (values chosen to differ from
# the defaults and to pass validation). A new option needs an entry here.
TRAIN_EXAMPLES: dict[str, list[str]] = {
    "preset": ["--preset", "official"],
    "method": ["--method", "supervised"],
    "layout": ["--layout", "folder"],
    "split_file": ["--split-file", "x.txt"],
    "classes": ["--classes", "a,b"],
    "reduce_zero_label": ["--reduce-zero-label"],
    "ignore_index": ["--ignore-index", "7"],
    "palette": ["--palette", "p.txt"],
    "bands": ["--bands", "3,2,1"],
    "source": ["--source", "x"],
    "teacher": ["--teacher", "t"],
    "no_distill": ["--no-distill"],
    "mode": ["--mode", "online", "--teacher", "t"],
    "out": ["--out", "x"],
    "iters": ["--iters", "3"],
    "epochs": ["--epochs", "3"],
    "batch": ["--batch", "3+2"],
    "crop": ["--crop", "28"],
    "labeled": ["--labeled", "x"],
    "unlabeled": ["--unlabeled", "x"],
    "val": ["--val", "x"],
    "partition": ["--partition", "x"],
    "tile_size": ["--tile-size", "3"],
    "edge_rule": ["--edge-rule", "pad"],
    "num_classes": ["--num-classes", "3"],
    "pretrained": ["--pretrained", "x"],
    "random_weights": ["--random-weights"],
    "lr": ["--lr", "0.001"],
    "standardize": ["--standardize"],
    "target_mode": ["--target-mode", "grid_aligned"],
    "p_bank": ["--p-bank", "0.5"],
    "scale_blend": ["--scale-blend", "0.5"],
    "masked": ["--unmasked"],
    "eval_mode": ["--eval-mode", "sliding"],
    "eval_interval": ["--eval-interval", "3"],
    "exclude_classes": ["--exclude-classes", "0"],
    "log_interval": ["--log-interval", "3"],
    "stop_after": ["--stop-after", "3"],
    "resume": ["--resume", "x"],
    "tiny": ["--tiny"],
    "device": ["--device", "cpu"],
    "seed": ["--seed", "3"],
    "workers": ["--workers", "3"],
    "bf16": ["--bf16"],
    "grad_ckpt": ["--grad-ckpt"],
    "no_progress": ["--no-progress"],
    "skip_bad_tiles": ["--skip-bad-tiles"],
    "stability_detach": ["--stability-detach"],
    "co2s_finetune": ["--co2s-finetune", "full"],
    "clip_act": ["--clip-act", "gelu"],
    "text_variant": ["--text-variant", "single"],
    "clip_weights": ["--clip-weights", "x"],
    "dino_weights": ["--dino-weights", "x"],
    "co2s_distill": ["--co2s-distill", "clip"],
}
# Train options that set no TrainConfig field alone, with why.
TRAIN_CLI_ONLY = {
    "config": "a YAML file of fields, not a field",
    "store": "given in every example (data.store)",
    "weights": "weights of the --teacher entries (model.teachers[i].weights), with --teacher only",
    "overwrite": "an argument of trainer.engine.train, not a setting of the run",
}
# TrainConfig fields no train option sets (YAML / --config only). Adding a field means adding
# an option or listing it here.
TRAIN_YAML_ONLY = {
    "data.fingerprint",
    "data.scale_range",
    "data.flip_p",
    "model.student",
    "optim.lr_multi",
    "optim.weight_decay",
    "optim.poly",
    "fixmatch.conf_thresh",
    "fixmatch.ema_max",
    "fixmatch.cutmix_p",
    "fixmatch.photometric",
    "fixmatch.jitter_order",
    "fixmatch.blur",
    "distill.levels",
    "distill.level_stats",
    "schedule.ckpt_interval",
    "eval.stride",
    "eval.best_model",
    "eval.best_metric",
    "eval.batch_size",
    "runtime.tensorboard",
    "co2s.lr_backbone",
    "co2s.lr_head",
    "co2s.lr_queries",
    "co2s.weight_decay",
}


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "student":  # model.student is one free-form field
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _train_fields(args: list[str]) -> dict[str, Any]:
    from featcache.cli_train import build_config, train_cmd

    return _leaves(build_config(train_cmd.make_context("train", args).params).to_dict())


def test_every_train_option_sets_a_config_field_and_every_field_has_an_option() -> None:
    from featcache.cli_train import train_cmd
    from trainer.config import TrainConfig

    options = {p.name for p in train_cmd.params}
    assert sorted(options - set(TRAIN_EXAMPLES) - set(TRAIN_CLI_ONLY)) == []
    base = _train_fields(["--store", "S"])
    reached = {"data.store"}
    for option, argv in TRAIN_EXAMPLES.items():
        got = _train_fields(["--store", "S", *argv])
        changed = {k for k in base if got[k] != base[k]}
        assert changed, f"--{option} changed no TrainConfig field"
        # --preset sets the preset field; the other fields it changes come from its table
        reached |= {"preset"} if option == "preset" else changed
    fields = set(_leaves(TrainConfig().to_dict()))
    assert sorted(fields - reached - TRAIN_YAML_ONLY) == [], "fields without a train option"
    assert sorted(TRAIN_YAML_ONLY & reached) == [], "TRAIN_YAML_ONLY names a field with an option"
    assert sorted(TRAIN_YAML_ONLY - fields) == [], "TRAIN_YAML_ONLY names a field that is gone"


def test_extract_and_train_read_a_source_with_the_same_fields() -> None:
    """The source options land on fields of the same names and defaults in both configs, and
    `open_configured` reads them from either (a field added to one must be added to the other)."""
    from featcache.cli_source import SOURCE_FIELDS
    from pipelines.config import ExtractConfig
    from trainer.config import DataConfig

    extract = {f.name: f.default for f in dataclasses.fields(ExtractConfig)}
    data = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    shared = set(SOURCE_FIELDS.values()) | {"tile_size", "edge_rule"}
    assert {k: extract[k] for k in shared} == {k: data[k] for k in shared}


def test_train_source_options_reach_open_source(tmp_path: Path, monkeypatch: Any) -> None:
    """`train --source ... --classes --reduce-zero-label --bands` reads the folder with them."""
    import pipelines.sources.source as source_mod
    from featcache.cli_train import build_config, train_cmd
    from trainer.prepare import _open_source

    seen: dict[str, Any] = {}

    def fake(path: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, path=path)
        raise RuntimeError("stop")

    monkeypatch.setattr(source_mod, "open_source", fake)
    argv = ["--source", "data", "--mode", "online", "--teacher", "t", "--classes", "a,b"]
    argv += ["--reduce-zero-label", "--ignore-index", "9", "--bands", "3,2,1", "--layout", "folder"]
    cfg = build_config(train_cmd.make_context("train", argv).params)
    with pytest.raises(RuntimeError, match="stop"):
        _open_source(cfg)
    assert seen["path"] == "data" and seen["layout"] == "folder"
    assert seen["class_names"] == "a,b" and seen["reduce_zero_label"] is True
    assert seen["ignore_index"] == 9 and seen["bands"] == (3, 2, 1)


@pytest.mark.parametrize(
    ("text", "says"),
    [("scales: [1, 2\n", "cannot read it as YAML"), ("- 1\n- 2\n", "expected a mapping")],
)
def test_extract_refuses_a_bad_config_file_before_writing(
    tmp_path: Path, text: str, says: str
) -> None:
    """A config file that is not YAML, or not a mapping: exit 1 with the file named, no store."""
    from featcache.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    store = tmp_path / "store.zarr"
    result = CliRunner().invoke(main, ["extract", "--config", str(path), "SRC", str(store)])
    assert result.exit_code == 1, result.output
    assert f"--config {path}: {says}" in result.output
    assert not store.exists()
