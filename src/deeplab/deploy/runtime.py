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

:func:`check_parity` runs an exported file with one of these backends next to the PyTorch
model and returns ``max |diff|`` of the logits. The file contract (metadata, sniffing) comes
from :mod:`deeplab.deploy.format`; this module never imports the writer.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from deeplab.deploy.format import (
    TORCHSCRIPT_METADATA_FILE,
    ExportError,
    is_onnx,
    quiet_tracing,
    read_metadata,
)

__all__ = [
    "EXPORTED_BACKENDS",
    "ExportedModel",
    "OnnxRuntimeModel",
    "OpenVINOModel",
    "TorchScriptModel",
    "check_parity",
    "load_exported",
]

PathLike = Union[str, "os.PathLike[str]"]

EXPORTED_BACKENDS = ("onnxruntime", "openvino", "torchscript")


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
        return f"backend={self.backend}, path={str(self.path)!r}"


class OnnxRuntimeModel(ExportedModel):
    """An ONNX file run by ONNX Runtime's CPU execution provider."""

    backend = "onnxruntime"

    def __init__(self, path: PathLike, metadata: Optional[Dict[str, Any]] = None, *, threads: Optional[int] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError("the onnxruntime backend needs onnxruntime: pip install 'deeplab[onnx]'") from exc
        super().__init__(path, read_metadata(path) if metadata is None else metadata)
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
    """An ONNX file compiled by OpenVINO for the CPU (fp32, latency hint)."""

    backend = "openvino"

    def __init__(
        self,
        path: PathLike,
        metadata: Optional[Dict[str, Any]] = None,
        *,
        threads: Optional[int] = None,
        static_shapes: bool = False,
        cache_size: int = 4,
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ExportError("the openvino backend needs OpenVINO: pip install 'deeplab[openvino]'") from exc
        super().__init__(path, read_metadata(path) if metadata is None else metadata)
        self._ov = ov
        self.core = ov.Core()
        self.config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": _threads(threads),
            "INFERENCE_PRECISION_HINT": "f32",
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

    def __init__(self, path: PathLike, metadata: Optional[Dict[str, Any]] = None, *, threads: Optional[int] = None) -> None:
        extra = {TORCHSCRIPT_METADATA_FILE: ""}
        try:
            with quiet_tracing():  # torch 2.9+ flags torch.jit as deprecated on every load
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise ExportError(f"cannot load TorchScript file {path}: {str(exc).splitlines()[0]}") from exc
        if metadata is None:
            metadata = read_metadata(path)
        super().__init__(path, metadata)
        self.module = module.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x.float())


def load_exported(
    path: PathLike,
    *,
    backend: str = "auto",
    threads: Optional[int] = None,
    static_shapes: bool = False,
) -> ExportedModel:
    """Open an exported file with a runtime backend.

    Args:
        path: an ``.onnx`` or TorchScript file written by :mod:`deeplab.deploy.export`.
        backend: ``"onnxruntime"``, ``"openvino"``, ``"torchscript"`` or ``"auto"`` (ONNX
            Runtime for ONNX files, TorchScript otherwise). ``"torch"`` is accepted as
            ``"torchscript"`` for TorchScript files.
        threads: intra-op threads (default: torch's thread count).
        static_shapes: OpenVINO only - compile per input shape.

    Raises:
        FileNotFoundError: no such file.
        ExportError: wrong backend for the file type, backend not installed, no metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    onnx_file = is_onnx(path)
    if backend == "auto":
        backend = "onnxruntime" if onnx_file else "torchscript"
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
        return OnnxRuntimeModel(path, threads=threads)
    if backend == "openvino":
        return OpenVINOModel(path, threads=threads, static_shapes=static_shapes)
    return TorchScriptModel(path, threads=threads)


def check_parity(
    model: nn.Module,
    path: PathLike,
    inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    backend: str = "auto",
) -> float:
    """``max |exported(x) - model(x)|`` over the logits of every input in ``inputs``.

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
    model = model.eval()
    worst = 0.0
    for x in [inputs] if isinstance(inputs, torch.Tensor) else list(inputs):
        x = x.float().cpu()
        with torch.no_grad():
            ref = model(x)
            out = runner(x)
        if out.shape != ref.shape:
            raise ExportError(f"exported model returned {tuple(out.shape)} for {tuple(x.shape)}, expected {tuple(ref.shape)}")
        worst = max(worst, (out.float() - ref.float()).abs().max().item())
    return worst
