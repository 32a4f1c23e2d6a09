"""Core ML export: ``deeplab export --format coreml`` writes an ``.mlpackage`` (ML Program).

The model goes through ``torch.export`` (the graph capture every architecture passes) and
``coremltools``' converter, at one input size (``input_size``, default 513 x 513) and fp32 compute
precision, so the file computes what the PyTorch model computes up to float32 rounding. Input
``image`` ``(1, 3, H, W)`` float32 normalised as the model was trained; output ``logits``
``(1, C, H, W)``. The deeplab metadata (classes, palette, normalisation, config) is the model's
``user_defined_metadata["deeplab"]``.

Core ML runs on Apple's operating systems only: coremltools converts and saves on Linux but
cannot run a prediction there. So an export here is checked by its specification (input and
output names, shapes and types, the metadata), not by running it; run the file on a Mac or an
iPhone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

import torch
from torch import nn

from deeplab._utils import optional_import
from deeplab.deploy.format import FIXED_INPUT_SIZE, METADATA_KEY, ExportError, quiet_tracing

__all__ = ["check_spec", "export_coreml"]

PathLike = Union[str, "os.PathLike[str]"]


def _coremltools() -> Any:
    # On Linux coremltools warns at import that its macOS-only runtime is missing: this module says so once itself.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # it imports TensorFlow where that is installed
    module = optional_import("coremltools")
    if module is None:
        raise ExportError("--format coreml converts with coremltools, which is not installed: pip install 'deeplab[coreml]'")
    return module


def export_coreml(model: nn.Module, path: PathLike, *, metadata: Mapping[str, Any],
                  input_size: Tuple[int, int] = FIXED_INPUT_SIZE) -> Path:
    """Convert ``model`` (BatchNorm folded, eval mode, CPU) to an ``.mlpackage`` at ``path``.

    Written beside ``path`` first and renamed into place, so a failed export leaves nothing.

    Raises:
        ExportError: coremltools is not installed, or the conversion failed.
    """
    ct = _coremltools()
    h, w = (int(v) for v in input_size)
    channels = int(getattr(model, "in_channels", 3) or 3)
    example = torch.zeros(1, channels, h, w)
    try:
        with quiet_tracing(), torch.no_grad():
            program = torch.export.export(model, (example,)).run_decompositions({})
            mlmodel = ct.convert(program, inputs=[ct.TensorType(name="image", shape=example.shape)],
                                 outputs=[ct.TensorType(name="logits")], convert_to="mlprogram",
                                 compute_precision=ct.precision.FLOAT32,
                                 minimum_deployment_target=ct.target.iOS16)
    except Exception as exc:  # the converter raises anything from torch.export to MIL errors
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(f"coremltools could not convert the model: {first}") from exc
    meta: Dict[str, Any] = dict(metadata)
    meta.update(precision="fp32", input_size=[h, w])
    mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps(meta)
    mlmodel.short_description = (f"DeepLab {meta.get('config', {}).get('arch', '')} "
                                 f"{meta.get('config', {}).get('backbone', '')}: {meta.get('num_classes')} classes").strip()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        target = staging / path.name
        mlmodel.save(str(target))
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def check_spec(path: PathLike, num_classes: int, input_size: Tuple[int, int], channels: int = 3) -> Dict[str, Any]:
    """Read an ``.mlpackage`` back (without loading it for prediction, which needs macOS) and
    check its interface: ``image`` ``(1, channels, H, W)`` float32 in, ``logits`` ``(1, C, H, W)`` out,
    the deeplab metadata present.

    Returns:
        ``{"input": ..., "output": ..., "metadata": ...}`` as read.

    Raises:
        ExportError: the file does not have that interface.
    """
    ct = _coremltools()
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    (inp,), (out,) = spec.description.input, spec.description.output
    h, w = input_size
    got = {
        "input": (inp.name, tuple(inp.type.multiArrayType.shape), inp.type.multiArrayType.dataType),
        "output": (out.name, tuple(out.type.multiArrayType.shape), out.type.multiArrayType.dataType),
        "metadata": dict(spec.description.metadata.userDefined),
    }
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    want_in, want_out = ("image", (1, channels, h, w), float32), ("logits", (1, num_classes, h, w), float32)
    if got["input"] != want_in or got["output"] != want_out or METADATA_KEY not in got["metadata"]:
        raise ExportError(f"{path} does not have the expected interface: input {got['input']} (want {want_in}), "
                          f"output {got['output']} (want {want_out}), metadata keys {sorted(got['metadata'])}")
    return got
