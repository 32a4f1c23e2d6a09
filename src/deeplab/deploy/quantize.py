"""int8 quantization of exported ONNX files, calibration data, and parity against fp32.

* :func:`calibration_set` - images for calibration (and held out for parity) from a folder of
  images or from a dataset, preprocessed exactly as inference sees them: normalised with the
  model's mean/std, at most ``max_side`` on the longer side, padded with 0 (the mean pixel) at
  the bottom/right to ``OS*k+1``.
* :func:`quantize_onnx` - ONNX Runtime static quantization: QDQ format, per-channel int8
  weights (symmetric), uint8 activations (asymmetric, the u8 x s8 pairing VNNI and AMX
  multiply natively), calibration by :data:`CALIBRATION_METHODS`.
* :func:`quantize_openvino` - the same with OpenVINO NNCF (``pip install 'deeplab[openvino]'``),
  written as an ONNX file with QDQ nodes both runtimes read.
* :func:`quantize_to_bound` - accuracy-aware int8: quantize, measure the pseudo-label mIoU delta
  against fp32 on the held-out images (:func:`deeplab.deploy.runtime.measure_parity`), and while
  it is over the bound keep the most sensitive layers (:func:`layer_sensitivity`) in float.

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

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from deeplab._utils import DeeplabError, optional_import
from deeplab.data.base import IMAGE_SUFFIXES  # the one suffix list
from deeplab.deploy.format import ExportError
from deeplab.deploy.runtime import OnnxRuntimeModel, measure_parity

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_CALIBRATION_METHOD",
    "FALLBACK_CALIBRATION_METHOD",
    "IMAGE_SUFFIXES",
    "KEEP_FLOAT",
    "CalibrationError",
    "CalibrationSet",
    "calibration_set",
    "default_calibration_method",
    "float_node_names",
    "layer_sensitivity",
    "measure_parity",
    "pad_to_common",
    "prepare_image",
    "quantize",
    "quantize_onnx",
    "quantize_openvino",
    "quantize_to_bound",
    "within_bound",
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
# Images read by default: 32 calibrate, a fifth (8) are held out for the parity gate. A source with
# fewer gives what it has (the CLI says so).
DEFAULT_CALIBRATION_IMAGES = 40
FALLBACK_CALIBRATION_METHOD = "percentile"

# Layer groups that may stay float -> how to find their nodes in an exported graph.
LAYER_GROUPS = ("logits", "image_pool", "resize", "stem", "depthwise", "decoder")
KEEP_FLOAT: Tuple[str, ...] = ("logits", "image_pool", "resize")


class CalibrationError(DeeplabError, ValueError):
    """The calibration data cannot be used; the message names the source, the cause and the fix."""


@dataclass
class CalibrationSet:
    """Preprocessed images for calibration and for the parity check.

    Attributes:
        arrays: ``(1, 3, H, W)`` float32 normalised inputs, one per image (sizes may differ).
        names: the image file of each array.
        source: where they came from (a folder, or ``dataset:root``), for the metadata.
        held_out: how many of the last arrays are kept out of calibration for parity.
        sizes: per array, the ``(h, w)`` of the image inside its padding.
        masks: per array, its ``(h, w)`` class-id mask (a dataset source) or ``None``.
        requested: how many images were asked for (more than ``arrays`` when the source is small).
    """

    arrays: List[np.ndarray]
    names: List[str]
    source: str
    held_out: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)
    sizes: List[Optional[Tuple[int, int]]] = field(default_factory=list)
    masks: List[Optional[np.ndarray]] = field(default_factory=list)
    requested: Optional[int] = None

    @property
    def calibration(self) -> List[np.ndarray]:
        """The arrays used for calibration (all but the held-out ones)."""
        return self.arrays[: len(self.arrays) - self.held_out]

    @property
    def parity(self) -> List[np.ndarray]:
        """The held-out arrays (all arrays when nothing is held out: the parity is then not held-out)."""
        return self.arrays[len(self.arrays) - self.held_out:] if self.held_out else list(self.arrays)

    def _parity_slice(self, items: Sequence[Any]) -> List[Any]:
        if not items:
            return [None] * len(self.parity)
        return list(items[len(items) - self.held_out:]) if self.held_out else list(items)

    @property
    def parity_sizes(self) -> List[Optional[Tuple[int, int]]]:
        """``(h, w)`` inside the padding of each :attr:`parity` array."""
        return self._parity_slice(self.sizes)

    @property
    def parity_masks(self) -> List[Optional[np.ndarray]]:
        """The ground-truth mask of each :attr:`parity` array (``None`` where there is none)."""
        return self._parity_slice(self.masks)

    def describe(self) -> Dict[str, Any]:
        """JSON for the export metadata: source, image names, which were held out."""
        split = len(self.arrays) - self.held_out
        info = {"source": self.source, "images": len(self.arrays) - self.held_out, "names": self.names[:split],
                "held_out": self.names[split:], **self.extra}
        if self.requested is not None and self.requested > len(self.arrays):
            info["requested"] = self.requested
        return info


def prepare_image(
    rgb: np.ndarray,
    normalization: Mapping[str, Sequence[float]],
    *,
    output_stride: int = 16,
    max_side: Optional[int] = 513,
) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image as a ``(1, 3, H', W')`` float32 model input.

    Resized (bilinear, aspect kept) so the longer side is at most ``max_side``, normalised,
    padded with 0 at the bottom/right to ``OS*k+1`` in each dimension as whole-image
    inference does.
    """
    from PIL import Image

    h, w = rgb.shape[:2]
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, getattr(Image, "Resampling", Image).BILINEAR))
        h, w = rgb.shape[:2]
    mean = np.asarray(normalization["mean"], dtype=np.float32) * 255.0
    std = np.asarray(normalization["std"], dtype=np.float32) * 255.0
    x = (rgb.astype(np.float32) - mean) / std
    ph = output_stride * -(-(h - 1) // output_stride) + 1
    pw = output_stride * -(-(w - 1) // output_stride) + 1
    out = np.zeros((1, 3, ph, pw), dtype=np.float32)
    out[0, :, :h, :w] = x.transpose(2, 0, 1)
    return out


def _resized_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``mask`` at ``size`` = ``(h, w)`` (nearest), as :func:`prepare_image` resized its image."""
    from PIL import Image

    if mask.shape[:2] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), getattr(Image, "Resampling", Image).NEAREST))


def _scaled_size(h: int, w: int, max_side: Optional[int]) -> Tuple[int, int]:
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    return h, w


def _folder_images(folder: Path) -> List[Path]:
    if not folder.exists():
        raise CalibrationError(f"calibration folder {folder} does not exist; pass --calib-data DIR with images in it")
    if not folder.is_dir():
        raise CalibrationError(f"--calib-data {folder} is a file, not a folder; pass the folder that holds the images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(
            f"calibration folder {folder} has no image files ({', '.join(IMAGE_SUFFIXES)}); "
            "point --calib-data at a folder of photos like the ones the model will see"
        )
    return files


def calibration_set(
    *,
    folder: Optional[PathLike] = None,
    dataset: Optional[str] = None,
    data_root: Optional[PathLike] = None,
    split: Optional[str] = None,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    held_out: Optional[int] = None,
    normalization: Mapping[str, Sequence[float]],
    output_stride: int = 16,
    max_side: Optional[int] = 513,
) -> CalibrationSet:
    """Calibration images from a folder (``folder``) or a dataset (``dataset`` + ``data_root``).

    The first ``count`` images (sorted by name; the dataset's order) are read; the last
    ``held_out`` of them are kept out of calibration for the parity check.

    Args:
        folder: a folder of images (searched recursively).
        dataset, data_root, split: a dataset by name (``"folder"``, ``"voc"``, ...), as ``deeplab eval``.
        count: images to read in all (calibration + held out).
        held_out: of those, how many only check parity (0: parity on the calibration images);
            default a fifth of ``count`` (at least 1 when ``count >= 2``): 32 calibrate and 8 are
            held out of the default 40.
        normalization: the model's ``{"mean", "std"}``.
        output_stride: for the ``OS*k+1`` padding.
        max_side: longest side after resizing (``None``: native size).

    Raises:
        CalibrationError: neither or both sources given, no images, too few for ``held_out``,
            an unreadable image.
    """
    if (folder is None) == (dataset is None):
        raise CalibrationError("int8 needs calibration images: pass --calib-data DIR or --dataset NAME --data-root ROOT (one of them)")
    if count < 1:
        raise CalibrationError(f"--calib-images must be at least 1, got {count}")
    explicit = held_out is not None
    if held_out is None:
        held_out = max(1, count // 5) if count >= 2 else 0
    if held_out < 0 or (held_out and count <= held_out):
        raise CalibrationError(
            f"{count} calibration image(s) leave none to calibrate once {held_out} are held out for parity; "
            f"pass --calib-images {held_out + 1} or more"
        )
    from deeplab.data.base import DatasetError, load_image

    names: List[str] = []
    images: List[np.ndarray] = []
    masks: List[Optional[np.ndarray]] = []
    if folder is not None:
        source = str(folder)
        for path in _folder_images(Path(folder))[:count]:
            try:
                images.append(np.asarray(load_image(path)))
            except (DatasetError, OSError) as exc:
                raise CalibrationError(f"calibration image {path} cannot be read ({exc}); remove it from {folder}") from exc
            names.append(path.name)
            masks.append(None)
    else:
        from deeplab.data import build_dataset

        if data_root is None:
            raise CalibrationError(f"--dataset {dataset} needs --data-root ROOT (the folder that holds it)")
        source = f"{dataset}:{data_root}" + (f":{split}" if split else "")
        ds = build_dataset(str(dataset), str(data_root), split)
        if len(ds) == 0:
            raise CalibrationError(f"dataset {source} has no images; check --data-root and --split")
        for index in range(min(count, len(ds))):
            images.append(np.asarray(ds.load_image(index)))
            names.append(Path(ds.samples[index][0]).name)
            try:  # ground truth, where the dataset has it, for the true mIoU delta
                masks.append(np.asarray(ds.load_mask(index)))
            except (DatasetError, OSError, FileNotFoundError, TypeError, IndexError):
                masks.append(None)
    if not explicit and len(images) < count:  # a small folder: hold out what can be held out
        held_out = max(1, len(images) // 5) if len(images) >= 2 else 0
    if held_out and len(images) <= held_out:
        raise CalibrationError(
            f"{source} has {len(images)} image(s): too few to calibrate with {held_out} held out for parity; "
            "add images or pass held_out=0"
        )
    arrays = [prepare_image(rgb, normalization, output_stride=output_stride, max_side=max_side) for rgb in images]
    sizes: List[Optional[Tuple[int, int]]] = [_scaled_size(rgb.shape[0], rgb.shape[1], max_side) for rgb in images]
    masks = [None if m is None or m.shape[:2] != rgb.shape[:2] else _resized_mask(m, size)  # type: ignore[arg-type]
             for m, rgb, size in zip(masks, images, sizes)]
    return CalibrationSet(arrays=arrays, names=names, source=source, held_out=held_out,
                          extra={"max_side": max_side, "output_stride": output_stride},
                          sizes=sizes, masks=masks, requested=count)


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


def _scheme(scheme: Optional[str]) -> Tuple[str, str]:
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
) -> Dict[str, Any]:
    """int8 QDQ quantization by ``method``: ``"nncf"`` (:func:`quantize_openvino`) or an ONNX
    Runtime calibration method (:func:`quantize_onnx`, per-channel weights). ``None``:
    :func:`default_calibration_method`.

    Raises:
        ValueError: an unknown method (the message lists them).
    """
    method = method or default_calibration_method()
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {list(CALIBRATION_METHODS)}")
    if method == "nncf":
        return quantize_openvino(src, dst, calibration, keep_float=keep_float, scheme=scheme, float_nodes=float_nodes)
    return quantize_onnx(src, dst, calibration, method=method, keep_float=keep_float, scheme=scheme,
                         float_nodes=float_nodes, calibration_cache=calibration_cache)


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

    Returns:
        What was done, for the metadata: ``{"tool", "format", "method", "per_channel",
        "weights", "activations", "scheme", "scheme_reason", "keep_float", "float_nodes"}``.

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
    scheme, scheme_reason = _scheme(scheme)
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
    with tempfile.TemporaryDirectory(prefix="deeplab-quant-") as tmp:
        # the calibrator writes an augmented copy of the model; keep it out of the user's folder
        cwd = os.getcwd()
        root = logging.getLogger()
        level = root.level
        # onnxruntime.quantization warns on the root logger ("consider pre-processing", biases
        # that are not initializers after BN folding): nothing a user of `deeplab export` acts on
        root.setLevel(logging.ERROR)
        try:
            os.chdir(tmp)
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
                calibration_cache_path=None if calibration_cache is None else str(Path(calibration_cache).resolve()),
            )
        except Exception as exc:  # onnxruntime raises plain exceptions with long messages
            raise ExportError(f"int8 quantization of {src} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        finally:
            os.chdir(cwd)
            root.setLevel(level)
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
    }


# --------------------------------------------------------------------------- OpenVINO NNCF


def quantize_openvino(
    src: PathLike,
    dst: PathLike,
    calibration: Sequence[np.ndarray],
    *,
    keep_float: Sequence[str] = KEEP_FLOAT,
    scheme: Optional[str] = None,
    float_nodes: Sequence[str] = (),
) -> Dict[str, Any]:
    """Static int8 quantization of ``src`` with OpenVINO NNCF (``nncf.quantize`` on the ONNX graph).

    NNCF's ONNX backend writes QDQ nodes, so ``dst`` runs in ONNX Runtime and OpenVINO alike.
    NNCF picks its own calibration statistics (min / quantile per its preset). Scheme ``"u8s7"``
    turns on NNCF's overflow fix (7-bit weights) everywhere, not only in the first layer.

    Raises:
        ExportError: nncf is not installed, or quantization failed.
    """
    try:
        import nncf
        import onnx
    except ImportError as exc:
        raise ExportError("--quantizer nncf needs NNCF: pip install 'deeplab[openvino]'") from exc
    if not calibration:
        raise ValueError("quantize_openvino needs at least one calibration array")
    scheme, scheme_reason = _scheme(scheme)
    proto = onnx.load(str(src))
    exclude = float_node_names(proto, keep_float)
    exclude += [n for n in float_nodes if n not in exclude]
    input_name = proto.graph.input[0].name
    dataset = nncf.Dataset(list(calibration), lambda x: {input_name: x})
    # NNCF logs every ignored node at INFO; its progress bars stay
    logging.getLogger("nncf").setLevel(logging.WARNING)
    options: Dict[str, Any] = {}
    if scheme == "u8s7":
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        options["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    try:
        quantized = nncf.quantize(
            proto, dataset, subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=exclude, validate=False), **options,
        )
    except Exception as exc:
        raise ExportError(f"NNCF quantization of {src} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    onnx.save(quantized, str(dst))
    return {
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


# --------------------------------------------------------------------------- accuracy-aware int8


def within_bound(parity: Mapping[str, Any], bound: float) -> bool:
    """Whether a parity (:func:`~deeplab.deploy.runtime.measure_parity`) meets a delta ``bound``
    (mIoU points) by :func:`deeplab.deploy.precision.gate_delta`."""
    from deeplab.deploy.precision import gate_delta

    delta, _ = gate_delta(parity)
    return delta is not None and delta <= bound


def _with_outputs(model: Any, names: Sequence[str]) -> Any:
    """A copy of ONNX ``model`` that also returns the float tensors ``names``."""
    import onnx

    copy_ = onnx.ModelProto()
    copy_.CopyFrom(model)
    have = {o.name for o in copy_.graph.output}
    for name in names:
        if name not in have:
            copy_.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy_


def _run_outputs(model: Any, arrays: Sequence[np.ndarray]) -> Tuple[List[str], List[List[np.ndarray]]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    return names, [session.run(None, {feed: a}) for a in arrays]


def layer_sensitivity(float_path: PathLike, int8_path: PathLike, arrays: Sequence[np.ndarray]) -> List[Tuple[str, float]]:
    """How much error each quantized conv of ``int8_path`` adds, most sensitive first.

    Both files run on ``arrays`` with every quantized conv's input and output as extra outputs
    (which keeps ONNX Runtime from fusing those convs into int8 kernels: the QDQ graph then
    simulates int8 in float, without any CPU's rounding or saturation). A layer's score is the
    relative L2 error of its output minus that of its input (``||q - f|| / ||f||``, over all
    arrays): what quantizing this layer's weights and input adds to the error already there.

    Returns:
        ``[(conv node name, score), ...]`` sorted by score, largest first.
    """
    import onnx

    fp = onnx.load(str(float_path))
    q = onnx.load(str(int8_path))
    producer = {out: n for n in q.graph.node for out in n.output}
    consumers: Dict[str, List[Any]] = {}
    for n in q.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    fp_tensors = {out for n in fp.graph.node for out in n.output}

    def dequantized(tensor: str) -> str:
        # ORT folds a Relu into its conv's output Q/DQ pair: what the next layer reads is the DQ output
        for qnode in consumers.get(tensor, []):
            if qnode.op_type == "QuantizeLinear":
                for dq in consumers.get(qnode.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return str(dq.output[0])
        return tensor

    def float_name(tensor: str) -> str:
        dq = producer.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            qnode = producer.get(dq.input[0])
            if qnode is not None and qnode.op_type == "QuantizeLinear":
                return str(qnode.input[0])
        return tensor

    # (node, (float input, int8-graph input), (float output, int8-graph output))
    pairs: List[Tuple[str, Tuple[str, str], Tuple[str, str]]] = []
    for n in q.graph.node:
        weight = producer.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if weight is None or weight.op_type != "DequantizeLinear":
            continue
        out = (n.output[0], dequantized(n.output[0]))
        inp = (float_name(n.input[0]), n.input[0])
        if out[0] in fp_tensors:
            pairs.append((n.name, inp if inp[0] in fp_tensors else ("", ""), out))
    if not pairs:
        return []
    fp_wanted = sorted({t for _, i, o in pairs for t in (i[0], o[0]) if t})
    q_wanted = sorted({t for _, i, o in pairs for t in (i[1], o[1]) if t})
    fp_names, fp_runs = _run_outputs(_with_outputs(fp, fp_wanted), arrays)
    q_names, q_runs = _run_outputs(_with_outputs(q, q_wanted), arrays)

    def error(pair: Tuple[str, str]) -> float:
        if not pair[0]:
            return 0.0
        i, j = fp_names.index(pair[0]), q_names.index(pair[1])
        num = sum(float(np.sum((q_run[j].astype(np.float64) - f_run[i]) ** 2)) for f_run, q_run in zip(fp_runs, q_runs))
        den = sum(float(np.sum(f_run[i].astype(np.float64) ** 2)) for f_run in fp_runs)
        return float(np.sqrt(num / den)) if den > 0 else 0.0

    scores = [(name, error(out) - error(inp)) for name, inp, out in pairs]
    return sorted(scores, key=lambda item: -item[1])


def _gate(parity: Mapping[str, Any]) -> float:
    from deeplab.deploy.precision import gate_delta

    delta, _ = gate_delta(parity)
    return float("inf") if delta is None else delta


def with_producers(float_path: PathLike, names: Sequence[str]) -> List[str]:
    """``names`` plus, for each, the conv that makes its input (through Relu / Clip).

    Keeping a conv float does not keep its *input* float: the conv producing that tensor still
    quantizes its own output (ONNX Runtime puts the Q/DQ pair on the producer's side). A float
    island therefore takes the producer along; measured on a model with an outlier channel, the
    consumer alone changed nothing, the pair restored the accuracy.
    """
    import onnx

    nodes = onnx.load(str(float_path), load_external_data=False).graph.node
    producer = {out: n for n in nodes for out in n.output}
    by_name = {n.name: n for n in nodes}
    out: List[str] = []
    for name in names:
        if name not in out:
            out.append(name)
        node = by_name.get(name)
        source = producer.get(node.input[0]) if node is not None and node.input else None
        while source is not None and source.op_type in ("Relu", "Clip", "Identity"):
            source = producer.get(source.input[0]) if source.input else None
        if source is not None and source.op_type == "Conv" and source.name not in out:
            out.append(source.name)
    return out


class _CachedReference:
    """The reference model's logits, computed once per input (every attempt compares against them)."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model = model
        self.cache: Dict[Tuple[Tuple[int, ...], bytes], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import hashlib

        key = (tuple(x.shape), hashlib.sha1(x.numpy().tobytes()).digest())
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = self.model(x)
        return self.cache[key]


def _latency(path: Path, info: Mapping[str, Any], x: np.ndarray, runs: int = 3) -> float:
    import time

    runner = OnnxRuntimeModel(path, metadata={"precision": "int8", "quantization": dict(info)})
    t = torch.from_numpy(x)
    runner(t)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(t)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def quantize_to_bound(
    float_path: PathLike,
    dst: PathLike,
    calibration: CalibrationSet,
    reference: Callable[[torch.Tensor], torch.Tensor],
    *,
    bound: float,
    method: Optional[str] = None,
    keep_float: Sequence[str] = KEEP_FLOAT,
    scheme: Optional[str] = None,
    max_float_fraction: float = 0.5,
    sensitivity_images: int = 2,
    report: Optional[Callable[[str], None]] = None,
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Accuracy-aware int8: quantize ``float_path`` into ``dst`` and keep layers in float until the
    held-out accuracy is within ``bound``.

    1. Quantize everything but ``keep_float``; measure the parity against ``reference`` on the
       held-out images (pseudo-label mIoU delta; true mIoU delta where they have masks).
    2. Over the bound: rank the quantized convs by :func:`layer_sensitivity` and keep the top 1, 2,
       4, ... in float, each with the conv that makes its input (:func:`with_producers`; ONNX
       Runtime ``nodes_to_exclude``; the calibration ranges are reused),
       measuring each attempt, until the bound holds or ``max_float_fraction`` of the convs are float.
    3. Write the first attempt within the bound, else the most accurate one (its parity then says
       it is out of bound; :mod:`deeplab.deploy.precision` refuses it).

    Returns:
        ``(quantization, parity)`` for the metadata. ``quantization`` adds to :func:`quantize`'s
        ``"sensitive_float"`` (the convs kept float for accuracy), ``"attempts"`` (ranked layers ->
        deltas) and, when layers were kept float, ``"float_cost"`` (latency of the all-int8 and of
        the written file on one held-out image, and their ratio).
    """
    say = report or (lambda message: None)
    method = method or default_calibration_method()
    ref = _CachedReference(reference)
    arrays, sizes, masks = calibration.parity, calibration.parity_sizes, calibration.parity_masks
    with tempfile.TemporaryDirectory(prefix="deeplab-int8-search-") as tmp:
        cache = Path(tmp) / "ranges.json" if method != "nncf" else None

        def attempt(extra: Sequence[str]) -> Tuple[Path, Dict[str, Any], Dict[str, Any]]:
            out = Path(tmp) / f"int8-{len(extra)}.onnx"
            info = quantize(float_path, out, calibration.calibration, method=method, keep_float=keep_float,
                            scheme=scheme, float_nodes=extra, calibration_cache=cache)
            runner = OnnxRuntimeModel(out, metadata={"precision": "int8", "quantization": info})
            parity = measure_parity(ref, runner, arrays, sizes=sizes, masks=masks)
            note = (f", true mIoU delta {parity['true_miou_delta']:+.2f}" if parity.get("true_miou_delta") is not None
                    else "")
            say(f"int8 with {len(extra)} sensitive layer(s) float: pseudo-label mIoU {parity['pseudo_miou']:.2f} "
                f"(delta {parity['miou_delta']:.2f}){note}; bound {bound:g}")
            return out, info, parity

        first = attempt([])
        chosen, attempts = first, [{"float_layers": 0, "miou_delta": first[2]["miou_delta"],
                                    "true_miou_delta": first[2].get("true_miou_delta")}]
        extra: List[str] = []
        ranking: List[Tuple[str, float]] = []
        if not within_bound(first[2], bound) and max_float_fraction > 0:
            ranking = layer_sensitivity(float_path, first[0], arrays[:max(1, sensitivity_images)])
            limit = int(len(ranking) * max_float_fraction) if ranking else 0
            k = 1
            best = first
            while ranking and k <= limit:
                islands = with_producers(float_path, [name for name, _ in ranking[:k]])
                candidate = attempt(islands)
                attempts.append({"float_layers": k, "miou_delta": candidate[2]["miou_delta"],
                                 "true_miou_delta": candidate[2].get("true_miou_delta")})
                if within_bound(candidate[2], bound):
                    best, extra = candidate, islands
                    break
                if _gate(candidate[2]) < _gate(best[2]):
                    best, extra = candidate, islands
                if k == limit:
                    break
                k = min(limit, 2 * k)
            chosen = best
        path, info, parity = chosen
        info = dict(info, sensitive_float=list(extra), attempts=attempts)
        if ranking:
            info["sensitivity"] = [{"node": name, "score": round(score, 6)} for name, score in ranking[:10]]
        if extra:
            base, mixed = _latency(first[0], first[1], arrays[0]), _latency(path, info, arrays[0])
            info["float_cost"] = {"all_int8_s": base, "mixed_s": mixed, "slowdown": mixed / base if base else None}
        Path(dst).write_bytes(path.read_bytes())
    return info, parity
