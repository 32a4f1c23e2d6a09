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

Precision (:data:`EXPORT_PRECISIONS`, ``export_model(precision=...)``):

* ``fp32`` - the float graph as traced.
* ``bf16`` - the same float graph, marked ``"precision": "bf16"``: OpenVINO runs it with
  ``INFERENCE_PRECISION_HINT=bf16``, TorchScript under ``torch.autocast`` (bfloat16). Weights
  stay fp32 in the file, so one file also runs in fp32 anywhere.
* ``int8`` - ONNX: static QDQ quantization of the float graph calibrated on real images
  (:mod:`deeplab.deploy.quantize`); LiteRT: full-integer int8 (:mod:`deeplab.deploy.tflite`).

LiteRT (``format="tflite"``, :mod:`deeplab.deploy.tflite`) has one input size
(``input_size``) and runs fp32 or int8; Core ML (``format="coreml"``, :mod:`deeplab.deploy.coreml`)
one input size, fp32, and runs on Apple's systems only.

For bf16 and int8 the parity against the fp32 PyTorch model on the held-out calibration
images (pseudo-label mIoU delta, true mIoU delta where the images have masks, pixel agreement,
max logit diff: :func:`deeplab.deploy.runtime.measure_parity`) is measured and stored in the
metadata (``"parity"``), with the calibration set and method; int8 keeps its most sensitive
layers float until the delta is within bound (:func:`deeplab.deploy.accuracy.quantize_to_bound`).
The policy (:mod:`deeplab.deploy.precision`) reads it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from deeplab._utils import atomic_write
from deeplab.deploy.format import (
    FIXED_INPUT_SIZE,
    METADATA_FORMAT,
    METADATA_KEY,
    METADATA_VERSION,
    TORCHSCRIPT_METADATA_FILE,
    ExportError,
    quiet_tracing,
)
from deeplab.deploy.optimize import fold_batchnorm

if TYPE_CHECKING:
    from deeplab.deploy.calibration import CalibrationSet

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMATS",
    "EXPORT_PRECISIONS",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "model_metadata",
    "prepare_for_export",
    "write_onnx_metadata",
]

PathLike = Union[str, "os.PathLike[str]"]

EXPORT_FORMATS = ("onnx", "torchscript", "tflite", "coreml")
EXPORT_PRECISIONS = ("fp32", "bf16", "int8")
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


def prepare_for_export(model: nn.Module, fold_bn: bool) -> nn.Module:
    """A float32, CPU, eval-mode copy of ``model`` with BatchNorm folded (``fold_bn``): what every
    exporter converts and what parity is measured against."""
    model = copy.deepcopy(model).float().cpu().eval()
    for module in model.modules():  # graphs in the layout they are fed (no memory-format ops traced in)
        if hasattr(module, "channels_last_inference"):
            setattr(module, "channels_last_inference", False)  # noqa: B010 - a plain flag, not a submodule
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
    with atomic_write(path, mode=None) as tmp:  # unique per process: concurrent exports do not clash
        yield tmp


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
    prepared = prepare_for_export(model, fold_bn)
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
    prepared = prepare_for_export(model, fold_bn)
    x = _example(prepared, example_input)
    with quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(prepared, (x,), check_trace=False)
    with _atomic_target(path) as tmp, quiet_tracing():
        torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(meta)})
    return path


