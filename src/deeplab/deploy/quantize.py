"""int8 quantization of exported ONNX files, calibration data, and parity against fp32.

* :func:`~deeplab.deploy.calibration.calibration_set` (in :mod:`deeplab.deploy.calibration`,
  re-exported here) - images for calibration (and held out for parity) from a folder of images
  or from a dataset, preprocessed exactly as inference sees them.
* :func:`quantize_onnx` - ONNX Runtime static quantization: QDQ format, per-channel int8
  weights (symmetric), uint8 activations (asymmetric, the u8 x s8 pairing VNNI and AMX
  multiply natively), calibration by :data:`CALIBRATION_METHODS`.
* :func:`quantize_openvino` - the same with OpenVINO NNCF (``pip install 'deeplab[openvino]'``),
  written as an ONNX file with QDQ nodes both runtimes read.
* :func:`deeplab.deploy.accuracy.quantize_to_bound` - accuracy-aware int8: quantize, measure the
  gate's mIoU delta against fp32 on the held-out images, and while it is over the bound keep
  the most sensitive layers in float. With ``"nncf"`` that is NNCF's own accuracy control
  (``nncf.quantize_with_accuracy_control``, :mod:`deeplab.deploy.nncf_control`) validated by the gate.

Which layers stay float (:data:`KEEP_FLOAT`), decided by measurement on the demo model
(MobileNetV2 after ``deeplab demo``, mIoU on its 4 photos, fp32 51.32):

* the final 1x1 logits conv (``classifier``), ASPP's image-pooling branch and the resizes stay
  float: with them float NNCF int8 gives 51.40 mIoU and 97.7% pixel agreement, with them
  quantized 51.11 / 97.6% (ONNX Runtime MinMax 50.32 vs 50.03). They are ~0.1% of the MACs (the
  image pool is a 1x1 conv on a 1x1 map, the resizes are memory-bound), so float costs nothing.
* everything else is int8: keeping the stem conv float (MinMax 46.2), the depthwise convs
  (39.1; a float island between int8 layers adds requantization error) or the decoder (50.38,
  +0.06 for ~10% of the MACs) did not pay.

Calibration methods (:data:`CALIBRATION_METHODS`), calibrated and evaluated on all 4 photos
with ONNX Runtime: NNCF 51.40, percentile 50.58, MinMax 50.32, entropy 45.62; per-tensor
instead of per-channel weights 36.89. Held out (calibrated on 3, see
``benchmarks/deploy_precision.py``) the default became percentile: see
:data:`DEFAULT_CALIBRATION_METHOD`. Four photos are a tiny sample: on them the *same* int8 file
scores 45.4 mIoU in ONNX Runtime and 50.6 in OpenVINO (their requantization rounds
differently and small classes flip), so differences under ~5 mIoU on all 4 are noise; the
held-out photo moves by tenths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from deeplab._utils import optional_import
from deeplab.data.base import IMAGE_SUFFIXES  # the one suffix list
from deeplab.deploy.calibration import (  # re-exported: the calibration data lived here
    DEFAULT_CALIBRATION_IMAGES,
    CalibrationError,
    CalibrationSet,
    calibration_set,
    prepare_image,
)
from deeplab.deploy.format import ExportError
from deeplab.deploy.runtime import measure_parity

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_CALIBRATION_METHOD",
    "FALLBACK_CALIBRATION_METHOD",
    "IMAGE_SUFFIXES",
    "KEEP_FLOAT",
    "NNCFSetup",
    "CalibrationError",
    "CalibrationSet",
    "calibration_set",
    "conv_input_tensors",
    "default_calibration_method",
    "float_node_names",
    "measure_parity",
    "nncf_setup",
    "pad_to_common",
    "prepare_image",
    "quantize",
    "quantize_onnx",
    "quantize_openvino",
    "resolve_scheme",
    "set_cached_ranges",
]

PathLike = Union[str, "os.PathLike[str]"]

# name -> onnxruntime.quantization.CalibrationMethod member name ("nncf": OpenVINO NNCF's own)
CALIBRATION_METHODS: Dict[str, str] = {
    "nncf": "NNCF", "percentile": "Percentile", "minmax": "MinMax", "entropy": "Entropy",
}
# Measured on the demo model (MobileNetV2, benchmarks/deploy_precision.py, calibrated on 3 VOC
# photos, the 4th held out): percentile is within 0.5 mIoU of fp32 on the held-out photo in
# both runtimes and its QDQ graph runs 2.8-2.9x ORT fp32 in both. NNCF's file is as accurate
# but ONNX Runtime does not fuse its QDQ pattern (0.66x fp32 there; OpenVINO 2.3x): pick
# "nncf" for OpenVINO deployments.
DEFAULT_CALIBRATION_METHOD = "percentile"
FALLBACK_CALIBRATION_METHOD = "percentile"

# Layer groups that may stay float -> how to find their nodes in an exported graph.
LAYER_GROUPS = ("logits", "image_pool", "resize", "stem", "depthwise", "decoder")
KEEP_FLOAT: Tuple[str, ...] = ("logits", "image_pool", "resize")
# NNCF measures its own ranges: the ones a --qat run tracked need ONNX Runtime's quantizer
QAT_NEEDS_ORT = ("the ranges a --qat run tracked go into ONNX Runtime's quantizer; pass --calib-method percentile "
                 "(or minmax / entropy for the tensors QAT did not track)")


# --------------------------------------------------------------------------- ONNX Runtime


def float_node_names(model: Any, keep: Sequence[str] = KEEP_FLOAT) -> List[str]:
    """Names of the nodes of an ONNX ``model`` (a ``ModelProto``) in the layer groups ``keep``.

    Groups: ``"logits"`` - the conv whose output the final resize (or the graph output)
    reads; ``"image_pool"`` - every node under ``/image_pool/`` (ASPP's image-level
    features); ``"resize"`` - every ``Resize`` node.

    Raises:
        ValueError: an unknown group (the message lists them).
    """
    unknown = [k for k in keep if k not in LAYER_GROUPS]
    if unknown:
        raise ValueError(f"unknown layer group(s) {unknown}; choose from {list(LAYER_GROUPS)}")
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    names: List[str] = []
    if "logits" in keep:
        tensor = model.graph.output[0].name
        node = producer.get(tensor)
        # walk back through the final resize / casts to the conv that makes the logits
        while node is not None and node.op_type != "Conv":
            node = producer.get(node.input[0]) if node.input else None
        if node is not None:
            names.append(node.name)
    if "image_pool" in keep:
        names += [n.name for n in nodes if "/image_pool/" in n.name and n.name not in names]
    if "resize" in keep:
        names += [n.name for n in nodes if n.op_type == "Resize" and n.name not in names]
    if "stem" in keep:
        first = model.graph.input[0].name
        names += [n.name for n in nodes if n.op_type == "Conv" and first in n.input and n.name not in names]
    if "depthwise" in keep:
        names += [n.name for n in nodes if n.op_type == "Conv" and n.name not in names
                  and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    if "decoder" in keep:
        names += [n.name for n in nodes if "/decoder/" in n.name and n.name not in names]
    return names


class _ArrayReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a list of arrays."""

    def __init__(self, input_name: str, arrays: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self.arrays = list(arrays)
        self.index = 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.index >= len(self.arrays):
            return None
        self.index += 1
        return {self.input_name: self.arrays[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


def pad_to_common(arrays: Sequence[np.ndarray]) -> List[np.ndarray]:
    """``arrays`` padded with 0 at the bottom/right to their largest height and width."""
    h = max(a.shape[2] for a in arrays)
    w = max(a.shape[3] for a in arrays)
    out = []
    for a in arrays:
        padded = np.zeros((a.shape[0], a.shape[1], h, w), dtype=np.float32)
        padded[:, :, : a.shape[2], : a.shape[3]] = a
        out.append(padded)
    return out


def constants_to_initializers(model: Any) -> int:
    """Give every Conv weight/bias that a ``Constant`` or an ``Identity`` of an initializer makes
    its own initializer, in place.

    The exporter deduplicates equal tensors (e.g. the all-zero biases BatchNorm folding gives an
    untrained model) and points the copies at one initializer through ``Identity`` nodes, and may
    write small tensors as ``Constant`` nodes. ONNX Runtime's quantizer only quantizes biases
    that are initializers; with a float bias it cannot fuse DequantizeLinear -> Conv ->
    QuantizeLinear into an int8 conv, and the "int8" model runs fp32 convs between
    (de)quantizations - measured 1.5x slower than fp32 on a fresh R101.

    Returns:
        How many were moved.
    """
    from onnx import numpy_helper

    conv_inputs = {name for node in model.graph.node if node.op_type == "Conv" for name in node.input[1:]}
    initializers = {init.name: init for init in model.graph.initializer}
    moved = 0
    for node in list(model.graph.node):
        if node.output[0] not in conv_inputs:
            continue
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is None:
                continue
            array = numpy_helper.to_array(value.t)
        elif node.op_type == "Identity" and node.input[0] in initializers:
            array = numpy_helper.to_array(initializers[node.input[0]])
        else:
            continue
        model.graph.initializer.append(numpy_helper.from_array(array.copy(), node.output[0]))
        model.graph.node.remove(node)
        moved += 1
    return moved


def _compute_nodes(names: Sequence[str]) -> List[str]:
    # The metadata lists the layers that do arithmetic; the image-pool branch's shape plumbing
    # (Shape, Gather, Concat ...) never had an int8 form.
    return [n for n in names if n.rsplit("/", 1)[-1].split("_")[0] in ("Conv", "Resize", "GlobalAveragePool")]


def _check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS or method == "nncf":
        raise ValueError(
            f"unknown ONNX Runtime calibration method {method!r}; choose from "
            f"{[m for m in CALIBRATION_METHODS if m != 'nncf']} (or 'nncf' through quantize())"
        )


def resolve_scheme(scheme: Optional[str]) -> Tuple[str, str]:
    """``(scheme, why)``: ``scheme`` checked, or this CPU's (:func:`deeplab.cpu.int8_scheme`) for ``None``/``"auto"``."""
    from deeplab.cpu import INT8_SCHEMES, int8_scheme

    if scheme is None or scheme == "auto":
        return int8_scheme()
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}; choose from {['auto', *INT8_SCHEMES]}")
    return scheme, "asked for"


def default_calibration_method() -> str:
    """:data:`DEFAULT_CALIBRATION_METHOD` where its tool is installed, else :data:`FALLBACK_CALIBRATION_METHOD`."""
    if DEFAULT_CALIBRATION_METHOD == "nncf" and optional_import("nncf") is None:
        return FALLBACK_CALIBRATION_METHOD
    return DEFAULT_CALIBRATION_METHOD


def quantize(
    src: PathLike,
    dst: PathLike,
    calibration: Sequence[np.ndarray],
    *,
    method: Optional[str] = None,
    keep_float: Sequence[str] = KEEP_FLOAT,
    scheme: Optional[str] = None,
    float_nodes: Sequence[str] = (),
    calibration_cache: Optional[PathLike] = None,
    activation_ranges: Optional[Mapping[str, Sequence[float]]] = None,
) -> Dict[str, Any]:
    """int8 QDQ quantization by ``method``: ``"nncf"`` (:func:`quantize_openvino`) or an ONNX
    Runtime calibration method (:func:`quantize_onnx`, per-channel weights, ``activation_ranges``
    in place of calibrated ones). ``None``: :func:`default_calibration_method`.

    Raises:
        ValueError: an unknown method (the message lists them).
        ExportError: ``activation_ranges`` with ``"nncf"`` (NNCF measures its own).
    """
    method = method or default_calibration_method()
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {list(CALIBRATION_METHODS)}")
    if method == "nncf":
        if activation_ranges:
            raise ExportError(QAT_NEEDS_ORT)
        return quantize_openvino(src, dst, calibration, keep_float=keep_float, scheme=scheme, float_nodes=float_nodes)
    return quantize_onnx(src, dst, calibration, method=method, keep_float=keep_float, scheme=scheme,
                         float_nodes=float_nodes, calibration_cache=calibration_cache,
                         activation_ranges=activation_ranges)


@contextlib.contextmanager
def _quiet_scratch_dir() -> Iterator[None]:
    """Run the block in a temporary working folder with the root logger at ERROR.

    ONNX Runtime's calibrator writes an augmented copy of the model into the working folder (kept
    out of the user's), and warns on the root logger ("consider pre-processing", biases that are
    not initializers after BN folding): nothing a user of ``deeplab export`` acts on.
    """
    root = logging.getLogger()
    cwd, level = os.getcwd(), root.level
    with tempfile.TemporaryDirectory(prefix="deeplab-quant-") as tmp:
        root.setLevel(logging.ERROR)
        try:
            os.chdir(tmp)
            yield
        finally:
            os.chdir(cwd)
            root.setLevel(level)


def quantize_onnx(
    src: PathLike,
    dst: PathLike,
    calibration: Sequence[np.ndarray],
    *,
    method: str = FALLBACK_CALIBRATION_METHOD,
    per_channel: bool = True,
    keep_float: Sequence[str] = KEEP_FLOAT,
    scheme: Optional[str] = None,
    float_nodes: Sequence[str] = (),
    calibration_cache: Optional[PathLike] = None,
    activation_ranges: Optional[Mapping[str, Sequence[float]]] = None,
) -> Dict[str, Any]:
    """Static int8 quantization of the fp32 ONNX file ``src`` into ``dst`` (QDQ).

    Args:
        src: an fp32 ONNX file (BatchNorm folded, as :func:`~deeplab.deploy.export.export_onnx` writes).
        dst: the int8 file.
        calibration: ``(1, 3, H, W)`` float32 inputs the activation ranges are measured on.
        method: a key of :data:`CALIBRATION_METHODS`.
        per_channel: one weight scale per output channel (else per tensor).
        keep_float: layer groups left in float (see :func:`float_node_names`).
        scheme: ``"u8s8"`` (8-bit weights) or ``"u8s7"`` (7-bit weights, ONNX Runtime's
            ``reduce_range``: no int16 saturation on CPUs without VNNI); default
            :func:`deeplab.cpu.int8_scheme` of this CPU.
        float_nodes: further node names left in float (:func:`quantize_to_bound`'s choice).
        calibration_cache: a JSON file of tensor ranges: written by the first call, read (no
            calibration run) by later ones with the same calibration.
        activation_ranges: ONNX tensor name -> ``(lo, hi)`` used instead of the calibrated range
            (the ranges a ``--qat`` fine-tuning tracked, :func:`conv_input_tensors` names them);
            the other tensors keep their calibrated ranges.

    Returns:
        What was done, for the metadata: ``{"tool", "format", "method", "per_channel",
        "weights", "activations", "scheme", "scheme_reason", "keep_float", "float_nodes"}``
        (and ``"qat_ranges"``, how many tensors took a given range).

    Raises:
        ExportError: onnxruntime is missing, or quantization failed.
        ValueError: unknown method or layer group, no calibration arrays.
    """
    _check_method(method)
    if not calibration:
        raise ValueError("quantize_onnx needs at least one calibration array")
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise ExportError("int8 export needs onnx and onnxruntime: pip install 'deeplab[onnx]'") from exc
    scheme, scheme_reason = resolve_scheme(scheme)
    proto = onnx.load(str(src))
    exclude = float_node_names(proto, keep_float)
    exclude += [n for n in float_nodes if n not in exclude]
    input_name = proto.graph.input[0].name
    moved = constants_to_initializers(proto)
    if moved:
        src = Path(tempfile.mkdtemp(prefix="deeplab-quant-src-")) / "model.onnx"
        onnx.save(proto, str(src))
    del proto
    if method != "minmax":
        # the histogram calibrators stack every image's activations: one shape for all
        calibration = pad_to_common(calibration)
    # resolved before the chdir below: relative paths name the caller's folder
    src_path, dst_path = str(Path(src).resolve()), str(Path(dst).resolve())
    cache = None if calibration_cache is None else str(Path(calibration_cache).resolve())
    try:
        with _quiet_scratch_dir():
            if activation_ranges and cache is None:  # the given ranges go in through a cache in the scratch folder
                cache = str(Path.cwd() / "ranges.json")
            for _ in range(2):
                quantize_static(
                    src_path,
                    dst_path,
                    _ArrayReader(input_name, calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=scheme == "u8s7",
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                    nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                    calibration_cache_path=cache,
                )
                # once more only when the calibration just measured ranges the given ones replace
                if not (activation_ranges and cache and set_cached_ranges(cache, activation_ranges)):
                    break
    except Exception as exc:  # onnxruntime raises plain exceptions with long messages
        raise ExportError(f"int8 quantization of {src} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    return {
        "tool": "onnxruntime",
        "format": "QDQ",
        "method": method,
        "per_channel": per_channel,
        "weights": ("int8 (7-bit range)" if scheme == "u8s7" else "int8") + " symmetric"
                   + (" per-channel" if per_channel else " per-tensor"),
        "activations": "uint8 asymmetric per-tensor",
        "scheme": scheme,
        "scheme_reason": scheme_reason,
        "keep_float": list(keep_float),
        "float_nodes": _compute_nodes(exclude),
        **({"qat_ranges": len(activation_ranges)} if activation_ranges else {}),
    }


def set_cached_ranges(cache: PathLike, ranges: Mapping[str, Sequence[float]]) -> bool:
    """Put ``ranges`` (tensor name -> ``(lo, hi)``) into an ONNX Runtime calibration cache, in place.

    Returns:
        Whether anything changed (``False``: the cache holds them already).

    Raises:
        ExportError: a tensor the calibration did not measure (not an activation of this graph).
    """
    from onnxruntime.quantization.calibrate import TensorData, load_tensors_data, save_tensors_data

    data = load_tensors_data(cache)
    missing = [name for name in ranges if name not in data]
    if missing:
        raise ExportError(f"the given activation ranges name {len(missing)} tensor(s) this graph does not calibrate "
                          f"(first: {missing[0]!r}); were they tracked on another model?")
    changed = False
    for name, (lo, hi) in ranges.items():
        new = (np.float32(lo), np.float32(hi))
        if tuple(np.float32(v) for v in np.ravel(data[name].range_value)) != new:
            data[name] = TensorData(lowest=new[0], highest=new[1])
            changed = True
    if changed:
        save_tensors_data(data, cache)
    return changed


def conv_input_tensors(model: Any, onnx_path: PathLike, example: Any) -> Dict[str, str]:
    """Conv module name of ``model`` -> the ONNX tensor its ``Conv`` node reads in ``onnx_path``.

    ``model`` is the module the file was exported from (BatchNorm folded or not: conv names stay).
    The exporter writes nodes in execution order, so the convs are paired by the order a forward
    pass on ``example`` (an input tensor) calls them, each pair checked by weight shape.

    Raises:
        ExportError: the graph's convs do not pair up with the model's.
    """
    import onnx
    import torch

    proto = onnx.load(str(onnx_path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.op_type == "Conv"]
    shapes = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    called: List[Tuple[str, Tuple[int, ...]]] = []
    hooks = [module.register_forward_pre_hook(
        lambda m, _, name=name: called.append((name, tuple(m.weight.shape))))
        for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    if len(called) != len(nodes):
        raise ExportError(f"{onnx_path} has {len(nodes)} Conv nodes but the model calls {len(called)} convs; "
                          "export the checkpoint the ranges were tracked on")
    out: Dict[str, str] = {}
    for (name, shape), node in zip(called, nodes):
        if node.input[1] in shapes and shapes[node.input[1]] != shape:
            raise ExportError(f"conv {name} {shape} does not match ONNX node {node.name} {shapes[node.input[1]]}")
        out[name] = str(node.input[0])
    return out


# --------------------------------------------------------------------------- OpenVINO NNCF


@dataclass
class NNCFSetup:
    """What ``nncf.quantize`` and ``nncf.quantize_with_accuracy_control`` take for an ONNX file
    (:func:`nncf_setup`), and the metadata of the result."""

    nncf: Any  # the nncf module
    model: Any  # the fp32 ``onnx.ModelProto``
    input_name: str
    dataset: Any  # ``nncf.Dataset`` of the calibration arrays
    subset_size: int
    ignored_scope: Any  # ``nncf.IgnoredScope`` of the layers kept float
    advanced: Optional[Any]  # ``AdvancedQuantizationParameters`` or None
    info: Dict[str, Any]  # the ``quantization`` metadata (see :func:`quantize_openvino`)


def nncf_setup(
    src: PathLike,
    calibration: Sequence[np.ndarray],
    *,
    keep_float: Sequence[str] = KEEP_FLOAT,
    scheme: Optional[str] = None,
    float_nodes: Sequence[str] = (),
) -> NNCFSetup:
    """Load ``src`` and prepare NNCF's arguments: the calibration dataset, the ignored scope
    (``keep_float`` groups and ``float_nodes``) and, for scheme ``"u8s7"``, the overflow fix.

    Raises:
        ExportError: nncf is not installed.
        ValueError: no calibration arrays, unknown layer group or scheme.
    """
    try:
        import nncf
        import onnx
    except ImportError as exc:
        raise ExportError("--calib-method nncf needs NNCF: pip install 'deeplab[openvino]'") from exc
    if not calibration:
        raise ValueError("NNCF quantization needs at least one calibration array")
    scheme, scheme_reason = resolve_scheme(scheme)
    proto = onnx.load(str(src))
    exclude = float_node_names(proto, keep_float)
    exclude += [n for n in float_nodes if n not in exclude]
    input_name = proto.graph.input[0].name
    # NNCF logs every ignored node at INFO; its progress bars stay
    logging.getLogger("nncf").setLevel(logging.WARNING)
    advanced = None
    if scheme == "u8s7":
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    info = {
        "tool": f"nncf {getattr(nncf, '__version__', '?')}",
        "format": "QDQ",
        "method": "nncf",
        "per_channel": True,
        "weights": "int8 symmetric per-channel",
        "activations": "uint8/int8 per NNCF preset",
        "scheme": scheme,
        "scheme_reason": scheme_reason,
        "keep_float": list(keep_float),
        "float_nodes": _compute_nodes(exclude),
    }
    return NNCFSetup(
        nncf=nncf, model=proto, input_name=input_name,
        dataset=nncf.Dataset(list(calibration), lambda x: {input_name: x}), subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(names=exclude, validate=False), advanced=advanced, info=info,
    )


def quantize_openvino(
    src: PathLike,
    dst: PathLike,
    calibration: Sequence[np.ndarray],
    *,
    keep_float: Sequence[str] = KEEP_FLOAT,
    scheme: Optional[str] = None,
    float_nodes: Sequence[str] = (),
) -> Dict[str, Any]:
    """Static int8 quantization of ``src`` with OpenVINO NNCF (``nncf.quantize`` on the ONNX graph),
    no accuracy control (that is :func:`deeplab.deploy.nncf_control.nncf_accuracy_control`).

    NNCF's ONNX backend writes QDQ nodes, so ``dst`` runs in ONNX Runtime and OpenVINO alike.
    NNCF picks its own calibration statistics (min / quantile per its preset). Scheme ``"u8s7"``
    turns on NNCF's overflow fix (7-bit weights) everywhere, not only in the first layer.

    Raises:
        ExportError: nncf is not installed, or quantization failed.
    """
    import onnx

    setup = nncf_setup(src, calibration, keep_float=keep_float, scheme=scheme, float_nodes=float_nodes)
    options = {} if setup.advanced is None else {"advanced_parameters": setup.advanced}
    try:
        quantized = setup.nncf.quantize(setup.model, setup.dataset, subset_size=setup.subset_size,
                                        ignored_scope=setup.ignored_scope, **options)
    except Exception as exc:
        raise ExportError(f"NNCF quantization of {src} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    onnx.save(quantized, str(dst))
    return dict(setup.info)
