"""`featcache text`: Co2S class text embeddings in the store (pipelines.text, featstore.text).

The stored matrices are checked against open_clip's own ``CLIP.encode_text`` on prompts written
out here, with the concept average's formula written out; the real ViT-B/16 tower runs when
FEATCACHE_CLIP_B16_WEIGHTS points at its OpenAI weights (open_clip state dict file).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from featcache.cli import main
from featstore import StoreSchema, TileRecord, create_store, open_store
from featstore.errors import IncompleteStoreError
from featstore.text import MissingTextError, read_text_embeddings

LOVEDA = ("background", "building", "road", "water", "barren", "forest", "agriculture")
REAL_WEIGHTS_ENV = "FEATCACHE_CLIP_B16_WEIGHTS"
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_VISION = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}


def _run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _store(root: Path, dataset: str = "loveda", classes: tuple[str, ...] = LOVEDA) -> str:
    """A one-tile store with pixels and no teacher (the text group needs only the class table)."""
    url = str(root / f"{dataset}.zarr")
    schema = StoreSchema(dataset=dataset, tile_size=8, class_names=classes, tiles_per_shard=1)
    tile = TileRecord(
        tile_id="t0", source="x.png", window=(0, 0, 8, 8), split="train", pixel_hash="0"
    )
    writer = create_store(url, schema, [tile])
    writer.write_shard(
        0, features={}, images=np.zeros((1, 8, 8, 3), np.uint8), masks=np.zeros((1, 8, 8), np.uint8)
    )
    writer.finalize()
    return url


def _tiny_clip(seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(16, TINY_VISION, TINY_TEXT, quick_gelu=True).eval()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """A tiny full CLIP (both towers, seed 123) and its state-dict file, laid out as OpenAI's:
    beside the weights, the three metadata entries of its JIT model's state dict."""
    model = _tiny_clip(123)
    path = tmp_path_factory.mktemp("w") / "tiny_clip.pt"
    meta = {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}
    torch.save({**model.state_dict(), **{k: torch.tensor(v) for k, v in meta.items()}}, path)
    return model, path


def _official_lists(name: str) -> list[list[str]]:
    # The shipped JSON read as plain data, not through the loader under test.
    text = resources.files("pipelines.concepts").joinpath(f"{name}.json").read_text()
    return [entry["concepts"] for entry in json.loads(text)["classes"]]


