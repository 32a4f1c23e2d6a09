"""The one copy of each small helper the package shares (standard library + torch only).

- :func:`jsonable`: anything a report or a metrics line holds, as plain JSON (NaN/inf -> null).
- :func:`unwrap_model`: the bare model inside DDP / DataParallel / ``torch.compile``.
- :func:`one_line`: an exception's message on one line, for people.
- :func:`sha256_of`: a file's sha256, read in chunks.
- :class:`DeeplabError`: the base of the project's own errors, for people (the CLI prints
  them as one line); :class:`ConfigError` for invalid configuration values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

__all__ = ["ConfigError", "DeeplabError", "jsonable", "one_line", "sha256_of", "unwrap_model"]


class DeeplabError(Exception):
    """Base of the errors meant for people: the message names the file or value, the cause and the fix.

    ``deeplab <cmd>`` prints these as one line, ``deeplab <cmd>: error: <message>``, exit status 2.
    """


class ConfigError(DeeplabError, ValueError):
    """An invalid configuration value (a ``ValueError``, so ``except ValueError`` still catches it)."""


def jsonable(obj: Any) -> Any:
    """Plain JSON types: dataclasses, mappings, sequences, tensors and numpy scalars converted.

    JSON has no NaN or infinity: non-finite floats become ``None`` (``null``), which
    plotting tools read back as missing values. Paths, devices, dtypes and other objects
    become their ``str``.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # arrays and scalars
        return jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP/DataParallel/``torch.compile`` wrappers (whose attributes we read)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def one_line(exc: BaseException) -> str:
    """``str(exc)`` on one line (torch's ``load_state_dict`` message spans lines and ends with ". ")."""
    return " ".join(str(exc).split()).rstrip(". ")


def sha256_of(path: Union[str, "os.PathLike[str]"]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
