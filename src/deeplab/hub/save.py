"""Writing a model folder: :func:`save_pretrained` (a model) and
:func:`save_pretrained_from_checkpoint` (a deeplab checkpoint, with its figures and provenance)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from torch import nn

from .._utils import atomic_write, jsonable, unwrap_model
from .._version import __version__
from ..config import ModelConfig
from .card import model_card
from .format import CARD_NAME, CONFIG_NAME, HUB_FORMAT, HUB_VERSION, WEIGHTS_NAME, HubError, PathLike, require_safetensors

__all__ = ["save_pretrained", "save_pretrained_from_checkpoint"]

def _model_config(model: nn.Module) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise HubError(f"{type(model).__name__} carries no ModelConfig (model.config); save a model built by "
                       "deeplab.build_model / load_model, whose config rebuilds it")
    return config


def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    classes: Optional[Sequence[str]] = None,
    palette: Optional[Sequence[Sequence[int]]] = None,
    normalization: Optional[Mapping[str, Sequence[float]]] = None,
    dataset: Optional[Mapping[str, Any]] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    evaluation: Optional[Mapping[str, Any]] = None,
    training: Optional[Mapping[str, Any]] = None,
    source: Optional[Mapping[str, Any]] = None,
    name: Optional[str] = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the model card ``README.md`` into a folder.

    Args:
        model: a DeepLab model (``model.config`` rebuilds it); DDP / ``torch.compile`` wrappers
            are unwrapped. Its weights are saved as they are (float32 stays float32).
        save_directory: the folder (created; the three files in it are replaced atomically).
        classes: one name per output channel (default ``class_0`` ...).
        palette: one RGB colour per class.
        normalization: ``{"mean", "std"}`` in [0, 1] pixel units (default: the model's own).
        dataset: what it was trained on: ``{"dataset": "voc", "train_split": ..., "val_split": ...}``.
        metrics: eval figures: ``{"mIoU": 0.71, "pixel_accuracy": ...}`` (fractions or percents).
        evaluation: the setting of those figures: ``{"split", "output_stride", "scales", "flip",
            "mode", "note"}``.
        training: the recipe (a :class:`deeplab.config.TrainConfig` dict) and the step reached.
        source: provenance, e.g. ``{"zoo": {...}, "converted_from": {...}}`` of a converted model.
        name: the title of the card (default: arch and backbone).

    Returns:
        The folder.
    """
    safetensors_torch = require_safetensors()
    bare = unwrap_model(model)
    config = _model_config(bare)
    state = {key: value.detach().cpu().contiguous() for key, value in bare.state_dict().items()}
    num_classes = config.num_classes
    names = [str(c) for c in classes] if classes is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise HubError(f"{len(names)} class names for a model with {num_classes} output channels; "
                       "pass one name per class")
    own: Any = bare.normalization  # a DeepLab model's Normalization (nn.Module attributes type as Tensor | Module)
    norm = normalization if normalization is not None else own.to_dict()
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)

    # safetensors' header is canonical (sorted keys, fixed dtype names), so equal weights give equal bytes
    weights_bytes = safetensors_torch.save(state, metadata={"format": "pt", "library": "deeplab"})
    with atomic_write(directory / WEIGHTS_NAME) as handle:
        handle.write(weights_bytes)
    parameters = sum(int(p.numel()) for p in bare.parameters())
    card_config: Dict[str, Any] = {
        "format": HUB_FORMAT,
        "version": HUB_VERSION,
        "library": "deeplab",
        "library_version": __version__,
        "name": name or f"{config.arch} {config.backbone}",
        "model_config": config.to_dict(),
        "classes": names,
        "palette": [[int(v) for v in c[:3]] for c in palette] if palette is not None else None,
        "normalization": {k: [float(v) for v in norm[k]] for k in ("mean", "std")},
        "dataset": jsonable(dict(dataset or {})),
        "metrics": jsonable(dict(metrics or {})),
        "evaluation": jsonable(dict(evaluation or {})),
        "training": jsonable(dict(training or {})),
        "source": jsonable(dict(source or {})),
        "weights": {
            "file": WEIGHTS_NAME,
            "sha256": hashlib.sha256(weights_bytes).hexdigest(),
            "size": len(weights_bytes),
            "parameters": parameters,
            "dtype": sorted({str(v.dtype).replace("torch.", "") for v in state.values()}),
        },
    }
    with atomic_write(directory / CONFIG_NAME) as handle:
        handle.write((json.dumps(card_config, indent=2) + "\n").encode())
    with atomic_write(directory / CARD_NAME) as handle:
        handle.write(model_card(card_config).encode())
    return directory


def save_pretrained_from_checkpoint(checkpoint: PathLike, save_directory: PathLike, *,
                                    name: Optional[str] = None) -> Path:
    """:func:`save_pretrained` for a deeplab checkpoint (``best.pt``, or a converted zoo model).

    Classes, palette, normalisation, dataset, the best / last eval figures, the training recipe
    and (for a converted TF zoo model) its provenance and the zoo's own figure come from the
    checkpoint.
    """
    from ..checkpoint import load_model

    model, ckpt = load_model(checkpoint, map_location="cpu")
    dataset = dict(ckpt.get("dataset") or {})
    zoo = dict(ckpt.get("zoo") or {})
    metrics: Dict[str, Any] = {}
    evaluation: Dict[str, Any] = {}
    config = _model_config(model)
    if zoo.get("miou") is not None:
        # the authors' figure for these weights, in the setting the zoo page states
        metrics = {"mIoU": float(zoo["miou"])}
        evaluation = {
            "split": zoo.get("miou_split", "val"), "output_stride": zoo.get("eval_output_stride"),
            "scales": zoo.get("eval_scales"), "flip": zoo.get("eval_flip"), "mode": "whole",
            "by": "the TF reference (model_zoo.md)", "note": zoo.get("note", ""),
        }
    else:
        last = dict(ckpt.get("metrics") or {})
        best = dict(ckpt.get("best") or {})
        metrics = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if best.get("value") is not None and best.get("metric"):
            metrics[str(best["metric"])] = float(best["value"])
        if metrics:
            evaluation = {
                "split": dataset.get("val_split", "val"), "output_stride": config.output_stride, "scales": [1.0],
                "flip": False, "mode": "whole", "by": "deeplab train (validation during training)",
                "step": best.get("step", ckpt.get("step")),
            }
    training: Dict[str, Any] = {}
    if ckpt.get("train_config"):
        training = {"recipe": dict(ckpt["train_config"]), "step": ckpt.get("step")}
    source: Dict[str, Any] = {"checkpoint": Path(checkpoint).name}
    if ckpt.get("converted_from"):
        source["converted_from"] = dict(ckpt["converted_from"])
    if zoo:
        source["zoo"] = zoo
    return save_pretrained(
        model, save_directory, classes=ckpt.get("classes"), palette=ckpt.get("palette"),
        normalization=ckpt.get("normalization"), dataset=dataset, metrics=metrics, evaluation=evaluation,
        training=training, source=source, name=name or (zoo.get("name") if zoo else None),
    )
