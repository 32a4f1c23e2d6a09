"""``open_model``: any model source -> ``(runner, ModelCard)``, the one way a model is opened.

A source is a deeplab checkpoint (``torch.save``), a file from ``deeplab export`` (ONNX, LiteRT,
TorchScript, an OpenVINO IR ``.xml`` saved from our ONNX) or a name of the paper's zoo
(downloaded, converted and cached on first use). ``deeplab predict``, ``eval``, ``export``,
``serve`` and :class:`deeplab.segmenter.Segmenter` all open their model here, so the same
source gives the same model, classes, normalisation and precision everywhere.

The runner follows the package contract (``runner(x (B, C, H, W)) -> logits (B, K, H, W)``, with
``output_stride``); the :class:`ModelCard` says what it is: the model config, classes, palette,
normalisation, the dataset it was trained on, the backend and precision it runs at (and why),
and where it came from.

Precision (``precision=``): ``None`` runs the file at its own precision (a checkpoint at fp32);
``"fp32"`` / ``"bf16"`` / ``"int8"`` ask for one; ``"auto"`` applies :func:`choose_precision`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from deeplab._utils import ConfigError
from deeplab.deploy.format import ExportError, sniff_format, validate_metadata
from deeplab.deploy.precision import PARITY_BOUNDS, choose_precision
from deeplab.deploy.runtime import (
    ExportedModel,
    FixedInputModel,
    OnnxRuntimeModel,
    OpenVINOModel,
    TFLiteModel,
    auto_backend,
    file_precision,
    load_exported,
)

__all__ = [
    "BACKENDS",
    "PARITY_BOUNDS",
    "FixedInputModel",
    "ModelCard",
    "checkpoint_precision",
    "choose_precision",
    "normalize_backend",
    "open_model",
]

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)

# The one backend vocabulary of every entrance (predict, eval, serve, Segmenter). "torch" runs a
# checkpoint or a TorchScript file with PyTorch; "torchscript" is its old spelling in eval.
BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tflite")
BACKEND_ALIASES = {"torchscript": "torch"}

@dataclass(frozen=True)
class ModelCard:
    """What an opened model is, whatever its source.

    Attributes:
        source: what was asked for (a file path or a zoo name).
        path: the file opened (a zoo name's converted checkpoint in the cache).
        kind: ``"checkpoint"``, ``"onnx"``, ``"torchscript"`` or ``"openvino-ir"``.
        config: the ``ModelConfig`` dict (``arch``, ``backbone``, ``num_classes``, ...).
        classes: class names as stored (``None`` when the file has none).
        palette: one RGB colour per class as stored (``None`` when the file has none).
        normalization: ``{"mean": [...], "std": [...]}`` in [0, 1] pixel units.
        dataset: what the training data was (``dataset``, ``label_map``; ``{}`` if unknown).
        backend: the runtime label (``"torch"``, ``"onnxruntime"``, ``"openvino"``, ``"torchscript"``).
        precision, precision_reason: what it runs at and why.
        zoo: the zoo entry for a zoo name, else ``None``.
        device: where the runner computes (``"auto"`` resolved).
        exported: an exported file's description for reports (``model_file``, ``format``,
            ``backend``, ``precision``, ``input_size``), else ``None``.
    """

    source: str
    path: str
    kind: str
    config: Dict[str, Any]
    classes: Optional[List[str]]
    palette: Optional[List[List[int]]]
    normalization: Dict[str, List[float]]
    dataset: Dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"
    precision: str = "fp32"
    precision_reason: str = ""
    zoo: Any = None
    exported: Optional[Dict[str, Any]] = None
    device: str = "cpu"

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def class_names(self) -> List[str]:
        """The stored class names, or ``class_0 ...`` when the file has none."""
        return [str(c) for c in self.classes] if self.classes else [f"class_{i}" for i in range(self.num_classes)]


def normalize_backend(backend: str) -> str:
    """``backend`` in the one vocabulary (:data:`BACKENDS`; ``"torchscript"`` -> ``"torch"``).

    Raises:
        ConfigError: an unknown backend name (the message lists the choices).
    """
    backend = BACKEND_ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    return backend


# --------------------------------------------------------------------------- precision policy


def checkpoint_precision(requested: Optional[str], device: Union[str, torch.device]) -> Tuple[str, str]:
    """What a checkpoint runs at for ``InferenceConfig.precision`` = ``requested`` (``None``: fp32)."""
    if requested == "int8":
        raise ConfigError(
            "int8 runs an int8 export, not a checkpoint: deeplab export --checkpoint CKPT --precision int8 "
            "--calib-data DIR --out model.onnx"
        )
    if requested == "bf16":
        if torch.device(device).type != "cpu":
            raise ConfigError("precision bf16 runs CPU autocast; on a GPU leave precision at fp32 or auto")
        return "bf16", "asked for (torch.autocast bfloat16)"
    if requested in ("fp32", None):
        return "fp32", "asked for"
    return choose_precision(None, "torch")


# --------------------------------------------------------------------------- exported files


def openvino_ir_metadata(path: Path) -> Dict[str, Any]:
    """The deeplab metadata of an OpenVINO IR ``.xml`` (kept in its ``rt_info`` when the IR was
    saved from one of our ONNX files)."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportError(f"opening {path} needs OpenVINO: pip install 'deeplab[openvino]'") from exc
    model = ov.Core().read_model(str(path))
    for keys in (["framework", "deeplab"], ["deeplab"]):
        if model.has_rt_info(keys):
            value = model.get_rt_info(keys)
            text = str(value.astype(str) if hasattr(value, "astype") else value)
            return validate_metadata(json.loads(text), path)
    raise ExportError(f"{path} carries no deeplab metadata; convert the ONNX file from `deeplab export` "
                      "with openvino.save_model so its rt_info keeps it")


