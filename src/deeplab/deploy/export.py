"""Export: ONNX / TorchScript files that describe themselves.

ONNX files carry the class names, palette, input normalisation, output stride and model
config as ``metadata_props`` (key ``deeplab``, a JSON string); TorchScript files carry the
same JSON as the extra file ``deeplab.json`` (the contract lives in
:mod:`deeplab.deploy.format`, whose :func:`~deeplab.deploy.format.read_metadata` reads
either). BatchNorm is folded into the convs first by default
(:func:`deeplab.deploy.optimize.fold_batchnorm`). To check an exported file against the
PyTorch model, run :func:`deeplab.deploy.runtime.check_parity`.

Exports have a dynamic batch, height and width: the model's resizes take their target sizes
from tensor shapes without converting them to ``int``, so tracing keeps them symbolic.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from deeplab.deploy.format import (
    METADATA_FORMAT,
    METADATA_KEY,
    METADATA_VERSION,
    TORCHSCRIPT_METADATA_FILE,
    ExportError,
    quiet_tracing,
)
from deeplab.deploy.optimize import fold_batchnorm

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMATS",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "model_metadata",
]

PathLike = Union[str, "os.PathLike[str]"]

EXPORT_FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17


# --------------------------------------------------------------------------- metadata


def model_metadata(
    model: nn.Module,
    *,
    classes: Optional[Sequence[str]] = None,
    palette: Optional[Sequence[Sequence[int]]] = None,
    normalization: Optional[Mapping[str, Sequence[float]]] = None,
) -> Dict[str, Any]:
    """What a deployed model needs besides its weights, as plain JSON-able data.

    Missing class names become ``class_0 ...``; a missing palette the VOC colormap; a missing
    normalisation the model's own (``model.normalization``).

    Returns:
        ``{"format", "version", "num_classes", "classes", "palette", "normalization",
        "output_stride", "align_corners", "config", "deeplab_version"}``.
    """
    from deeplab._version import __version__
    from deeplab.data.palettes import default_palette

    config = getattr(model, "config", None)
    num_classes = int(getattr(model, "num_classes", 0) or (config.num_classes if config is not None else 0))
    if classes is None:
        classes = [f"class_{i}" for i in range(num_classes)]
    classes = [str(c) for c in classes]
    if num_classes and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {num_classes} classes")
    if palette is None or len(palette) < len(classes):
        palette = default_palette(len(classes))
    if normalization is None:
        norm = getattr(model, "normalization", None)
        normalization = norm.to_dict() if norm is not None else {"mean": [0.0] * 3, "std": [1.0] * 3}
    return {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "num_classes": len(classes),
        "classes": classes,
        "palette": [[int(v) for v in color] for color in palette[: len(classes)]],
        "normalization": {k: [float(v) for v in normalization[k]] for k in ("mean", "std")},
        "output_stride": int(getattr(model, "output_stride", 16)),
        "align_corners": bool(getattr(model, "align_corners", False)),
        "config": config.to_dict() if config is not None else None,
        "deeplab_version": __version__,
    }

# --------------------------------------------------------------------------- export


def _prepare(model: nn.Module, fold_bn: bool) -> nn.Module:
    model = copy.deepcopy(model).float().cpu().eval()
    if fold_bn:
        model = fold_batchnorm(model, inplace=True)
    return model


def _example(model: nn.Module, example_input: Optional[torch.Tensor]) -> torch.Tensor:
    if example_input is not None:
        return example_input.float().cpu()
    # Not square and not OS*k+1, so no size coincidence can hide a constant baked by tracing.
    stride = int(getattr(model, "output_stride", 16) or 16)
    channels = int(getattr(model, "in_channels", 3) or 3)  # N-channel models (RGB-D, multispectral)
    return torch.randn(1, channels, stride * 4 + 1, stride * 5 + 1, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it only when the block succeeds.

    A failed or interrupted export never leaves a half-written model under ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_onnx(
    model: nn.Module,
    path: PathLike,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    example_input: Optional[torch.Tensor] = None,
    fold_bn: bool = True,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export to ONNX with dynamic batch, height and width; input ``image``, output ``logits``.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no ``onnxscript`` and gives
    a graph ONNX Runtime and OpenVINO both optimise well.

    Args:
        model: a DeepLab model (any ``nn.Module`` taking ``(B, 3, H, W)``).
        path: output file.
        metadata: embedded as ``metadata_props["deeplab"]`` (JSON); default
            :func:`model_metadata` of the model.
        example_input: traced input; default a small non-square image.
        fold_bn: fold BatchNorm into the convs first (the graph then has no BN nodes).
        opset: ONNX opset.

    Returns:
        ``path``.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx package: pip install 'deeplab[onnx]'") from exc
    path = Path(path)
    meta = dict(metadata) if metadata is not None else model_metadata(model)
    prepared = _prepare(model, fold_bn)
    x = _example(prepared, example_input)
    axes = {0: "batch", 2: "height", 3: "width"}
    with _atomic_target(path) as tmp:
        with quiet_tracing(), torch.no_grad():
            torch.onnx.export(
                prepared,
                (x,),
                str(tmp),
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": axes, "logits": axes},
                opset_version=opset,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        proto.doc_string = f"deeplab {meta.get('config') or ''}"[:1000]
        onnx.save(proto, str(tmp))
    return path


def export_torchscript(
    model: nn.Module,
    path: PathLike,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    example_input: Optional[torch.Tensor] = None,
    fold_bn: bool = True,
) -> Path:
    """Export to TorchScript by tracing (dynamic batch, height and width).

    The metadata JSON is stored as the extra file ``deeplab.json``
    (``torch.jit.load(path, _extra_files={"deeplab.json": ""})`` reads it back).

    Args: as :func:`export_onnx`.

    Returns:
        ``path``.
    """
    path = Path(path)
    meta = dict(metadata) if metadata is not None else model_metadata(model)
    prepared = _prepare(model, fold_bn)
    x = _example(prepared, example_input)
    with quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(prepared, (x,), check_trace=False)
    with _atomic_target(path) as tmp, quiet_tracing():
        torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(meta)})
    return path


def export_model(
    model: nn.Module,
    path: PathLike,
    *,
    format: str = "onnx",
    metadata: Optional[Mapping[str, Any]] = None,
    example_input: Optional[torch.Tensor] = None,
    fold_bn: bool = True,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """:func:`export_onnx` or :func:`export_torchscript` by ``format`` (``"onnx"``/``"torchscript"``)."""
    if format == "onnx":
        return export_onnx(model, path, metadata=metadata, example_input=example_input, fold_bn=fold_bn, opset=opset)
    if format == "torchscript":
        return export_torchscript(model, path, metadata=metadata, example_input=example_input, fold_bn=fold_bn)
    raise ValueError(f"unknown export format {format!r}; choose from {list(EXPORT_FORMATS)}")

