"""Deployment: BatchNorm folding and CPU fusion, self-describing exports, runtimes with parity.

Modules, in the direction imports flow:

* :mod:`~deeplab.deploy.format` - the file contract both sides read: metadata keys,
  :func:`read_metadata`, ONNX/TorchScript sniffing, :class:`ExportError`. A leaf.
* :mod:`~deeplab.deploy.optimize` - :func:`fold_batchnorm`, :func:`optimize_for_inference`
  (oneDNN conv + activation fusion, channels_last, shifted depthwise convs).
* :mod:`~deeplab.deploy.export` - :func:`export_onnx`, :func:`export_torchscript`,
  :func:`export_model` with embedded metadata, at fp32 / bf16 / int8 (parity stored).
* :mod:`~deeplab.deploy.calibration` - calibration images (and the held-out ones for parity).
* :mod:`~deeplab.deploy.quantize` - int8 QDQ by ONNX Runtime or NNCF, the saturation-safe
  scheme by ISA; :mod:`~deeplab.deploy.accuracy` - accuracy-aware int8 with sensitive layers
  kept float (:func:`~deeplab.deploy.accuracy.quantize_to_bound`).
* :mod:`~deeplab.deploy.tflite` / :mod:`~deeplab.deploy.coreml` - LiteRT and Core ML exports.
* :mod:`~deeplab.deploy.runtime` - ONNX Runtime / OpenVINO / TorchScript / LiteRT backends behind the
  ``model(x) -> logits`` contract (:func:`load_exported`, with the precision it runs at) and the
  one parity measure, :func:`~deeplab.deploy.runtime.measure_parity` (pseudo-label and true mIoU
  delta; :func:`check_parity` is its max logit difference). It reads files through ``format``
  only and imports neither ``export`` nor ``optimize``.
* :mod:`~deeplab.deploy.precision` - the policy: bounds, the gate, what ``precision="auto"`` runs.
* :mod:`~deeplab.deploy.open` - :func:`open_model`, the one way any source is opened.
* :mod:`~deeplab.deploy.bench` - ``deeplab bench``'s measurements (paths);
  :mod:`~deeplab.deploy.limits` - the machine's GEMM limits per precision.
"""

from deeplab.deploy.export import export_model, export_onnx, export_torchscript
from deeplab.deploy.format import ExportError, read_metadata
from deeplab.deploy.optimize import fold_batchnorm, optimize_for_inference
from deeplab.deploy.runtime import check_parity, load_exported

__all__ = [
    "ExportError",
    "check_parity",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "fold_batchnorm",
    "load_exported",
    "optimize_for_inference",
    "read_metadata",
]