def fixed_input_size(model: ExportedModel) -> Optional[Tuple[int, int]]:
    """``(H, W)`` when the exported graph only accepts one input size, else ``None``."""
    dims: List[Any] = []
    if isinstance(model, TFLiteModel):
        return model.input_size
    if isinstance(model, OnnxRuntimeModel):
        dims = list(model.session.get_inputs()[0].shape)
    elif isinstance(model, OpenVINOModel):
        shape = model.core.read_model(str(model.path)).inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
    if len(dims) == 4 and isinstance(dims[2], int) and isinstance(dims[3], int):
        return int(dims[2]), int(dims[3])
    return None


def _exported_precision(path: Path, meta: Dict[str, Any], backend: str, precision: Optional[str]) -> Tuple[Optional[str], str]:
    if precision != "auto":
        return precision, "asked for" if precision else "the file's own"
    runtime = auto_backend(path, file_precision(meta)) if backend == "auto" else backend
    return choose_precision(meta, runtime)


def _open_exported(path: Path, kind: str, *, backend: str, precision: Optional[str], threads: Optional[int],
                   static_shapes: bool, fixed_input: bool) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any], str]:
    """``(runner, metadata, description, precision reason)`` of an exported file."""
    from deeplab.deploy.format import read_metadata

    backend = "torchscript" if backend == "torch" else backend  # the runtime's name for PyTorch on a file
    if kind == "openvino-ir":
        if backend not in ("auto", "openvino"):
            raise ConfigError(f"{path} is an OpenVINO IR file; run it with --backend openvino (or auto)")
        meta = openvino_ir_metadata(path)
        wanted, reason = _exported_precision(path, meta, "openvino", precision)
        runner: ExportedModel = OpenVINOModel(path, metadata=meta, threads=threads, static_shapes=static_shapes,
                                              precision=wanted)
    else:
        meta = read_metadata(path)
        wanted, reason = _exported_precision(path, meta, backend, precision)
        runner = load_exported(path, backend=backend, threads=threads, static_shapes=static_shapes,
                               precision=wanted, metadata=meta)
    # a LiteRT graph has one input size: it is always padded to it
    fixed = fixed_input_size(runner) if fixed_input or kind == "tflite" else None
    model: nn.Module = runner if fixed is None else FixedInputModel(runner, fixed)
    description = {
        "model_file": str(path),
        "format": kind if kind in ("openvino-ir", "tflite") else ("onnx" if runner.backend in ("onnxruntime", "openvino") else "torchscript"),
        "backend": runner.backend,
        "precision": meta.get("precision", "fp32"),
        "input_size": list(fixed) if fixed else "dynamic",
    }
    return model, meta, description, reason


# --------------------------------------------------------------------------- sources


def resolve_source(source: PathLike, *, mirror: Optional[str] = None, progress: bool = True) -> Tuple[Path, Any]:
    """``(file, zoo entry or None)`` of a source: a zoo name is fetched (a cache hit makes no
    request); ``hf://ORG/NAME[@REV]`` is fetched from the Hugging Face Hub, verified and kept as a
    checkpoint (:func:`deeplab.hub.checkpoint_for`); anything else is a path.

    Raises:
        ConfigError: a zoo name of an ImageNet backbone (not a segmentation model).
    """
    from deeplab import zoo

    name = str(source)
    if name.startswith("hf://"):
        from deeplab.hub import checkpoint_for

        return checkpoint_for(name), None
    if name in zoo.ZOO and not Path(name).expanduser().exists():
        entry = zoo.ZOO[name]
        if entry.is_backbone:
            raise ConfigError(f"{name} is an ImageNet backbone, not a segmentation model; build a model with "
                              f"pretrained_backbone=deeplab.zoo.pretrained_path({name!r}) and train it")
        return Path(zoo.pretrained_path(name, mirror=mirror, progress=progress)), entry
    return Path(source).expanduser(), None


