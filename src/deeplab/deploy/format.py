"""The exported-file contract: metadata keys, file sniffing, reading metadata, ``ExportError``.

Both sides of a deployment read this module: :mod:`deeplab.deploy.export` writes files that
follow it, :mod:`deeplab.deploy.runtime` opens them. It is a leaf - standard library, torch
and :mod:`deeplab._utils` only - so neither side has to import the other.

* ONNX files carry the metadata as ``metadata_props`` entry :data:`METADATA_KEY`
  (``"deeplab"``), a JSON string.
* TorchScript files carry the same JSON as the extra file :data:`TORCHSCRIPT_METADATA_FILE`
  (``deeplab.json``).
* LiteRT (TFLite) files carry it as the flatbuffer's ``metadata`` entry :data:`METADATA_KEY`
  (read with ``ai-edge-litert``'s schema).
* The JSON is a dict with ``"format": METADATA_FORMAT`` and ``"version" <= METADATA_VERSION``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Union

import torch

from deeplab._utils import DeeplabError, optional_import

__all__ = [
    "METADATA_FORMAT",
    "METADATA_KEY",
    "METADATA_VERSION",
    "FIXED_INPUT_SIZE",
    "TORCHSCRIPT_METADATA_FILE",
    "ExportError",
    "is_onnx",
    "is_tflite",
    "sniff_format",
    "quiet_tracing",
    "read_metadata",
    "validate_metadata",
]

PathLike = Union[str, "os.PathLike[str]"]

METADATA_KEY = "deeplab"
TORCHSCRIPT_METADATA_FILE = "deeplab.json"
METADATA_FORMAT = "deeplab-export"
METADATA_VERSION = 1
# The input size of the formats whose graphs have one (LiteRT, Core ML) unless asked otherwise: the
# paper's eval crop.
FIXED_INPUT_SIZE = (513, 513)


class ExportError(DeeplabError, RuntimeError):
    """An export could not be written or does not reproduce the model; the message says why.

    A :class:`~deeplab._utils.DeeplabError` (one line for people) and, as before, a
    ``RuntimeError``, so existing ``except RuntimeError`` handlers still catch it.
    """


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the tracer's and exporter's warnings inside the ``with`` block.

    Tracer/exporter warnings about constant shape checks (``x.shape[1] != 3``), the legacy
    exporter's deprecation notice and torch 2.9+'s ``torch.jit`` deprecation on every load say
    nothing actionable to a user of ``deeplab export`` or ``deeplab predict``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        yield


TFLITE_IDENTIFIER = b"TFL3"  # the flatbuffer file identifier of every LiteRT / TFLite model


def is_tflite(path: PathLike) -> bool:
    """Whether ``path`` is a LiteRT (TFLite) flatbuffer: by suffix, else by its file identifier."""
    path = Path(path)
    if path.suffix.lower() == ".tflite":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(8)[4:8] == TFLITE_IDENTIFIER


def is_onnx(path: PathLike) -> bool:
    """Whether ``path`` is an ONNX file (by suffix, else by content) rather than TorchScript
    or LiteRT.

    Args:
        path: an existing exported file.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    if is_tflite(path):
        return False
    # TorchScript files are zip archives; an ONNX protobuf is not.
    with open(path, "rb") as handle:
        return handle.read(2) != b"PK"


# Exported files by suffix; anything else is told apart by its content (see :func:`sniff_format`).
EXPORTED_SUFFIXES = {".onnx": "onnx", ".xml": "openvino-ir", ".ts": "torchscript", ".torchscript": "torchscript",
                     ".pts": "torchscript", ".tflite": "tflite", ".mlpackage": "coreml"}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def sniff_format(path: PathLike) -> str:
    """What a model file is: ``"checkpoint"`` (``torch.save``), ``"onnx"``, ``"torchscript"``,
    ``"openvino-ir"``, ``"tflite"`` or ``"coreml"`` (an ``.mlpackage`` folder) - the one place model
    files are told apart.

    By suffix for the exported kinds, else by content: TorchScript and checkpoints are both zip
    archives, but TorchScript holds ``code/`` and ``constants.pkl``. A missing file is named by
    its suffix (a checkpoint unless the suffix says otherwise), so its own loader reports it.
    """
    import zipfile

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in EXPORTED_SUFFIXES:
        return EXPORTED_SUFFIXES[suffix]
    if not path.is_file():
        return "checkpoint"
    if not zipfile.is_zipfile(path):
        if is_tflite(path):
            return "tflite"
        return "checkpoint" if suffix in CHECKPOINT_SUFFIXES else "onnx"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    return "checkpoint"