def _direct(model: object, prompts: list[str]) -> np.ndarray:
    """open_clip's own path: tokenize + CLIP.encode_text, not normalised."""
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-B-16")(prompts)
    with torch.no_grad():
        return model.encode_text(tokens).float().numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _expected(model: object, classes: tuple[str, ...], lists: list[list[str]]) -> dict:
    single = _unit(_direct(model, [f"a photo of a {c}" for c in classes]))
    raw = _direct(model, [f"a photo of a {c}" for group in lists for c in group])
    bounds = np.cumsum([0] + [len(g) for g in lists])
    avg = np.stack(
        [raw[a:b].sum(0) / (b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    )
    return {"single": single, "concepts": _unit(raw), "conceptavg": _unit(avg)}


def test_shipped_lists_are_the_references(tmp_path: Path) -> None:
    from pipelines.concepts import builtin_concepts
    from pipelines.sources.conventions import ISPRS_CLASSES
    from pipelines.sources.conventions import LOVEDA as LOVEDA_CONV

    # (classes, concepts) per dataset: co2s-reference.md §1.4 "Shapes"
    shapes = {
        "whdld": (6, 37),
        "loveda": (7, 41),
        "potsdam": (6, 36),
        "gid15": (15, 90),
        "mer": (9, 54),
        "msl": (9, 54),
    }
    for name, (k, n) in shapes.items():
        lists = builtin_concepts(name)
        assert (len(lists.class_names), sum(map(len, lists.concepts))) == (k, n), name
        assert all(g[0] == c for c, g in zip(lists.class_names, lists.concepts, strict=True)), name
    assert builtin_concepts("loveda").class_names == LOVEDA_CONV.class_names == LOVEDA
    assert builtin_concepts("potsdam").class_names == ISPRS_CLASSES
    assert len(builtin_concepts("whdld").concepts[5]) == 7  # water: the official quirk
    assert len(builtin_concepts("loveda").concepts[0]) == 5  # background
    assert builtin_concepts("gid15").concepts[4][:2] == ("paddy_field", "rice field")
    assert builtin_concepts("mer").concepts[5][1] == "rover tracks"


def test_stored_embeddings_equal_open_clip(tmp_path: Path, tiny_clip: tuple) -> None:
    model, weights = tiny_clip
    url = _store(tmp_path)
    result = _run("text", url, "--tiny", "--weights", weights)
    assert result.exit_code == 0, result.output
    want = _expected(model, LOVEDA, _official_lists("loveda"))
    for variant, expected in want.items():
        got, attrs = read_text_embeddings(url, variant)
        assert got.dtype == np.float32 and got.shape == expected.shape, variant
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0, err_msg=variant)
        assert attrs["weights_sha256"] != "random:seed0"
        assert attrs["template"] == "a photo of a {concept}"
    _, attrs = read_text_embeddings(open_store(url), "concepts")
    assert attrs["prompts"][:2] == ["a photo of a background", "a photo of a undeveloped land"]
    assert attrs["concept_class"].tolist() == [0] * 5 + sum(([k] * 6 for k in range(1, 7)), [])
    # the weights were really loaded: the seeded random tiny tower gives other numbers
    other = _store(tmp_path / "random")
    assert _run("text", other, "--tiny").exit_code == 0
    assert not np.allclose(read_text_embeddings(other)[0], want["conceptavg"], atol=1e-3)


def test_rerun_is_a_noop_and_other_inputs_need_overwrite(tmp_path: Path) -> None:
    url = _store(tmp_path)
    assert _run("text", url, "--tiny").exit_code == 0
    files = sorted(p for p in Path(url, "text").rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    again = _run("text", url, "--tiny")
    assert again.exit_code == 0 and "up to date" in again.output
    assert [p.stat().st_mtime_ns for p in files] == stamps
    refused = _run("text", url, "--tiny", "--concepts", "names")
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert "concepts: stored" in refused.output
    assert _run("text", url, "--tiny", "--concepts", "names", "--overwrite").exit_code == 0
    single, _ = read_text_embeddings(url, "single")
    avg, attrs = read_text_embeddings(url, "conceptavg")
    assert attrs["concepts"] == [[c] for c in LOVEDA]
    np.testing.assert_allclose(avg, single, atol=1e-6)  # one concept each: its own prompt


def test_concept_file_must_match_the_store_classes(tmp_path: Path) -> None:
    url = _store(tmp_path)
    swapped = [{"name": c, "concepts": [c, f"{c} area"]} for c in LOVEDA]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    bad = tmp_path / "mine.json"
    bad.write_text(json.dumps({"classes": swapped}))
    result = _run("text", url, "--tiny", "--concepts", bad)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(bad) in result.output and "'road'" in result.output
    assert "--concepts" in result.output
    assert not Path(url, "text").exists()
    # the same list in the store's order is accepted and used as given
    swapped[1], swapped[2] = swapped[2], swapped[1]
    good = tmp_path / "mine.yaml"
    good.write_text(json.dumps({"classes": swapped}))  # JSON is valid YAML
    assert _run("text", url, "--tiny", "--concepts", good).exit_code == 0
    _, attrs = read_text_embeddings(url, "concepts")
    assert attrs["prompts"][:2] == ["a photo of a background", "a photo of a background area"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), ("--weights", "--random-weights")),
        (("--weights", "missing/clip.pt"), ("missing/clip.pt", "does not exist")),
        (("--tiny", "--classes", "a,b"), ("--classes", "drop --classes")),
        (("--tiny", "--concepts", "nowhere.json"), ("nowhere.json", "does not exist")),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, args: tuple, words: tuple) -> None:
    url = _store(tmp_path)
    result = _run("text", url, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    for word in words:
        assert word in result.output
    assert not Path(url, "text").exists()


def test_builtin_refuses_a_dataset_without_a_list(tmp_path: Path) -> None:
    url = _store(tmp_path, dataset="syn", classes=("a", "b"))
    result = _run("text", url, "--tiny")
    assert result.exit_code == 1
    assert "'syn'" in result.output and "--concepts FILE" in result.output
    assert _run("text", url, "--tiny", "--concepts", "names").exit_code == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    result = _run("text", _store(tmp_path), "--weights", path)
    assert result.exit_code == 1 and "TorchScript" in result.output
    assert "--weights PATH" in result.output


def test_reader_refuses_missing_and_incomplete_groups(tmp_path: Path) -> None:
    import zarr

    url = _store(tmp_path)
    with pytest.raises(MissingTextError, match="featcache text"):
        read_text_embeddings(url)
    assert _run("text", url, "--tiny").exit_code == 0
    group = zarr.open_group(url, mode="r+")["text"]
    group.attrs["text"] = dict(group.attrs["text"], complete=False)  # a write cut short
    with pytest.raises(IncompleteStoreError, match="featcache text"):
        read_text_embeddings(url)
    assert _run("text", url, "--tiny").exit_code == 0  # rewritten without --overwrite
    assert read_text_embeddings(url)[0].shape == (7, 16)


def test_xarray_and_info_see_the_group(tmp_path: Path) -> None:
    import xarray as xr

    url = _store(tmp_path)
    assert _run("text", url, "--tiny").exit_code == 0
    node = xr.open_datatree(url, engine="zarr", consolidated=False)["text"]
    assert dict(node["conceptavg"].sizes) == {"class": 7, "text_dim": 16}
    assert dict(node["concepts"].sizes) == {"concept": 41, "text_dim": 16}
    assert node["concept_class"].dims == ("concept",)
    np.testing.assert_array_equal(node["single"].values, read_text_embeddings(url, "single")[0])
    assert node["single"].attrs["prompts"][0] == "a photo of a background"
    info = _run("info", url)
    assert info.exit_code == 0 and "text:        7 classes x 16" in info.output


def test_real_tower(tmp_path: Path) -> None:
    weights = os.environ.get(REAL_WEIGHTS_ENV)
    if not weights or not Path(weights).is_file():
        pytest.skip(
            f"set {REAL_WEIGHTS_ENV} to the OpenAI CLIP ViT-B/16 weights (open_clip state dict "
            "file, e.g. open_clip_pytorch_model.bin of the openai release) to run the real tower"
        )
    import open_clip

    from pipelines.teachers.weights import read_state_dict

    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True).eval()
    state = read_state_dict(weights)
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    model.load_state_dict(state, strict=True)
    url = _store(tmp_path)
    result = _run("text", url, "--weights", weights)
    assert result.exit_code == 0, result.output
    want = _expected(model, LOVEDA, _official_lists("loveda"))
    for variant, expected in want.items():
        got = read_text_embeddings(url, variant)[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=variant)
    # the reference measured the class prototypes nearly parallel (max off-diagonal 0.93-0.97)
    avg = want["conceptavg"]
    cos = avg @ avg.T
    assert 0.85 < (cos - 2 * np.eye(len(avg))).max() < 0.99


@pytest.mark.real_data
def test_builtin_finds_the_list_of_a_real_loveda_store(tmp_path: Path, loveda_sample: Path) -> None:
    from pipelines.sources import open_source

    source = open_source(str(loveda_sample), layout="loveda-folder")
    url = _store(tmp_path, dataset=source.dataset, classes=tuple(source.class_names))
    result = _run("text", url, "--tiny")
    assert result.exit_code == 0 and "builtin:loveda" in result.output
    assert read_text_embeddings(url, "concepts")[0].shape == (41, 16)
