"""Self-describing checkpoints.

A checkpoint is one ``torch.save`` file holding plain containers, numbers, strings and
tensors only, so it loads with ``torch.load(..., weights_only=True)`` (no code runs when
a downloaded file is opened) and rebuilds its model without any side files::

    {"format": "deeplab-checkpoint", "version": 1,
     "model": state_dict, "config": ModelConfig.to_dict(),
     "classes": [...names], "palette": [[r, g, b], ...],
     "normalization": {"mean": [...], "std": [...]},
     "step": int, "optimizer": ..., "scheduler": ..., "scaler": ...,
     "rng": {...}, "data": {...}, "train_config": {...}, "metrics": {...}, "best": {...}}

Only ``format``, ``version``, ``model`` and ``config`` are needed for inference; the
training keys are needed to resume. Writes are atomic: a job killed while saving leaves
the previous file intact.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch

from deeplab._utils import DeeplabError, atomic_write, fault_point, load_state_dict_strict, optional_import
from deeplab.config import ModelConfig

if TYPE_CHECKING:  # the model code is imported lazily, where a model is built
    from deeplab.models.deeplab import DeepLabV3

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "INFERENCE_KEYS",
    "RESUME_KEYS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "capture_rng_state",
    "load_checkpoint",
    "load_model",
    "restore_rng_state",
    "save_checkpoint",
    "strip_state_dict_prefixes",
    "to_plain",
]

PathLike = Union[str, "os.PathLike[str]"]

CHECKPOINT_FORMAT = "deeplab-checkpoint"
CHECKPOINT_VERSION = 1
INFERENCE_KEYS: Tuple[str, ...] = ("format", "version", "model", "config")
RESUME_KEYS: Tuple[str, ...] = INFERENCE_KEYS + (
    "step",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "train_config",
)
# Prefixes wrappers add to parameter names: DistributedDataParallel/DataParallel and
# torch.compile. Stripped on load so a checkpoint written from a wrapped model loads.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Exactly the types torch's weights_only unpickler rebuilds. Exact type checks on purpose:
# numpy scalars subclass float but pickle through numpy and would make the file
# unloadable with weights_only=True, which we would only discover at resume time.
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, set)


class CheckpointError(DeeplabError, RuntimeError):
    """A checkpoint could not be written, read or used; the message names file and fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


# --------------------------------------------------------------------------- writing


def _unsafe_entry(obj: Any, where: str) -> Optional[str]:
    """Return the key path of the first value weights_only loading would reject."""
    if isinstance(obj, torch.Tensor):
        return None
    if type(obj) in _PLAIN_LEAVES:
        return None
    if type(obj) in _PLAIN_CONTAINERS:
        if isinstance(obj, dict):
            for key, value in obj.items():
                bad = _unsafe_entry(key, f"{where}[{key!r}] (key)") or _unsafe_entry(value, f"{where}[{key!r}]")
                if bad:
                    return bad
        else:
            for i, value in enumerate(obj):
                bad = _unsafe_entry(value, f"{where}[{i}]")
                if bad:
                    return bad
        return None
    return f"{where} of type {type(obj).__module__}.{type(obj).__qualname__}"


def to_plain(obj: Any) -> Any:
    """Convert numpy scalars/arrays, dataclasses and tuples-of-them into checkpoint-safe values.

    Metrics dicts often hold ``numpy.float64`` or arrays; those would make a checkpoint
    unloadable with ``weights_only=True``.
    """
    if isinstance(obj, torch.Tensor):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    module = type(obj).__module__
    if module == "numpy":
        # numpy scalar or array, without importing numpy here.
        return obj.tolist() if hasattr(obj, "tolist") else obj.item()
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    return obj


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stale_temps(path: Path) -> None:
    """Delete leftovers of saves to ``path`` that were killed mid-write (can be GBs)."""
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"[^/]*\.tmp$")
    for candidate in path.parent.glob(_temp_prefix(path) + "*.tmp"):
        if pattern.match(candidate.name):
            try:
                candidate.unlink()
            except OSError:
                pass