def validate_metadata(meta: Any, path: PathLike) -> Dict[str, Any]:
    """``meta`` if it is deeplab export metadata this version can read.

    Args:
        meta: the decoded JSON.
        path: the file it came from (for the message).

    Raises:
        ExportError: not deeplab metadata, or written by a newer metadata version.
    """
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise ExportError(f"{path} carries no deeplab metadata; re-export it with `deeplab export`")
    if int(meta.get("version", 0)) > METADATA_VERSION:
        raise ExportError(f"{path} was exported by a newer deeplab (metadata version {meta['version']}); upgrade deeplab")
    return meta


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata embedded by :func:`~deeplab.deploy.export.export_onnx` /
    :func:`~deeplab.deploy.export.export_torchscript` / :func:`deeplab.deploy.tflite.export_tflite`.

    ONNX files are read with the ``onnx`` package when it is installed, else with OpenVINO
    (``rt_info``); TorchScript files need only torch; LiteRT files ``ai-edge-litert``.

    Raises:
        FileNotFoundError: no such file.
        ExportError: the file has no deeplab metadata or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if is_tflite(path):
        text = tflite_metadata_text(path)
    elif is_onnx(path):
        text = _onnx_metadata_text(path)
    else:
        extra = {TORCHSCRIPT_METADATA_FILE: ""}
        try:
            with quiet_tracing():
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:  # torch raises RuntimeError with a long C++ trace
            raise ExportError(f"cannot read {path} as ONNX or TorchScript: {str(exc).splitlines()[0]}") from exc
        text = extra[TORCHSCRIPT_METADATA_FILE]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
    if not text:
        raise ExportError(f"{path} carries no deeplab metadata; re-export it with `deeplab export`")
    return validate_metadata(json.loads(text), path)


def _onnx_metadata_text(path: Path) -> str:
    onnx = optional_import("onnx")
    if onnx is not None:
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ExportError(f"cannot read ONNX file {path}: {exc}") from exc
        return next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), "")
    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportError(
            f"reading {path} needs the onnx package (pip install 'deeplab[onnx]') or openvino"
        ) from exc
    model = ov.Core().read_model(str(path))
    for keys in (["framework", METADATA_KEY], [METADATA_KEY]):
        if model.has_rt_info(keys):
            value = model.get_rt_info(keys)
            return str(value.astype(str) if hasattr(value, "astype") else value)
    return ""


def tflite_metadata_text(path: PathLike) -> str:
    """The :data:`METADATA_KEY` entry of a LiteRT file's ``metadata`` ("" when it has none)."""
    schema = optional_import("ai_edge_litert.schema_py_generated")
    if schema is None:
        raise ExportError(f"reading {path} needs the LiteRT runtime: pip install ai-edge-litert (or 'deeplab[tflite]')")
    data = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == METADATA_KEY.encode():
                buffer = model.Buffers(entry.Buffer())
                if buffer.Offset() > 1:  # stored after the flatbuffer (large models)
                    return data[buffer.Offset(): buffer.Offset() + buffer.Size()].decode("utf-8")
                return buffer.DataAsNumpy().tobytes().decode("utf-8")
    except Exception as exc:  # a truncated or foreign flatbuffer raises anything from struct to IndexError
        raise ExportError(f"cannot read LiteRT file {path}: {exc}") from exc
    return ""