def write_onnx_metadata(path: PathLike, metadata: Mapping[str, Any]) -> None:
    """Replace the deeplab metadata of an ONNX file in place (atomically)."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    with _atomic_target(path) as tmp:
        onnx.save(proto, str(tmp))


def export_model(
    model: nn.Module,
    path: PathLike,
    *,
    format: str = "onnx",
    metadata: Optional[Mapping[str, Any]] = None,
    example_input: Optional[torch.Tensor] = None,
    fold_bn: bool = True,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    calibration: Optional["CalibrationSet"] = None,
    calib_method: Optional[str] = None,
    int8_scheme: Optional[str] = None,
    int8_float_fraction: float = 0.5,
    report: Optional[Callable[[str], None]] = None,
    input_size: Optional[Tuple[int, int]] = None,
    qat: Optional[Mapping[str, Any]] = None,
) -> Path:
    """:func:`export_onnx`, :func:`export_torchscript` or :func:`deeplab.deploy.tflite.export_tflite`
    by ``format`` (``"onnx"``/``"torchscript"``/``"tflite"``), at ``precision`` (``"fp32"``,
    ``"bf16"``, ``"int8"``; see the module docstring).

    Args:
        calibration: images (:func:`deeplab.deploy.calibration.calibration_set`): int8 calibrates
            on them; bf16 and int8 measure parity on the held-out ones. Required for int8.
        calib_method: int8 only, a key of :data:`deeplab.deploy.quantize.CALIBRATION_METHODS`
            (default :func:`deeplab.deploy.quantize.default_calibration_method`).
        int8_scheme: int8 only, ``"u8s8"`` or ``"u8s7"`` (default :func:`deeplab.cpu.int8_scheme`).
        int8_float_fraction: int8 only, the largest share of the convs kept float to reach the
            accuracy bound (0: quantize all but the ``KEEP_FLOAT`` groups, no search).
        report: int8 only, called with a line per quantization attempt (progress).
        input_size: tflite and coreml only, the graph's fixed ``(H, W)`` (default 513 x 513).
        qat: int8 ONNX only, what a ``--qat`` checkpoint saved (``ckpt["qat"]``,
            :func:`deeplab.train.qat.qat_state`): its tracked input ranges replace the calibrated
            ones of the convs' inputs, so the file rounds as the fine-tuning did.

    Returns:
        ``path``; :func:`~deeplab.deploy.format.read_metadata` gives ``precision``,
        ``calibration``, ``quantization`` and ``parity``.

    Raises:
        ValueError: unknown format or precision.
        ExportError: int8 to TorchScript, int8 without calibration images, quantization failed.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {list(EXPORT_FORMATS)}")
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"unknown export precision {precision!r}; choose from {list(EXPORT_PRECISIONS)}")
    meta = dict(metadata) if metadata is not None else model_metadata(model)
    meta["precision"] = precision
    if format == "tflite":
        return _export_tflite(model, Path(path), meta, fold_bn, precision, calibration, input_size)
    if format == "coreml":
        if precision != "fp32":
            raise ExportError("Core ML export writes fp32 ML Programs; pass --precision fp32")
        from deeplab.deploy.coreml import export_coreml

        size = tuple(input_size or FIXED_INPUT_SIZE)
        return export_coreml(prepare_for_export(model, fold_bn), path, metadata=meta, input_size=(size[0], size[1]))
    if precision == "fp32":
        if format == "onnx":
            return export_onnx(model, path, metadata=meta, example_input=example_input, fold_bn=fold_bn, opset=opset)
        return export_torchscript(model, path, metadata=meta, example_input=example_input, fold_bn=fold_bn)
    from deeplab.deploy import quantize
    from deeplab.deploy.accuracy import quantize_to_bound

    if precision == "int8":
        if format != "onnx":
            raise ExportError("int8 export writes ONNX (QDQ) files only; pass --format onnx")
        if calibration is None or not calibration.calibration:
            raise ExportError("int8 export needs calibration images: pass --calib-data DIR or --dataset NAME --data-root ROOT")
        from deeplab.deploy.precision import PARITY_BOUNDS

        method = calib_method or quantize.default_calibration_method()
        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="deeplab-int8-") as tmp:
            float_path = export_onnx(model, Path(tmp) / "fp32.onnx", metadata=meta, example_input=example_input,
                                     fold_bn=fold_bn, opset=opset)
            reference = prepare_for_export(model, fold_bn)
            ranges = (_qat_ranges(reference, float_path, _example(model, example_input), qat, int8_scheme, report)
                      if qat else None)
            with _atomic_target(path) as target:
                # accuracy-aware: the most sensitive layers stay float until the mIoU bound holds
                meta["quantization"], parity = quantize_to_bound(
                    float_path, target, calibration, reference, bound=PARITY_BOUNDS["int8"], method=method,
                    scheme=int8_scheme, max_float_fraction=int8_float_fraction,
                    report=report, activation_ranges=ranges)
        meta["calibration"] = calibration.describe()
        _, which = _parity_inputs(model, calibration)
        parity.update(backend="onnxruntime", precision=precision, inputs=which, reference="fp32 PyTorch")
        meta["parity"] = parity
    else:  # bf16: the float graph, run at bf16 by the runtime
        if format == "onnx":
            path = export_onnx(model, path, metadata=meta, example_input=example_input, fold_bn=fold_bn, opset=opset)
        else:
            path = export_torchscript(model, path, metadata=meta, example_input=example_input, fold_bn=fold_bn)
        if calibration is not None:
            meta["calibration"] = calibration.describe()
        backend = "openvino" if format == "onnx" else "torchscript"
        meta["parity"] = _measure_parity(model, path, meta, calibration, backend, precision, fold_bn)
    if format == "onnx":
        write_onnx_metadata(path, meta)
    else:
        _rewrite_torchscript_metadata(path, meta)
    return Path(path)


