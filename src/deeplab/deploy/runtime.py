"""Runtime backends: an exported file behind the package's model contract.

Every backend here is an ``nn.Module`` whose ``forward`` takes normalised images
``(B, 3, H, W)`` float32 and returns logits ``(B, C, H, W)`` (a CPU tensor), and which carries
``output_stride``, ``align_corners``, ``num_classes`` and the export ``metadata``. So
:func:`deeplab.eval.inference.predict_probs` - whole / sliding window / multi-scale / flip -
runs an ONNX Runtime session or an OpenVINO compiled model exactly as it runs the PyTorch
model.

* ``onnxruntime``: ``ORT_ENABLE_ALL`` graph optimisations, sequential execution,
  ``intra_op_num_threads`` = torch's thread count (the machine's cores by default).
* ``openvino``: reads the ONNX file directly; ``PERFORMANCE_HINT=LATENCY``, fp32 inference
  precision, the same thread count. Shapes stay dynamic unless ``static_shapes=True``, which
  compiles once per input shape (cached) - faster per call when sizes repeat.
* ``torchscript``: ``torch.jit.load`` of a file written by ``deeplab export --format torchscript``.
* ``tflite``: the LiteRT interpreter (``ai-edge-litert``, XNNPACK) on a ``.tflite`` file from
  ``deeplab export --format tflite``: a fixed input size, one image per invoke; int8 files take
  and give int8 tensors, (de)quantized here with the scales in the file.

Precision (``load_exported(precision=...)``, default the file's own ``metadata["precision"]``,
fp32 for files exported before precisions existed) is recorded on the loaded model
(``model.precision``): OpenVINO runs ``bf16`` with ``INFERENCE_PRECISION_HINT=bf16``;
TorchScript runs it under ``torch.autocast("cpu", torch.bfloat16)``
(:class:`AutocastBF16`, also what ``Segmenter`` wraps an eager model in); ONNX Runtime's CPU
provider has no bf16 path (ask OpenVINO). An int8 file runs as int8 in either ONNX runtime.

:func:`check_parity` runs an exported file with one of these backends next to the PyTorch
model and returns ``max |diff|`` of the logits. The file contract (metadata, sniffing) comes
from :mod:`deeplab.deploy.format`; this module never imports the writer.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deeplab._utils import DeeplabError, optional_import
from deeplab.deploy.format import (
    TORCHSCRIPT_METADATA_FILE,
    ExportError,
    is_onnx,
    is_tflite,
    quiet_tracing,
    read_metadata,
)

__all__ = [
    "AutocastBF16",
    "EXPORTED_BACKENDS",
    "ExportedModel",
    "FixedInputModel",
    "InputSizeError",
    "OnnxRuntimeModel",
    "OpenVINOModel",
    "TFLiteModel",
    "TorchScriptModel",
    "check_parity",
    "load_exported",
    "measure_parity",
]

PathLike = Union[str, "os.PathLike[str]"]

EXPORTED_BACKENDS = ("onnxruntime", "openvino", "torchscript", "tflite")
RUNTIME_PRECISIONS = ("fp32", "bf16", "int8")
# which precisions each backend can run a file at
BACKEND_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8"),
                      "torchscript": ("fp32", "bf16"), "tflite": ("fp32", "int8")}


def file_precision(metadata: Dict[str, Any]) -> str:
    """The precision a file was exported at (``"fp32"`` for files from before precisions)."""
    return str(metadata.get("precision") or "fp32")


def resolve_precision(path: PathLike, metadata: Dict[str, Any], backend: str, precision: Optional[str]) -> str:
    """The precision ``backend`` runs the file at: ``precision``, or the file's own.

    Raises:
        ExportError: the file or the backend cannot run at that precision (the message says what to do).
    """
    stored = file_precision(metadata)
    wanted = precision or stored
    if wanted not in RUNTIME_PRECISIONS:
        raise ValueError(f"unknown precision {wanted!r}; choose from {list(RUNTIME_PRECISIONS)}")
    if stored == "int8" and wanted != "int8":
        raise ExportError(
            f"{path} holds int8 weights and cannot run at {wanted}; export the checkpoint again with --precision {wanted}"
        )
    if wanted == "int8" and stored != "int8":
        raise ExportError(f"{path} is a {stored} export; for int8 export it with --precision int8 and calibration images")
    if wanted == "int8":
        from deeplab.cpu import int8_scheme_runs_here

        scheme = str((metadata.get("quantization") or {}).get("scheme") or "u8s8")
        runs, why = int8_scheme_runs_here(scheme)
        if not runs:
            raise ExportError(f"{path} cannot run as int8 on this CPU: {why}")
    if wanted not in BACKEND_PRECISIONS[backend]:
        hint = "run it with backend 'openvino'" if backend == "onnxruntime" else "export it as ONNX"
        raise ExportError(f"backend {backend!r} cannot run {path} at {wanted} (it runs {list(BACKEND_PRECISIONS[backend])}); {hint}")
    return wanted


class AutocastBF16(nn.Module):
    """Runs ``module`` under ``torch.autocast("cpu", dtype=torch.bfloat16)``; returns float32 logits.

    Autocast runs convs and matmuls in bfloat16 (oneDNN's AVX-512 BF16 / AMX kernels) and keeps
    reductions and softmax-like ops in float32. The attributes the inference code reads
    (``output_stride``, ``align_corners``, ``num_classes``, ``config``, ``normalization``) are
    passed through.
    """

    precision = "bf16"

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        for name in ("output_stride", "align_corners", "num_classes", "config", "normalization"):
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(x).float()


def _threads(threads: Optional[int]) -> int:
    return int(threads) if threads else max(1, torch.get_num_threads())


class ExportedModel(nn.Module):
    """Base class: an exported model that follows the ``model(x) -> logits`` contract.

    Attributes:
        path: the exported file.
        metadata: the embedded metadata (classes, palette, normalization, config...).
        output_stride, align_corners, num_classes: read from the metadata, as
            :func:`~deeplab.eval.inference.predict_probs` expects them on a model.
    """

    backend = "?"

    def __init__(self, path: PathLike, metadata: Dict[str, Any]) -> None:
        super().__init__()
        self.path = Path(path)
        self.metadata = metadata
        self.output_stride = int(metadata.get("output_stride", 16))
        self.align_corners = bool(metadata.get("align_corners", False))
        self.num_classes = int(metadata.get("num_classes", 0))
        self.precision = file_precision(metadata)
        self.eval()

    def _run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a float image batch (B, 3, H, W), got {shape}")
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.asarray(self._run(array)))

    def extra_repr(self) -> str:
        return f"backend={self.backend}, precision={self.precision}, path={str(self.path)!r}"


class OnnxRuntimeModel(ExportedModel):
    """An ONNX file run by ONNX Runtime's CPU execution provider."""

    backend = "onnxruntime"

    def __init__(self, path: PathLike, metadata: Optional[Dict[str, Any]] = None, *, threads: Optional[int] = None,
                 precision: Optional[str] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError("the onnxruntime backend needs onnxruntime: pip install 'deeplab[onnx]'") from exc
        super().__init__(path, read_metadata(path) if metadata is None else metadata)
        self.precision = resolve_precision(path, self.metadata, self.backend, precision)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = _threads(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVINOModel(ExportedModel):
    """An ONNX file compiled by OpenVINO for the CPU (latency hint; fp32, or bf16 by
    ``INFERENCE_PRECISION_HINT``; an int8 file's QDQ nodes run as int8 kernels)."""

    backend = "openvino"

    def __init__(
        self,
        path: PathLike,
        metadata: Optional[Dict[str, Any]] = None,
        *,
        threads: Optional[int] = None,
        static_shapes: bool = False,
        cache_size: int = 4,
        precision: Optional[str] = None,
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ExportError("the openvino backend needs OpenVINO: pip install 'deeplab[openvino]'") from exc
        super().__init__(path, read_metadata(path) if metadata is None else metadata)
        self.precision = resolve_precision(path, self.metadata, self.backend, precision)
        self._ov = ov
        self.core = ov.Core()
        self.config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": _threads(threads),
            # int8 files: the layers left in float stay fp32 (bf16 would add its own error)
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
        }
        self.static_shapes = static_shapes
        self.cache_size = cache_size
        self._compiled: "OrderedDict[Any, Any]" = OrderedDict()
        if not static_shapes:
            self._compiled[None] = self.core.compile_model(self.core.read_model(str(self.path)), "CPU", self.config)

    def compiled_for(self, shape: Any) -> Any:
        """The compiled model for an input shape (one dynamic model unless ``static_shapes``)."""
        key = tuple(shape) if self.static_shapes else None
        compiled = self._compiled.get(key)
        if compiled is None:
            assert key is not None  # the dynamic model is compiled up front, in __init__
            model = self.core.read_model(str(self.path))
            model.reshape({model.inputs[0].get_any_name(): self._ov.PartialShape(list(key))})
            compiled = self.core.compile_model(model, "CPU", self.config)
            self._compiled[key] = compiled
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return compiled

    def _run(self, x: np.ndarray) -> np.ndarray:
        compiled = self.compiled_for(x.shape)
        return compiled(x)[compiled.outputs[0]]


class TorchScriptModel(ExportedModel):
    """A TorchScript file from ``deeplab export --format torchscript``."""

    backend = "torchscript"

    def __init__(self, path: PathLike, metadata: Optional[Dict[str, Any]] = None, *, threads: Optional[int] = None,
                 precision: Optional[str] = None) -> None:
        extra = {TORCHSCRIPT_METADATA_FILE: ""}
        try:
            with quiet_tracing():  # torch 2.9+ flags torch.jit as deprecated on every load
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise ExportError(f"cannot load TorchScript file {path}: {str(exc).splitlines()[0]}") from exc
        if metadata is None:
            metadata = read_metadata(path)
        super().__init__(path, metadata)
        self.precision = resolve_precision(path, self.metadata, self.backend, precision)
        self.module = module.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.module(x.float()).float()


class TFLiteModel(ExportedModel):
    """A LiteRT (TFLite) file from ``deeplab export --format tflite``, run by the LiteRT
    interpreter. Its input size is fixed (:attr:`input_size`); :class:`FixedInputModel`
    pads other sizes to it."""

    backend = "tflite"

    def __init__(self, path: PathLike, metadata: Optional[Dict[str, Any]] = None, *, threads: Optional[int] = None,
                 precision: Optional[str] = None) -> None:
        interpreter = optional_import("ai_edge_litert.interpreter")
        if interpreter is None:
            raise ExportError("the tflite backend needs the LiteRT interpreter: pip install ai-edge-litert")
        super().__init__(path, read_metadata(path) if metadata is None else metadata)
        self.precision = resolve_precision(path, self.metadata, self.backend, precision)
        self.interpreter = interpreter.Interpreter(model_path=str(self.path), num_threads=_threads(threads))
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        shape = [int(v) for v in self.input["shape"]]
        self.input_size: Tuple[int, int] = (shape[2], shape[3])

    def _run(self, x: np.ndarray) -> np.ndarray:
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{self.path} takes {self.input_size[0]}x{self.input_size[1]} inputs, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        outputs = []
        for item in x:  # the graph's batch is 1
            self.interpreter.set_tensor(self.input["index"], _quantized(item[None], self.input))
            self.interpreter.invoke()
            outputs.append(_dequantized(self.interpreter.get_tensor(self.output["index"]), self.output))
        return np.concatenate(outputs)


class InputSizeError(DeeplabError, ValueError):
    """An image larger than a fixed-size graph takes (a per-image error: the other images still run)."""


class FixedInputModel(nn.Module):
    """An exported model with a fixed input size behind the any-size contract: smaller inputs
    are padded at the bottom/right with 0 (the mean pixel, as ``--pad-to`` does) and the logits
    cropped back; larger ones are refused with the way out (sliding windows of that size)."""

    def __init__(self, model: ExportedModel, size: Tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.output_stride = model.output_stride
        self.align_corners = model.align_corners
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        fh, fw = self.size
        if h > fh or w > fw:
            raise InputSizeError(
                f"{self.model.path} was exported for {fh}x{fw} inputs only and this image needs {h}x{w}; "
                f"run it with --mode slide --crop-size {min(fh, fw)} (square windows that fit), or re-export with `deeplab export` "
                + ("--input-size H W (LiteRT graphs have one size)" if getattr(self.model, "backend", None) == "tflite"
                   else "(dynamic height and width)")
            )
        logits = self.model(F.pad(x, (0, fw - w, 0, fh - h), value=0.0))
        return logits[..., :h, :w]


def _quantized(x: np.ndarray, detail: Dict[str, Any]) -> np.ndarray:
    """``x`` as the tensor ``detail`` describes: float as is, int8/uint8 by its scale and zero point."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantized(y: np.ndarray, detail: Dict[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32, copy=False)
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def auto_backend(path: PathLike, precision: str) -> str:
    """The runtime ``backend="auto"`` picks for an exported file run at ``precision``: ONNX Runtime
    for ONNX files (OpenVINO for bf16 where it is installed: ONNX Runtime's CPU provider has no bf16
    path), LiteRT for ``.tflite`` files, TorchScript otherwise."""
    if is_tflite(path):
        return "tflite"
    if not is_onnx(path):
        return "torchscript"
    return "openvino" if precision == "bf16" and optional_import("openvino") is not None else "onnxruntime"


def load_exported(
    path: PathLike,
    *,
    backend: str = "auto",
    threads: Optional[int] = None,
    static_shapes: bool = False,
    precision: Optional[str] = None,
    metadata: Optional[Dict[str, Any]] = None,
) -> ExportedModel:
    """Open an exported file with a runtime backend.

    Args:
        path: an ``.onnx``, TorchScript or ``.tflite`` file written by :mod:`deeplab.deploy.export`.
        backend: ``"onnxruntime"``, ``"openvino"``, ``"torchscript"``, ``"tflite"`` or ``"auto"``
            (ONNX Runtime for ONNX files, LiteRT for ``.tflite``, TorchScript otherwise; OpenVINO
            for a bf16 ONNX file where it is installed). ``"torch"`` is accepted as ``"torchscript"`` for
            TorchScript files.
        threads: intra-op threads (default: torch's thread count).
        static_shapes: OpenVINO only - compile per input shape.
        precision: ``"fp32"``, ``"bf16"``, ``"int8"`` or ``None`` (the file's own); recorded
            as ``model.precision``.
        metadata: the file's metadata when the caller already has it (else read from the file).

    Raises:
        FileNotFoundError: no such file.
        ExportError: wrong backend for the file type, backend not installed, no metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if is_tflite(path) or backend == "tflite":
        if not is_tflite(path) or backend not in ("auto", "tflite"):
            raise ExportError(f"{path}: LiteRT (.tflite) files run with backend 'tflite' (or auto), and only they do")
        return TFLiteModel(path, metadata, threads=threads, precision=precision)
    onnx_file = is_onnx(path)
    if backend == "auto":
        backend = auto_backend(path, precision or file_precision(metadata or read_metadata(path)))
    if backend == "torch" and not onnx_file:
        backend = "torchscript"
    if backend not in EXPORTED_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {['auto', *EXPORTED_BACKENDS]}")
    if onnx_file and backend == "torchscript":
        raise ExportError(f"{path} is an ONNX file; run it with backend 'onnxruntime' or 'openvino'")
    if not onnx_file and backend != "torchscript":
        raise ExportError(
            f"{path} is a TorchScript file; backend {backend!r} runs ONNX files - export with "
            "`deeplab export --format onnx` or use backend 'torch'"
        )
    if backend == "onnxruntime":
        return OnnxRuntimeModel(path, metadata, threads=threads, precision=precision)
    if backend == "openvino":
        return OpenVINOModel(path, metadata, threads=threads, static_shapes=static_shapes, precision=precision)
    return TorchScriptModel(path, metadata, threads=threads, precision=precision)


def _miou(confusion: np.ndarray) -> Optional[float]:
    """Mean IoU (0-100) of a ``labels x predictions`` confusion matrix over the classes that occur in
    the labels (as ``deeplab eval`` counts them)."""
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = confusion.sum(1) > 0
    return float(100.0 * (inter[present] / union[present]).mean()) if present.any() else None


def _confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    keep = labels != ignore_index
    index = labels[keep].astype(np.int64) * num_classes + preds[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def measure_parity(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    inputs: Sequence[Union[np.ndarray, torch.Tensor]],
    *,
    sizes: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
    masks: Optional[Sequence[Optional[np.ndarray]]] = None,
    ignore_index: int = 255,
    min_class_fraction: float = 1e-3,
) -> Dict[str, Any]:
    """How closely ``candidate`` reproduces ``reference`` (the fp32 model): the one parity measure.

    The gate of a bf16/int8 export is accuracy, not pixels: the **pseudo-label mIoU** is the mIoU
    of the candidate's argmax against the reference's argmax taken as labels (the reference
    scores 100 on them), accumulated over all inputs; ``miou_delta = 100 - pseudo_miou`` is what
    :data:`deeplab.deploy.precision.PARITY_BOUNDS` bounds. A class enters it where the reference
    predicts it on at least ``min_class_fraction`` of the pixels (its other pixels are ignored):
    an annotated mask has no one-pixel objects, and a class of 3 stray pixels would move the mean
    by ``100 / classes`` when one of them flips (measured: the demo model's held-out photo has
    fp32 classes of 1 and 3 pixels out of 187,500; with them the pseudo-label mIoU reads 66.7,
    without them 96+). Where ground-truth ``masks`` are given the true mIoU of both is measured
    too (``true_miou_delta = fp32 - candidate``).

    Args:
        reference, candidate: ``x (B, 3, H, W) -> logits (B, C, H, W)`` (modules are put in eval mode).
        inputs: preprocessed inputs (e.g. the held-out calibration images).
        sizes: per input, the ``(h, w)`` of the image inside its padding (``None``: all of it).
        masks: per input, an ``(h, w)`` class-id mask (``ignore_index`` = ignore) or ``None``.
        min_class_fraction: the least share of all compared pixels a reference class needs to
            count in the pseudo-label mIoU.

    Returns:
        ``{"images", "pixel_agreement", "min_pixel_agreement", "max_logit_diff",
        "mean_abs_logit_diff", "pseudo_miou", "miou_delta"}`` plus ``"true_miou_fp32",
        "true_miou", "true_miou_delta", "masks"`` when masks were given.

    Raises:
        ExportError: the candidate returns logits of another shape.
    """
    for fn in (reference, candidate):
        if isinstance(fn, nn.Module):
            fn.eval()
    agreements: List[float] = []
    worst, mean_abs = 0.0, []
    pseudo: Optional[np.ndarray] = None
    truth: List[np.ndarray] = [np.zeros(0), np.zeros(0)]
    with_masks = 0
    for index, item in enumerate(inputs):
        x = item if isinstance(item, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32))
        x = x.float().cpu()
        with torch.no_grad():
            ref = reference(x).float()
            out = candidate(x).float()
        if out.shape != ref.shape:
            raise ExportError(f"exported model returned {tuple(out.shape)} for {tuple(x.shape)}, expected {tuple(ref.shape)}")
        size = sizes[index] if sizes is not None else None
        h, w = size if size is not None else ref.shape[-2:]
        ref, out = ref[..., :h, :w], out[..., :h, :w]
        diff = (out.double() - ref.double()).abs()
        worst = max(worst, diff.max().item())
        mean_abs.append(diff.mean().item())
        num_classes = ref.shape[1]
        ref_ids, out_ids = ref.argmax(1).numpy(), out.argmax(1).numpy()
        agreements.append(float((ref_ids == out_ids).mean()))
        conf = _confusion(ref_ids, out_ids, num_classes, ignore_index=-1)
        pseudo = conf if pseudo is None else pseudo + conf
        mask = masks[index] if masks is not None else None
        if mask is not None:
            labels = np.broadcast_to(np.asarray(mask)[None, :h, :w], ref_ids.shape)
            conf_ref = _confusion(labels, ref_ids, num_classes, ignore_index)
            conf_out = _confusion(labels, out_ids, num_classes, ignore_index)
            truth = [conf_ref, conf_out] if not with_masks else [truth[0] + conf_ref, truth[1] + conf_out]
            with_masks += 1
    pseudo_miou, dropped = None, []
    if pseudo is not None:
        pixels = pseudo.sum(1)
        dropped = [c for c in range(len(pixels)) if 0 < pixels[c] < min_class_fraction * pixels.sum()]
        kept = pseudo.copy()
        kept[dropped, :] = 0  # those reference pixels are ignored, as unannotated pixels are
        pseudo_miou = _miou(kept)
    result: Dict[str, Any] = {
        "images": len(agreements),
        "pixel_agreement": float(np.mean(agreements)) if agreements else None,
        "min_pixel_agreement": float(min(agreements)) if agreements else None,
        "max_logit_diff": worst,
        "mean_abs_logit_diff": float(np.mean(mean_abs)) if mean_abs else None,
        "pseudo_miou": pseudo_miou,
        "miou_delta": None if pseudo_miou is None else 100.0 - pseudo_miou,
        "min_class_fraction": min_class_fraction,
        "ignored_classes": dropped,
    }
    if with_masks:
        fp32_miou, cand_miou = _miou(truth[0]), _miou(truth[1])
        result.update(masks=with_masks, true_miou_fp32=fp32_miou, true_miou=cand_miou,
                      true_miou_delta=None if fp32_miou is None or cand_miou is None else fp32_miou - cand_miou)
    return result


def check_parity(
    model: nn.Module,
    path: PathLike,
    inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    backend: str = "auto",
) -> float:
    """``max |exported(x) - model(x)|`` over the logits of every input in ``inputs``
    (:func:`measure_parity`'s ``max_logit_diff`` of an exported file against its model).

    Args:
        model: the PyTorch model that was exported (unfolded is fine).
        path: the exported file.
        inputs: one ``(B, 3, H, W)`` tensor or several (e.g. of different sizes, to check
            that the shapes really are dynamic).
        backend: ``"onnxruntime"``, ``"openvino"``, ``"torchscript"`` or ``"auto"`` (ONNX
            Runtime for ONNX files, TorchScript otherwise).

    Returns:
        The largest ``max |diff|`` of logits over the inputs.

    Raises:
        ExportError: the file cannot be run, or it returns logits of another shape.
    """
    runner = load_exported(path, backend=backend)
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    return float(measure_parity(model, runner, batches)["max_logit_diff"])