def open_model(
    source: PathLike,
    *,
    backend: str = "auto",
    device: Union[str, torch.device] = "cpu",
    precision: Optional[str] = None,
    output_stride: Optional[int] = None,
    optimize: bool = False,
    threads: Optional[int] = None,
    static_shapes: bool = False,
    fixed_input: bool = True,
    mirror: Optional[str] = None,
    progress: bool = True,
) -> Tuple[nn.Module, ModelCard]:
    """Open a checkpoint, an exported file or a zoo name: ``(runner, card)``.

    Args:
        source: a file path or a zoo name (``deeplab weights list``).
        backend: one of :data:`BACKENDS`; ``"auto"`` runs a checkpoint with PyTorch, an ONNX file
            with ONNX Runtime (OpenVINO for bf16 where installed), an IR with OpenVINO.
        device: a checkpoint's device (``"auto"``: CUDA where there is one); exported files run
            on the CPU.
        precision: ``None`` (the file's own), ``"auto"`` (:func:`choose_precision`), ``"fp32"``,
            ``"bf16"`` or ``"int8"``.
        output_stride: rebuild a checkpoint at this output stride; an exported file's is fixed.
        optimize: checkpoints: fold BatchNorm (and fuse, except for bf16) for inference.
        threads, static_shapes: runtime options of exported files.
        fixed_input: wrap an exported graph of one input size in :class:`FixedInputModel`
            (smaller images padded to it and the logits cropped back, larger ones refused with the
            way out); ``False``: the raw runtime, which rejects every other size (LiteRT files are
            always wrapped).
        mirror, progress: where a zoo name is downloaded from, and the download's progress bar.

    Raises:
        ConfigError: a backend, device, precision or output stride the source cannot run with.
        CheckpointError / ExportError / FileNotFoundError: a missing or unreadable file.
    """
    backend = normalize_backend(backend)
    path, entry = resolve_source(source, mirror=mirror, progress=progress)
    kind = sniff_format(path)
    if str(device) == "auto":  # CUDA where there is one for a checkpoint; exported files run on the CPU
        from deeplab.distributed import resolve_device

        device = resolve_device("auto") if kind == "checkpoint" else "cpu"
    if kind == "checkpoint":
        if backend not in ("torch", "auto"):
            raise ConfigError(
                f"{path} is a PyTorch checkpoint; backend {backend!r} runs exported ONNX files - "
                f"export it first: deeplab export --checkpoint {path} --format onnx --out model.onnx"
            )
        return _open_checkpoint(path, source, entry, device=device, precision=precision,
                                output_stride=output_stride, optimize=optimize)
    if kind == "coreml":
        raise ConfigError(f"{path} is a Core ML package: it runs on macOS / iOS only (Core ML has no Linux or "
                          "Windows runtime); open the checkpoint or an ONNX / LiteRT export here")
    if torch.device(device).type != "cpu":
        raise ConfigError(f"{path} runs on the CPU through its runtime backend; drop --device {device}")
    model, meta, description, reason = _open_exported(
        path, kind, backend=backend, precision=precision, threads=threads, static_shapes=static_shapes,
        fixed_input=fixed_input)
    exported_os = getattr(model, "output_stride", None)
    if output_stride is not None and output_stride != exported_os:
        raise ConfigError(
            f"{path} was exported at output stride {exported_os}; an exported model cannot "
            f"change it - export the checkpoint again with --output-stride {output_stride}, "
            "or run the checkpoint itself"
        )
    config = dict(meta.get("config") or meta.get("model_config") or {})
    config.setdefault("num_classes", int(meta["num_classes"]))
    config.setdefault("arch", "?")
    config.setdefault("backbone", "?")
    runner_precision = str(getattr(model, "precision", None) or getattr(getattr(model, "model", None), "precision", "fp32"))
    log.info("deeplab: %s runs at %s: %s", path, runner_precision, reason)
    card = ModelCard(
        source=str(source), path=str(path), kind=kind, config=config, classes=meta.get("classes"),
        palette=meta.get("palette"), normalization=meta["normalization"], dataset=dict(meta.get("dataset") or {}),
        backend=description["backend"], precision=runner_precision, precision_reason=reason, zoo=entry,
        exported=description,
    )
    return model, card


def _open_checkpoint(path: Path, source: PathLike, entry: Any, *, device: Union[str, torch.device],
                     precision: Optional[str], output_stride: Optional[int], optimize: bool) -> Tuple[nn.Module, ModelCard]:
    from deeplab.checkpoint import load_model

    model, ckpt = load_model(path, map_location="cpu", output_stride=output_stride)
    chosen, reason = checkpoint_precision(precision, device)
    log.info("deeplab: %s runs at %s: %s", path, chosen, reason)
    net: nn.Module = model
    if optimize:
        from deeplab.deploy.optimize import optimize_for_inference

        # oneDNN's fused conv calls take no autocast: bf16 runs the unfused (folded, NHWC) form
        net = optimize_for_inference(model, device=device, fuse=False if chosen == "bf16" else None)
    if chosen == "bf16":
        from deeplab.deploy.runtime import AutocastBF16

        net = AutocastBF16(net)
    net = net.to(device)
    card = ModelCard(
        source=str(source), path=str(path), kind="checkpoint", config=dict(ckpt["config"]),
        classes=ckpt.get("classes"), palette=ckpt.get("palette"),
        normalization=ckpt.get("normalization") or model.normalization.to_dict(),
        dataset=dict(ckpt.get("dataset") or {}), backend="torch", precision=chosen, precision_reason=reason,
        zoo=entry, exported=None, device=str(torch.device(device)),
    )
    return net, card
