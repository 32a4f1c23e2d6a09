"""LiteRT (TFLite) export: ``deeplab export --format tflite``.

The model goes from PyTorch to LiteRT directly with Google's maintained converter,
``litert-torch`` (``torch.export`` -> StableHLO -> the TFLite flatbuffer); no ONNX or TensorFlow
graph in between. The file follows the package's exported-file contract:

* **input** ``(1, 3, H, W)`` float32, normalised as the model was trained, NCHW (the PyTorch
  layout; the converter places the layout changes inside the graph). The size is fixed
  (``input_size``, default 513 x 513, the paper's eval crop): LiteRT's CPU delegate cannot
  re-plan this graph for another size, so the runtime
  (:class:`deeplab.deploy.runtime.TFLiteModel`) pads smaller images at the bottom/right and
  crops the logits back, as ``--pad-to`` does. **output** ``(1, C, H, W)`` float32 logits.
* **metadata**: the deeplab JSON (classes, palette, normalisation, config, precision, parity) as
  the flatbuffer's ``metadata`` entry ``"deeplab"``.
* **int8**: full-integer quantization (int8 weights per channel, int8 activations, int8 input
  and output tensors with their scales in the file), calibrated on the same images as the ONNX
  path through the converter's PT2E quantizer; its accuracy against fp32 is measured on the
  held-out images and gated by the same bound (:data:`deeplab.deploy.precision.PARITY_BOUNDS`).

litert-torch pins ``typing_extensions`` 4.12 and pulls ``transformers`` and ``huggingface_hub``
2.x, so it cannot share an environment with the test extra's pins: install ``deeplab[tflite]``
in an environment of its own to *convert*. Running a ``.tflite`` file needs only
``ai-edge-litert`` (the LiteRT interpreter), which installs anywhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deeplab._utils import atomic_write, optional_import
from deeplab.deploy.format import FIXED_INPUT_SIZE, METADATA_KEY, ExportError, quiet_tracing

if TYPE_CHECKING:
    from deeplab.deploy.calibration import CalibrationSet

__all__ = ["INSTALL_HINT", "add_metadata", "export_tflite", "fit_to_size"]

PathLike = Union[str, "os.PathLike[str]"]
INSTALL_HINT = ("pip install 'deeplab[tflite]' in an environment of its own (litert-torch pins typing_extensions "
                "4.12 and pulls transformers / huggingface_hub 2.x; see docs/sharing.md)")


def _litert_torch() -> Any:
    # The converter's progress lines, C++ info logs and optional-kernel warnings say nothing to a user.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    module = optional_import("litert_torch")
    if module is None:
        raise ExportError(f"--format tflite converts with litert-torch, which is not installed: {INSTALL_HINT}")
    return module


def _litert_friendly(model: nn.Module) -> nn.Module:
    """``model``, in place, with the image pooling's broadcast written as a multiply (the values do
    not change): the converter turns ``expand`` into a ``BROADCAST_TO`` the LiteRT kernels refuse."""
    from deeplab.models.aspp import ImagePooling

    for module in model.modules():
        if isinstance(module, ImagePooling):
            module.broadcast_by_multiply = True
    return model


def fit_to_size(array: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """A ``(1, C, h, w)`` array padded with 0 (the mean pixel) at the bottom/right, or cropped,
    to ``size``: how a fixed-size graph sees an image."""
    h, w = size
    x = torch.from_numpy(np.ascontiguousarray(array[..., :h, :w], dtype=np.float32))
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), value=0.0).numpy()


def _convert_fp32(model: nn.Module, example: torch.Tensor) -> bytes:
    litert_torch = _litert_torch()
    with quiet_tracing(), torch.no_grad():
        return bytes(litert_torch.convert(model, (example,)).model_content())


def _convert_int8(model: nn.Module, example: torch.Tensor, calibration: Sequence[np.ndarray]) -> bytes:
    """Full-integer int8 through the converter's PT2E quantizer: symmetric per-channel int8 weights
    (min/max), int8 activations from histograms of the calibration images. The quantizer cannot
    leave single layers float (``set_module_name(name, None)`` is refused), so unlike the ONNX path
    there is no mixed precision: every layer is int8 and the accuracy gate decides."""
    litert_torch = _litert_torch()
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    size = (int(example.shape[-2]), int(example.shape[-1]))
    with quiet_tracing(), torch.no_grad():
        graph = torch.export.export(model, (example,)).module()
        graph = prepare_pt2e(graph, quantizer)
        for array in calibration:
            graph(torch.from_numpy(fit_to_size(array, size)))
        graph = convert_pt2e(graph, fold_quantize=False)
        move_exported_model_to_eval(graph)
        graph.training = False  # its ops are eval's already (exported in eval mode); only the flag lags
        edge = litert_torch.convert(graph, (example,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
    return bytes(edge.model_content())


def add_metadata(data: bytes, metadata: Mapping[str, Any]) -> bytes:
    """``data`` (a TFLite flatbuffer) with ``metadata`` as its ``"deeplab"`` metadata entry
    (replacing one that is there)."""
    import json

    schema = optional_import("ai_edge_litert.schema_py_generated")
    if schema is None:
        raise ExportError(f"writing LiteRT metadata needs ai-edge-litert: {INSTALL_HINT}")
    import flatbuffers

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    model.buffers = list(model.buffers or []) + [buffer]
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name not in (METADATA_KEY, METADATA_KEY.encode())] + [entry]
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def export_tflite(
    model: nn.Module,
    path: PathLike,
    *,
    metadata: Mapping[str, Any],
    input_size: Tuple[int, int] = FIXED_INPUT_SIZE,
    precision: str = "fp32",
    calibration: Optional["CalibrationSet"] = None,
) -> Path:
    """Convert ``model`` (BatchNorm already folded, eval mode, CPU; its image pooling is switched to
    the converter-friendly form in place) to a LiteRT file at ``path``.

    Args:
        metadata: the deeplab JSON to embed (``precision`` is set here).
        input_size: the fixed ``(H, W)`` of the graph's input.
        precision: ``"fp32"`` or ``"int8"`` (full integer; needs ``calibration``).
        calibration: calibration images (:func:`deeplab.deploy.calibration.calibration_set`).

    Raises:
        ExportError: litert-torch is not installed, int8 without calibration images, an
            unsupported precision, or the conversion failed.
    """
    if precision not in ("fp32", "int8"):
        raise ExportError(f"LiteRT export writes fp32 or int8 files, not {precision}; pass --precision fp32 or int8")
    if precision == "int8" and (calibration is None or not calibration.calibration):
        raise ExportError("int8 LiteRT export needs calibration images: pass --calib-data DIR or --dataset NAME --data-root ROOT")
    h, w = (int(v) for v in input_size)
    channels = int(getattr(model, "in_channels", 3) or 3)
    example = torch.zeros(1, channels, h, w)
    model = _litert_friendly(model)
    try:
        if precision == "int8":
            assert calibration is not None
            data = _convert_int8(model, example, calibration.calibration)
        else:
            data = _convert_fp32(model, example)
    except ExportError:
        raise
    except Exception as exc:  # the converter raises anything from torch.export to MLIR errors
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(f"litert-torch could not convert the model: {first}") from exc
    meta: Dict[str, Any] = dict(metadata)
    meta.update(precision=precision, input_size=[h, w])
    if precision == "int8":
        meta["quantization"] = {"tool": "litert-torch", "method": "pt2e histogram", "weights": "int8 symmetric per-channel",
                                "activations": "int8 per-tensor", "scheme": "s8s8", "keep_float": [],
                                "scheme_reason": "LiteRT's s8 x s8 kernels accumulate in int32 on any CPU"}
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(add_metadata(data, meta))
    return path

