"""``--preset official``: every official value set, departures listed, YAML = CLI.

The official values are written out below by hand from the official RS-MTDF code (see
``../shared/design/rs-mtdf-reference.md``, section of each line), not read from
``trainer.presets.OFFICIAL``: the test is an independent expectation of that table. The student
values are read from the ``StudentConfig`` a run would build, so they pin what the student gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner

from featcache.cli import main
from featcache.cli_train import build_config, train_cmd
from featstore import open_store
from tests.helpers import CLIP, DINO, build_store, tiny_run_args, write_ids
from trainer.config import TINY_STUDENT, TeacherConfig, TrainConfig, TrainConfigError
from trainer.prepare import student_config
from trainer.presets import OFFICIAL, departure_lines, departures

# (dotted key, official value, where the reference says so)
EXPECTED: list[tuple[str, Any]] = [
    ("crop_size", 518),  # §2.1 step 3, configs crop_size
    ("data.scale_range", (0.5, 2.0)),  # §2.1 step 2
    ("data.flip_p", 0.5),  # §2.1 step 4
    ("optim.lr", 5e-6),  # §6 lr
    ("optim.lr_multi", 40.0),  # §6 lr_multi
    ("optim.weight_decay", 0.01),  # §5 AdamW
    ("optim.poly", 0.9),  # §5 poly
    ("fixmatch.conf_thresh", 0.95),  # §6 conf_thresh
    ("fixmatch.ema_max", 0.996),  # §5 EMA
    ("fixmatch.cutmix_p", 0.5),  # §2.2 obtain_cutmix_box p
    ("fixmatch.photometric", True),  # §2.2 strong views
    ("fixmatch.jitter_order", "sample"),  # §2.2 step 1: torchvision draws the order per call
    ("fixmatch.blur", "pil"),  # §2.2 step 3: PIL GaussianBlur
    ("distill.enabled", True),  # RS-MTDF distils
    ("distill.masked", False),  # §9.13: the MSE includes the padding
    ("distill.standardize", False),  # §4: raw MSE
    ("eval.mode", "whole"),  # §7 mode original
    ("eval.best_model", "student"),  # §7: best.pth on the student's mIoU
    ("eval.best_metric", "miou"),  # §7
    ("eval.exclude_classes", None),  # §7: each dataset's own test protocol
    ("schedule.epochs", 60),  # §6 epochs
    ("schedule.iters", None),  # §6: length given in epochs
    ("schedule.batch_labeled", 8),  # §6 batch_size per GPU
    ("schedule.batch_unlabeled", 8),  # §6 batch_size per GPU
    ("model.student.arch", "vit_small_patch14_dinov2"),  # §6 backbone dinov2_small
    ("model.student.layers", (2, 5, 8, 11)),  # §3.1
    ("model.student.features", 64),  # §3.1 features=64
    ("model.student.out_channels", (48, 96, 192, 384)),  # §3.1
    ("model.student.translator_hidden", 1024),  # §11
    ("model.student.fusion_self", 0.8),  # §11
    ("model.student.fusion_teacher", 0.1),  # §11
    ("model.student.clip_size", 224),  # §3.2 / §10
    ("model.student.clip_from_full", False),  # §3.2: a second student pass at 224
]

# Entries other parts of issue 12 add to OFFICIAL; each must be listed in EXPECTED above
# with its official value once it lands (the coverage test below says which are missing).


def _field(cfg: TrainConfig, key: str) -> Any:
    """The value a run uses for ``key``; student keys from the StudentConfig it would build."""
    parts = key.split(".")
    if parts[:2] == ["model", "student"]:
        cfg.model.teachers = [TeacherConfig(DINO, "full")]
        cfg.model.random_weights = True
        built = student_config(cfg, 6, {DINO: 32})
        value = getattr(built, parts[2])
        return list(value) if isinstance(value, tuple) else value
    obj: Any = cfg
    for part in parts:
        obj = getattr(obj, part)
    return list(obj) if isinstance(obj, tuple) else obj


def _cli(*args: str) -> TrainConfig:
    """The TrainConfig ``featcache train ARGS`` would run with (the real option parsing)."""
    ctx = train_cmd.make_context("train", ["--store", "memory://x", *args])
    return build_config(ctx.params)


def _yaml(tmp_path: Path, body: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"store": "memory://x"}, **body}))
    return path


@pytest.mark.parametrize(("key", "official"), EXPECTED, ids=[k for k, _ in EXPECTED])
@pytest.mark.parametrize("entry", ["cli", "yaml"])
def test_preset_sets_the_official_value(key: str, official: Any, entry: str, tmp_path) -> None:
    if entry == "cli":
        cfg = _cli("--preset", "official")
    else:
        cfg = TrainConfig.load(_yaml(tmp_path, {"preset": "official"}))
    want = list(official) if isinstance(official, tuple) else official
    assert _field(cfg, key) == want
    assert cfg.preset == "official"


def test_every_table_entry_has_a_written_out_expectation() -> None:
    assert sorted(OFFICIAL) == sorted(k for k, _ in EXPECTED)


# online mode, DINOv2 weights, the official teachers on their branches: what no preset sets
AS_PAPER = ("--pretrained", "w.pth", "--mode", "online")
PAPER_TEACHERS = ("--teacher", "dinov2_vitb14@full", "--teacher", "clip_vitl14@clip224")


def test_our_defaults_depart_where_documented() -> None:
    cfg = _cli(*AS_PAPER, *PAPER_TEACHERS)
    found = {d.key: (d.ours, d.official) for d in departures(cfg)}
    # the paper's method is the default: only the fix of a documented official bug departs
    assert found == {"distill.masked": (True, False)}
    assert departure_lines(cfg)[0] == (
        "recipe: no preset (our defaults); 1 departure(s) from the official RS-MTDF recipe:"
    )


def test_the_preset_leaves_no_departure() -> None:
    cfg = _cli("--preset", "official", *AS_PAPER, *PAPER_TEACHERS)
    assert departures(cfg) == []
    assert departure_lines(cfg) == [
        "recipe: preset official; no departure from the official RS-MTDF recipe"
    ]


def test_other_teachers_and_random_init_are_named() -> None:
    cfg = _cli(
        "--preset",
        "official",
        "--mode",
        "online",
        "--random-weights",
        "--teacher",
        "dinov2_vitb14@full",
        "--teacher",
        "clip_vitl14@full",
    )
    found = {d.key: (d.ours, d.official) for d in departures(cfg)}
    assert found == {
        "model.pretrained": ("RANDOM init", "DINOv2 weights"),
        "model.teachers": (
            ["dinov2_vitb14@full", "clip_vitl14@full"],
            ["dinov2_vitb14@full", "clip_vitl14@clip224"],
        ),
    }


def test_explicit_option_over_the_preset_is_a_departure() -> None:
    cfg = _cli("--preset", "official", "--masked", "--lr", "1e-4", "--eval-mode", "sliding")
    assert (cfg.distill.masked, cfg.optim.lr, cfg.eval.mode) == (True, 1e-4, "sliding")
    found = {d.key: (d.ours, d.official) for d in departures(cfg)}
    assert found["distill.masked"] == (True, False)
    assert found["optim.lr"] == (1e-4, 5e-6)
    assert found["eval.mode"] == ("sliding", "whole")
    assert "eval.best_model" not in found  # still the preset's value
    # facts no preset sets: random init (no --pretrained), cached targets
    assert found["model.pretrained"] == ("RANDOM init", "DINOv2 weights")
    assert found["mode"] == ("cached", "online")


@pytest.mark.parametrize("preset", [None, "official"])
def test_yaml_and_cli_give_the_same_config(preset: str | None, tmp_path: Path) -> None:
    body: dict[str, Any] = {
        "crop_size": 70,
        "model": {"teachers": [DINO, CLIP], "pretrained": "w.pth"},
        "optim": {"lr": 1e-5},
        "distill": {"masked": True},
        "schedule": {"batch_labeled": 2, "batch_unlabeled": 4},
    }
    args = [
        "--crop",
        "70",
        "--teacher",
        DINO,
        "--teacher",
        CLIP,
        "--pretrained",
        "w.pth",
        "--lr",
        "1e-5",
        "--masked",
        "--batch",
        "2+4",
    ]
    if preset:
        body["preset"] = preset
        args += ["--preset", preset]
    from_yaml = TrainConfig.load(_yaml(tmp_path, body)).validate()
    from_cli = _cli(*args)
    assert from_yaml == from_cli
    # the same YAML through --config, with no option: the same again
    assert _cli("--config", str(_yaml(tmp_path, body))) == from_cli


def test_precedence_preset_then_yaml_then_cli(tmp_path: Path) -> None:
    path = _yaml(tmp_path, {"distill": {"masked": True}, "eval": {"mode": "sliding"}})
    cfg = _cli("--config", str(path), "--preset", "official", "--eval-mode", "whole")
    assert cfg.preset == "official"
    assert cfg.distill.masked is True  # the YAML's key over the preset
    assert cfg.eval.mode == "whole"  # the option over the YAML
    assert cfg.eval.best_model == "student"  # the preset where nobody said otherwise


def test_saved_config_reloads_to_the_same_config(tmp_path: Path) -> None:
    cfg = _cli("--preset", "official", "--masked", "--crop", "70")
    record = [d.to_dict() for d in departures(cfg)]
    cfg.dump(tmp_path / "config.yaml", header=["a header"], record=record)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["preset"] == "official"
    assert {r["key"] for r in saved["departures"]} == {
        "distill.masked",
        "crop_size",
        "model.pretrained",
        "mode",
    }
    again = TrainConfig.load(tmp_path / "config.yaml")
    assert again == cfg
    # the explicit values win over the recorded preset: a later change of the preset's table
    # cannot change a saved run's config
    saved["eval"]["best_model"] = "ema"
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(saved))
    assert TrainConfig.load(tmp_path / "edited.yaml").eval.best_model == "ema"


def test_unknown_preset_is_refused_in_option_words(tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match=r"--preset 'paper'.*\['official'\]"):
        TrainConfig.load(_yaml(tmp_path, {"preset": "paper"}))
    res = CliRunner().invoke(main, ["train", "--store", "memory://x", "--preset", "paper"])
    assert res.exit_code == 2 and "'paper' is not 'official'" in res.output


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("preset")
    url = build_store(root, teachers=(DINO, CLIP))
    ids = [t.tile_id for t in open_store(url).tiles]
    write_ids(root / "l.txt", ids[:2])
    write_ids(root / "u.txt", ids[2:4])
    write_ids(root / "v.txt", ids[4:])
    return url, root


def test_train_prints_and_records_the_departures(store, tmp_path: Path) -> None:
    url, root = store
    out = tmp_path / "r"
    args = [
        "train",
        "--preset",
        "official",
        "--masked",
        "--store",
        url,
        "--out",
        str(out),
        *tiny_run_args(root),
        "--iters",
        "1",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    head = lines.index("recipe: preset official; 7 departure(s) from the official RS-MTDF recipe:")
    listed = [line.split(" = ")[0] for line in lines[head + 1 : head + 8]]
    assert listed == [
        "  crop_size",  # --crop 70
        "  distill.masked",  # --masked over the preset
        "  schedule.iters",  # --iters 1
        "  schedule.batch_labeled",  # --batch 2+2
        "  schedule.batch_unlabeled",
        "  model.tiny",  # --tiny
        "  mode",  # cached targets: a property of the cache
    ]  # the store's teachers carry the official names and branches: not a departure
    assert lines[head + 2] == (
        "  distill.masked = True (official: False): padding tokens get weight 0 in the "
        "distillation loss"
    )
    assert lines[head + 7].startswith("  mode = 'cached' (official: 'online') [cache]: ")
    text = (out / "config.yaml").read_text()
    assert "# recipe: preset official; 7 departure(s)" in text  # the header: the same lines
    saved = yaml.safe_load(text)
    assert saved["preset"] == "official"
    assert [r["key"] for r in saved["departures"]] == [k.strip() for k in listed]
    masked = saved["departures"][1]
    assert (masked["ours"], masked["official"], masked["kind"]) == (True, False, "method")
    assert saved["departures"][-1]["kind"] == "cache"
    # a resumed run reads the same config back
    assert TrainConfig.load(out / "config.yaml").to_dict() == {
        k: v for k, v in saved.items() if k != "departures"
    }


def _full_size_args(url: str, root: Path, out: Path, *extra: str) -> list[str]:
    """A run with a full-size student config (no --tiny), its ViT made small by model_kwargs."""
    small = root / "small_student.yaml"
    student = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_STUDENT.items()}
    small.write_text(yaml.safe_dump({"model": {"student": student}}))
    return ["train", "--config", str(small), "--store", url, "--out", str(out), "--crop", "70",
            "--iters", "1", "--batch", "2+2", "--labeled", str(root / "l.txt"),
            "--unlabeled", str(root / "u.txt"), "--val", str(root / "v.txt"), "--device", "cpu",
            "--workers", "0", "--no-progress", *extra]  # fmt: skip


def test_random_student_is_a_warning_and_recorded(store, tmp_path: Path) -> None:
    url, root = store
    out = tmp_path / "r"
    res = CliRunner().invoke(main, _full_size_args(url, root, out, "--random-weights"))
    assert res.exit_code == 0, res.output
    warning = (
        "WARNING: student: vit_small_patch14_dinov2, RANDOM init (--random-weights; no "
        "--pretrained): expect far lower accuracy than from DINOv2 weights"
    )
    assert warning in res.output.splitlines()
    text = (out / "config.yaml").read_text()
    assert f"# {warning}\n" in text
    record = {r["key"]: r for r in yaml.safe_load(text)["departures"]}
    assert record["model.pretrained"]["ours"] == "RANDOM init"


def test_pretrained_file_reaches_the_student(store, tmp_path: Path) -> None:
    url, root = store
    torch.manual_seed(3)
    kwargs = dict(TINY_STUDENT["model_kwargs"], img_size=70, dynamic_img_size=True, num_classes=0)
    vit = timm.create_model("vit_small_patch14_dinov2", **kwargs)
    weights = tmp_path / "backbone.pth"
    torch.save(vit.state_dict(), weights)
    out = tmp_path / "r"
    # lr 1e-12: one AdamW step moves no weight measurably, so the checkpoint shows the file
    args = _full_size_args(url, root, out, "--pretrained", str(weights), "--lr", "1e-12")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert f"student: vit_small_patch14_dinov2, weights {weights}" in res.output.splitlines()
    assert "RANDOM" not in res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["pretrained"] == str(weights)
    assert "model.pretrained" not in {r["key"] for r in saved["departures"]}
    state = torch.load(out / "latest.pt", map_location="cpu", weights_only=True)["student"]
    for name, value in vit.state_dict().items():
        torch.testing.assert_close(state[f"backbone.{name}"], value, atol=1e-6, rtol=0)


# --- Co2S: its own official recipe ------------------------------------------------------------

# (dotted key, official value), written out from ../shared/design/co2s-reference.md (section in
# each comment), not read from trainer.presets.
EXPECTED_CO2S: list[tuple[str, Any]] = [
    ("crop_size", 512),  # §2.5: 512 (WHDLD 256)
    ("data.scale_range", (0.5, 2.0)),  # §2.1 ratio_range
    ("data.flip_p", 0.5),  # §2.1
    ("optim.poly", 0.9),  # §2.4
    ("fixmatch.conf_thresh", 0.95),  # §2.3 tau
    ("fixmatch.cutmix_p", 0.5),  # §2.1 one box with p = 0.5
    ("fixmatch.photometric", True),  # §2.1 strong views
    ("fixmatch.jitter_order", "sample"),  # §2.1 torchvision ColorJitter per image
    ("fixmatch.blur", "pil"),  # §2.1 PIL Gaussian blur
    ("eval.mode", "sliding"),  # §3 zegclip_sliding_window
    ("eval.best_model", "clip"),  # §3 best_clip.pth (README reports CLIP)
    ("eval.best_metric", "miou"),  # §3
    ("eval.exclude_classes", None),  # §3 plain mean over K
    ("schedule.epochs", 80),  # §2.5 (MER 150)
    ("schedule.iters", None),  # §2.5 length in epochs
    ("schedule.batch_labeled", 1),  # §2.5 1 per GPU at 512
    ("schedule.batch_unlabeled", 1),  # §2.5
    ("co2s.stability_detach", True),  # §2.3 / §7.1 both logits detached
    ("co2s.lr_backbone", 1e-6),  # §2.4
    ("co2s.lr_head", 1e-3),  # §2.4
    ("co2s.lr_queries", 1e-4),  # §2.4
    ("co2s.weight_decay", 0.01),  # §2.4
    ("co2s.finetune", "attn"),  # §1.1 exclude_keys=['attn']
    ("co2s.clip_act", "gelu"),  # §1.1 exact GELU
    ("co2s.text_variant", "conceptavg"),  # §1.4 the default file
    ("runtime.bf16", False),  # §2.4 no AMP
    ("co2s.distill", "none"),  # no distillation in the official code (issue 17: beyond)
]
# fixed departures (no option) every co2s run lists
CO2S_FIXED_KEYS = {
    "co2s.layernorm_eps",
    "co2s.dinov3_rope_dtype",
    "eval.best_split",
    "co2s.cutmix_partner",
    "co2s.masked_ce_denominator",
    "co2s.phi_input",
}


def _co2s(*args: str) -> TrainConfig:
    """The config a co2s run uses after the method settled its options."""
    from trainer.methods import Co2S

    cfg = _cli("--method", "co2s", *args)
    Co2S.configure(cfg)
    return cfg


def test_co2s_recipe_table_is_the_written_out_one() -> None:
    from trainer.presets import recipe

    table = recipe("co2s")
    assert sorted(table) == sorted(k for k, _ in EXPECTED_CO2S)
    for key, official in EXPECTED_CO2S:
        want = list(official) if isinstance(official, tuple) else official
        got = table[key][0]
        assert (list(got) if isinstance(got, tuple) else got) == want, key


@pytest.mark.parametrize("entry", ["cli", "yaml"])
def test_co2s_preset_sets_the_official_values(entry: str, tmp_path: Path) -> None:
    if entry == "cli":
        cfg = _co2s("--preset", "official", "--tiny")
    else:
        path = _yaml(tmp_path, {"preset": "official", "method": "co2s"})
        cfg = TrainConfig.load(path).validate()
    for key, official in EXPECTED_CO2S:
        want = list(official) if isinstance(official, tuple) else official
        assert _field(cfg, key) == want, key
    if entry == "cli":  # only what no option can set is left
        found = {d.key for d in departures(cfg)}
        assert found == {"model.tiny"} | CO2S_FIXED_KEYS


def test_co2s_defaults_depart_where_documented() -> None:
    cfg = _co2s("--crop", "512", "--batch", "1+1", "--epochs", "80", "--random-weights")
    found = {d.key: (d.ours, d.official) for d in departures(cfg)}
    assert {k: v for k, v in found.items() if k not in CO2S_FIXED_KEYS} == {
        "co2s.stability_detach": (False, True),  # the loss has its gradient (issue 17)
        "co2s.clip_act": ("quickgelu", "gelu"),  # the OpenAI weights' activation
        "co2s.clip_weights": ("RANDOM init", "OpenAI CLIP ViT-B/16 weights"),
        "co2s.dino_weights": ("RANDOM init", "DINOv3 ViT-B/16 LVD-1689M weights"),
    }
    assert set(found) >= CO2S_FIXED_KEYS
    # no RS-MTDF-only entry: the DINOv2 student, EMA, distillation, its learning rates
    assert not any(k.startswith(("model.student.", "distill.", "optim.lr")) for k in found)
    assert "fixmatch.ema_max" not in found and "model.pretrained" not in found
    lines = departure_lines(cfg)
    assert lines[0].endswith("departure(s) from the official Co2S recipe (XavierJiezou/Co2S):")
    assert (
        "  co2s.stability_detach = False (official: True): the stability loss has a gradient"
        in "\n".join(lines)
    )
    assert any(ln.startswith("  co2s.masked_ce_denominator = ") and "[fix]" in ln for ln in lines)


def test_co2s_options_over_the_preset_are_departures() -> None:
    cfg = _co2s(
        "--preset", "official", "--tiny", "--stability-detach", "--clip-act", "quickgelu",
        "--co2s-finetune", "full", "--bf16", "--crop", "256",
    )  # fmt: skip
    found = {d.key: (d.ours, d.official) for d in departures(cfg)}
    assert found["co2s.clip_act"] == ("quickgelu", "gelu")
    assert found["co2s.finetune"] == ("full", "attn")
    assert found["runtime.bf16"] == (True, False)
    assert found["crop_size"] == (256, 512)
    assert "co2s.stability_detach" not in found  # detached: the official no-op
