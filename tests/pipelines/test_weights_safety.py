"""Weights are read as tensors only (issue 11, #8 and #10): a TorchScript archive never runs.

The archive's ``__setstate__`` prints a marker when ``torch.jit.load`` unpickles it (checked
below on the archive itself), so its absence from the captured output proves the code never ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from featcache.cli import main
from pipelines.synthetic import generate_synthetic
from pipelines.teachers.weights import WeightsError, read_state_dict

MARKER = "FEATCACHE_TORCHSCRIPT_CODE_RAN"


class _Payload(nn.Module):
    """A module whose TorchScript ``__setstate__`` prints ``MARKER`` when the archive loads."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("FEATCACHE_TORCHSCRIPT_CODE_RAN")
        self.weight = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.fixture()
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.pt"
    with pytest.warns(FutureWarning):  # torch >= 2.10 flags torch.jit as deprecated
        torch.jit.save(torch.jit.script(_Payload()), str(path))
    return path


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
def test_the_payload_runs_code_when_loaded_as_torchscript(
    payload: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # the premise of the tests below: loading this archive with torch.jit runs its code
    torch.jit.load(str(payload))
    assert MARKER in capfd.readouterr().out


def test_read_state_dict_refuses_torchscript_without_running_it(
    payload: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(WeightsError) as info:
        read_state_dict(payload)
    assert "TorchScript" in str(info.value) and str(payload) in str(info.value)
    assert "torch.save(model.state_dict()" in str(info.value)
    assert MARKER not in capfd.readouterr().out


def _extract(tmp_path: Path, weights: Path) -> object:
    src = generate_synthetic(tmp_path / "syn", n_images=1, size=64, seed=0)
    args = [
        "extract",
        str(src),
        str(tmp_path / "store.zarr"),
        "--teacher",
        "dinov2_vitb14",
        "--tiny",
        "--scales",
        "1",
        "--no-flip",
        "--tile-size",
        "64",
        "--weights",
        f"dinov2_vitb14={weights}",
    ]
    return CliRunner().invoke(main, args)


def test_extract_weights_torchscript_is_refused_and_never_runs(
    payload: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    res = _extract(tmp_path, payload)
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # a message, not a traceback
    assert "is a TorchScript archive" in res.output and str(payload) in res.output
    assert "torch.save(model.state_dict()" in res.output
    assert MARKER not in res.output + capfd.readouterr().out


def test_train_pretrained_torchscript_is_refused_and_never_runs(
    payload: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from trainer.student import BackboneWeightsError, Student, StudentConfig, load_backbone_weights

    kwargs = {"embed_dim": 32, "depth": 4, "num_heads": 2}
    model = Student(
        StudentConfig(num_classes=3, layers=(0, 1, 2, 3), random_weights=True, model_kwargs=kwargs)
    )
    with pytest.raises(BackboneWeightsError, match=r"--pretrained .*TorchScript.*state_dict"):
        load_backbone_weights(model, payload)
    assert MARKER not in capfd.readouterr().out


def _corrupt_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: the header promises more bytes
    return path


def test_corrupt_safetensors_teacher_weights_name_the_file(tmp_path: Path) -> None:
    bad = _corrupt_safetensors(tmp_path / "teacher.safetensors")
    with pytest.raises(WeightsError, match=r"teacher.safetensors is not a readable \.safetensors"):
        read_state_dict(bad)
    res = _extract(tmp_path, bad)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"weights file {bad} is not a readable .safetensors file" in res.output


@pytest.mark.parametrize("kind", ["truncated.safetensors", "garbage.pth", "truncated.pth"])
def test_unreadable_pretrained_file_is_a_message(tmp_path: Path, kind: str) -> None:
    from trainer.student import BackboneWeightsError, Student, StudentConfig, load_backbone_weights

    path = tmp_path / kind
    if kind == "truncated.safetensors":
        _corrupt_safetensors(path)
    elif kind == "garbage.pth":
        path.write_bytes(b"this is not a checkpoint at all")
    else:
        torch.save({"w": torch.ones(256)}, path)
        path.write_bytes(path.read_bytes()[:300])
    kwargs = {"embed_dim": 32, "depth": 4, "num_heads": 2}
    model = Student(
        StudentConfig(num_classes=3, layers=(0, 1, 2, 3), random_weights=True, model_kwargs=kwargs)
    )
    with pytest.raises(BackboneWeightsError, match=f"cannot read --pretrained {path}"):
        load_backbone_weights(model, path)