def _qat_ranges(model: nn.Module, float_path: Path, example: torch.Tensor, qat: Mapping[str, Any],
               scheme: Optional[str], report: Optional[Callable[[str], None]]) -> Dict[str, Any]:
    """The ONNX tensor -> ``(lo, hi)`` ranges of a ``--qat`` checkpoint's convs."""
    from deeplab.deploy.quantize import conv_input_tensors, resolve_scheme

    tensors = conv_input_tensors(model, float_path, example)
    saved = dict(qat.get("ranges") or {})
    unknown = sorted(set(saved) - set(tensors))
    if unknown:
        raise ExportError(f"the checkpoint's QAT ranges name convs this model lacks ({unknown[:3]}); "
                          "export the model they were tracked on")
    written = resolve_scheme(scheme)[0]
    if written != qat.get("scheme") and report is not None:
        report(f"note: the fine-tuning rounded weights as {qat.get('scheme')}, this export writes {written} "
               "(--int8-scheme)")
    if report is not None:
        report(f"int8 input ranges of {len(saved)} conv(s) from quantization-aware fine-tuning (the checkpoint's "
               "tracked ranges; calibration measures the rest)")
    return {tensors[name]: (float(lo), float(hi)) for name, (lo, hi) in saved.items()}


def _export_tflite(model: nn.Module, path: Path, meta: Dict[str, Any], fold_bn: bool, precision: str,
                   calibration: Optional["CalibrationSet"], input_size: Optional[Tuple[int, int]]) -> Path:
    """A LiteRT file; an int8 one (or any given calibration images) gets its measured parity."""
    from deeplab.deploy.tflite import add_metadata, export_tflite

    size = tuple(input_size or FIXED_INPUT_SIZE)
    path = export_tflite(prepare_for_export(model, fold_bn), path, metadata=meta, input_size=(size[0], size[1]),
                         precision=precision, calibration=calibration)
    if precision == "fp32" and calibration is None:
        return path  # the caller checks fp32 logits against PyTorch (deeplab export prints it)
    meta.update(precision=precision, input_size=list(size))
    if calibration is not None:
        meta["calibration"] = calibration.describe()
    meta["parity"] = _measure_parity(model, path, meta, calibration, "tflite", precision, fold_bn)
    from deeplab.deploy.format import read_metadata

    meta = {**read_metadata(path), **meta}  # keeps what export_tflite recorded (quantization)
    data = add_metadata(path.read_bytes(), meta)
    with _atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return path


def _parity_inputs(model: nn.Module, calibration: Optional["CalibrationSet"]) -> Tuple[List[Any], str]:
    if calibration is not None and calibration.parity:
        which = "held-out calibration images" if calibration.held_out else "calibration images (none held out)"
        return list(calibration.parity), which
    # No images given (bf16): a random input still bounds the logit error, but its pixel
    # agreement says little about photos.
    stride = int(getattr(model, "output_stride", 16) or 16)
    x = torch.randn(1, 3, stride * 20 + 1, stride * 20 + 1, generator=torch.Generator().manual_seed(0))
    return [x.numpy()], "a random input (no calibration images given)"


def _measure_parity(model: nn.Module, path: PathLike, meta: Dict[str, Any], calibration: Optional["CalibrationSet"],
                    backend: str, precision: str, fold_bn: bool) -> Dict[str, Any]:
    from deeplab.deploy.runtime import FixedInputModel, TFLiteModel, load_exported, measure_parity

    arrays, which = _parity_inputs(model, calibration)
    runner: nn.Module = load_exported(path, backend=backend, precision=precision, metadata=meta)
    if isinstance(runner, TFLiteModel):  # one input size: images are padded to it
        runner = FixedInputModel(runner, runner.input_size)
    reference = prepare_for_export(model, fold_bn)
    real = calibration if calibration is not None and calibration.parity else None
    result = measure_parity(reference, runner, arrays, sizes=real.parity_sizes if real else None,
                            masks=real.parity_masks if real else None)
    result.update(backend=backend, precision=precision, inputs=which, reference="fp32 PyTorch")
    return result


def _rewrite_torchscript_metadata(path: PathLike, meta: Mapping[str, Any]) -> None:
    with quiet_tracing():
        module = torch.jit.load(str(path), map_location="cpu")
    with _atomic_target(Path(path)) as tmp, quiet_tracing():
        torch.jit.save(module, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(meta)})