def save_checkpoint(path: PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically.

    The payload is written to a temporary file in the same directory, flushed and
    fsynced, then renamed over ``path`` with ``os.replace``; so ``path`` always holds
    either the previous complete checkpoint or the new complete one, never a torn file.

    Args:
        path: destination, e.g. ``run_dir / "last.pt"``; parent directories are created.
        payload: the checkpoint dict (see the module docstring). ``format`` and
            ``version`` are filled in when absent.

    Returns:
        The destination path.

    Raises:
        TypeError: a value would not load with ``weights_only=True`` (nothing is written).
        CheckpointError: the write failed (disk full, permissions); ``path`` is untouched.
    """
    path = Path(path)
    data = dict(payload)
    data.setdefault("format", CHECKPOINT_FORMAT)
    data.setdefault("version", CHECKPOINT_VERSION)
    if data["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"payload format must be {CHECKPOINT_FORMAT!r}, got {data['format']!r}")
    bad = _unsafe_entry(data, "payload")
    if bad:
        raise TypeError(
            f"cannot save checkpoint {path}: {bad} would not load with torch.load(weights_only=True); "
            "store plain containers, numbers, strings and tensors (deeplab.checkpoint.to_plain "
            "converts numpy values)"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        with atomic_write(path) as handle:
            torch.save(data, handle)
            # Test-only: dies with the file half-flushed (the fault-tolerance tests).
            fault_point(f"write_{path.stem}", int(data["step"]) if isinstance(data.get("step"), int) else -1)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc}; the previous {path.name} (if any) is "
            "untouched - free disk space or choose another run directory"
        ) from exc
    return path


# --------------------------------------------------------------------------- reading


def _looks_like_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(
    path: PathLike,
    map_location: Any = "cpu",
    *,
    required_keys: Iterable[str] = INFERENCE_KEYS,
) -> Dict[str, Any]:
    """Read a deeplab checkpoint safely (``weights_only=True``) and validate its header.

    Args:
        path: a file written by :func:`save_checkpoint`.
        map_location: passed to ``torch.load``.
        required_keys: keys that must be present; :data:`RESUME_KEYS` to resume training.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointError: the file is corrupt/truncated, not a deeplab checkpoint, from a
            newer version, or lacks a required key. One message, naming file and fix.
    """
    path = Path(path)
    if not path.exists():
        hint = ""
        if path.parent.is_dir():
            siblings = sorted(p.name for p in path.parent.glob("*.pt"))
            if siblings:
                hint = f" ({path.parent} has: {', '.join(siblings[:10])})"
        raise CheckpointNotFoundError(
            f"checkpoint not found: {path}{hint}; check the path - training writes RUN_DIR/last.pt "
            "and RUN_DIR/best.pt"
        )
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory; pass the .pt file inside it, e.g. {path / 'last.pt'}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights only load failed" in str(exc).lower() or "weights_only" in str(exc):
            raise CheckpointError(
                f"refusing to load {path}: it contains Python objects that torch.load(weights_only=True) "
                f"will not execute ({text}). deeplab checkpoints contain only tensors and plain data; "
                "if you trust the file, load it yourself and re-save the state_dict with "
                "deeplab.checkpoint.save_checkpoint"
            ) from exc
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, corrupt or not a PyTorch file ({text}). "
            "Checkpoints are written atomically, so this usually means an incomplete copy or "
            "download - copy it again, or use the other checkpoint of the run (last.pt / best.pt)"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        if _looks_like_state_dict(ckpt):
            raise CheckpointError(
                f"{path} is a bare state_dict, not a deeplab checkpoint (it does not say which model "
                "it belongs to). Wrap it: deeplab.checkpoint.save_checkpoint(out, {'model': state_dict, "
                "'config': ModelConfig(...).to_dict()}), or load it with model.load_state_dict"
            )
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a deeplab checkpoint (no format={CHECKPOINT_FORMAT!r} header; found {found}); "
            "pass a file written by deeplab training or deeplab.checkpoint.save_checkpoint"
        )
    version = ckpt.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {version!r}, newer than this deeplab understands "
            f"(<= {CHECKPOINT_VERSION}); upgrade deeplab"
        )
    missing = [key for key in required_keys if key not in ckpt]
    if missing:
        resume = any(key in RESUME_KEYS and key not in INFERENCE_KEYS for key in missing)
        fix = (
            "it is a weights-only (inference/best-only) checkpoint; resume from RUN_DIR/last.pt, or "
            "start a new run initialised from these weights"
            if resume
            else "the file was written incompletely by hand; re-save it with the missing keys"
        )
        raise CheckpointError(f"checkpoint {path} lacks {missing}: {fix}")
    return ckpt


def strip_state_dict_prefixes(
    state_dict: Mapping[str, Any], prefixes: Sequence[str] = _WRAPPER_PREFIXES
) -> "OrderedDict[str, Any]":
    """Remove wrapper prefixes (DDP ``module.``, ``torch.compile`` ``_orig_mod.``) from keys.

    A prefix is stripped only when every key carries it, so a model that really has a
    submodule called ``module`` is left alone.
    """
    out = OrderedDict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in prefixes:
            if all(key.startswith(prefix) for key in out):
                out = OrderedDict((key[len(prefix):], value) for key, value in out.items())
                changed = True
    return out


def load_model(
    path: PathLike,
    map_location: Any = "cpu",
    *,
    num_classes: Optional[int] = None,
    arch: Optional[str] = None,
    backbone: Optional[str] = None,
    output_stride: Optional[int] = None,
) -> Tuple["DeepLabV3", Dict[str, Any]]:
    """Rebuild a model from a checkpoint alone and load its weights strictly.

    Args:
        path: a deeplab checkpoint.
        map_location: where tensors are loaded; a device string/``torch.device`` also
            moves the model there.
        num_classes, arch, backbone: what the caller expects; a checkpoint for anything
            else is a :class:`CheckpointError` instead of a silently wrong model.
        output_stride: rebuild at another output stride (weights are stride-independent;
            the paper trains at OS 16 and evaluates at OS 8).

    Returns:
        ``(model, ckpt)``: the model in eval mode and the checkpoint dict (classes,
        palette, normalization, metrics, ...).

    Raises:
        CheckpointError: unreadable file, config mismatch, or weights that do not fit.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location=map_location)
    if not ckpt["config"]:
        # An empty dict would silently rebuild the *default* model; refuse instead.
        raise CheckpointError(
            f"checkpoint {path} has no model config (it was written without one, e.g. train() without "
            "model_config), so it cannot rebuild its model; build the model yourself and "
            "load_state_dict(ckpt['model']), or re-save it with 'config': ModelConfig(...).to_dict()"
        )
    try:
        config = ModelConfig.from_dict(dict(ckpt["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has an unusable model config: {exc}") from exc
    expected = {"num_classes": num_classes, "arch": arch, "backbone": backbone}
    wrong = {k: v for k, v in expected.items() if v is not None and getattr(config, k) != v}
    if wrong:
        asked = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        raise CheckpointError(
            f"checkpoint {path} is a {config.arch} / {config.backbone} model for {config.num_classes} "
            f"classes, but {asked} was asked; pass the checkpoint's values, or train/fine-tune a model "
            f"for your setting (a new classifier for a different class count)"
        )
    if output_stride is not None:
        config = dataclasses.replace(config, output_stride=int(output_stride))

    # Imported here so this module (and training) imports without the model code.
    from deeplab.models import build_model_from_config

    # pretrained_backbone=None: never download ImageNet weights only to overwrite them.
    model = build_model_from_config(config, pretrained_backbone=None)
    load_state_dict_strict(
        model,
        strip_state_dict_prefixes(ckpt["model"]),
        source=(
            f"weights in {path} do not fit the {config.arch} / {config.backbone} model rebuilt from its "
            f"own config ({config.num_classes} classes)"
        ),
        fix="the file was edited or written by an incompatible deeplab version",
        error=CheckpointError,
    )
    model.eval()
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model, ckpt


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> Dict[str, Any]:
    """Snapshot Python, NumPy, torch CPU and (initialised) CUDA RNGs as tensors/lists.

    ``random.getstate()`` and ``numpy.random.get_state()`` return tuples containing
    numpy arrays; they are stored as int64 tensors so ``weights_only=True`` loads them.
    """
    version, internal, gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    np = optional_import("numpy")  # a dependency, but RNG capture must never fail a save
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; missing parts are left as they are."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        np = optional_import("numpy")
        if np is not None:
            nps = state["numpy"]
            np.random.set_state(
                (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
            )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        # A run resumed on fewer GPUs restores the devices it has; the rest never ran.
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu().to(torch.uint8), device=index)
