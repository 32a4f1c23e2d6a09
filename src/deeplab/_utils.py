"""The one copy of each small helper the package shares (standard library + torch only).

- :func:`jsonable`: anything a report or a metrics line holds, as plain JSON (NaN/inf -> null).
- :func:`unwrap_model`: the bare model inside DDP / DataParallel / ``torch.compile``.
- :func:`one_line`: an exception's message on one line, for people.
- :func:`sha256_of`: a file's sha256, read in chunks.
- :func:`load_state_dict_strict`: strict ``load_state_dict`` whose error lists the missing,
  unexpected and mis-shaped keys (summarised) and the fix; :func:`summarise_keys`.
- :class:`DeeplabError`: the base of the project's own errors, for people (the CLI prints
  them as one line); :class:`ConfigError` for invalid configuration values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, List, Optional, Sequence, Type, Union

import torch
from torch import nn

__all__ = [
    "ConfigError",
    "atomic_write",
    "fsync_dir",
    "save_atomically",
    "DeeplabError",
    "FAULT_ENV",
    "fault_point",
    "jsonable",
    "optional_import",
    "load_state_dict_strict",
    "one_line",
    "print_config",
    "sha256_of",
    "summarise_keys",
    "unwrap_model",
]


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


def optional_import(name: str) -> Optional[ModuleType]:
    """The module ``name``, or ``None`` where it is not installed (for optional dependencies)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


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


def fsync_dir(directory: Union[str, "os.PathLike[str]"]) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Union[str, "os.PathLike[str]"], mode: Optional[str] = "wb", *,
                 encoding: Optional[str] = None) -> Iterator[Any]:
    """Write ``path`` all at once or not at all: the one atomic writer of the package.

    The block writes a temporary file beside ``path`` whose name is unique per process and
    call (``.<name>.<random>.tmp``, :func:`tempfile.mkstemp`, so concurrent writers never
    clash); when the block ends it is flushed, fsynced, given a normal file's permissions and
    renamed over ``path`` (then the folder is fsynced). If the block raises, the temporary
    file is removed and ``path`` keeps what it held.

    Args:
        path: the destination; parent folders are created.
        mode: ``"wb"`` / ``"w"``: the block gets an open handle; ``None``: it gets the
            temporary :class:`~pathlib.Path` to write by name (exporters, copies, links).
        encoding: text mode's encoding.
    """
    import tempfile

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(name)
    try:
        umask = os.umask(0)  # mkstemp makes 0600 files; give the result a normal file's permissions
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        if mode is None:
            os.close(fd)
            tmp.unlink()  # writers by name create the file themselves (some refuse an existing one)
            yield tmp
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        else:
            with os.fdopen(fd, mode, encoding=encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def save_atomically(obj: Any, path: Union[str, "os.PathLike[str]"]) -> None:
    """``torch.save(obj)`` through :func:`atomic_write`: a reader never sees a half-written
    file, and a failed write leaves ``path`` as it was."""
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def print_config(title: str, config: Mapping[str, Any], *, stream: Any = None) -> None:
    """Print a resolved configuration, one ``key  json-value`` line per field, under ``title:``."""
    stream = stream or sys.stdout
    print(f"{title}:", file=stream)
    width = max((len(k) for k in config), default=0)
    for key, value in config.items():
        print(f"  {key:<{width}}  {json.dumps(value, default=str)}", file=stream)
    stream.flush()


def summarise_keys(keys: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` keys, comma-separated, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module,
    state: Mapping[str, Any],
    *,
    source: str,
    fix: str,
    error: Type[Exception] = DeeplabError,
) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error for people.

    Before loading, ``state`` is compared with ``module.state_dict()``; when they differ the
    error lists the missing, unexpected and mis-shaped keys (counts and the first few names)
    instead of torch's multi-line dump. BatchNorm's ``num_batches_tracked`` may be missing:
    PyTorch fills it in for files saved before it existed.

    Args:
        module: the model or backbone to fill.
        state: name -> tensor, e.g. a checkpoint's ``"model"`` entry (wrapper prefixes
            already stripped).
        source: the opening clause naming the file and what it should fit, e.g.
            ``"weights in run/last.pt do not fit the deeplabv3plus / resnet101 model"``.
        fix: what the reader should do, ending the message.
        error: the exception type to raise (the caller's own, e.g. ``CheckpointError``).

    Raises:
        error: ``"<source>; missing keys (N): ...; unexpected keys (N): ...; shape mismatches
            (N): key (file shape) vs (model shape); <fix>"``.
    """
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    mis_shaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and hasattr(state[k], "shape") and state[k].shape != expected[k].shape
    )
    parts: List[str] = [source]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {summarise_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {summarise_keys(unexpected)}")
    if mis_shaped:
        parts.append(f"shape mismatches ({len(mis_shaped)}): {summarise_keys(mis_shaped)}")
    if len(parts) > 1:
        raise error("; ".join(parts + [fix]))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # Keys and shapes agree but torch still refuses (e.g. a non-tensor value, or a
        # num_batches_tracked missing from a file that says it is recent): its own words.
        raise error("; ".join([source, one_line(exc), fix])) from exc


# --------------------------------------------------------------------------- test-only fault injection

FAULT_ENV = "DEEPLAB_TEST_KILL_AT"


def fault_point(point: str, step: int) -> None:
    """Test-only: die here when ``DEEPLAB_TEST_KILL_AT`` names this point (never set it in real runs).

    The variable is ``POINT:STEP[:RANK[:ACTION]]`` (several joined by commas), e.g.
    ``after_ckpt:6:1`` kills rank 1 right after ``last.pt`` of step 6 is written. It fires
    only in the first generation of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` unset or
    0), so the restarted workers run through. ``ACTION`` is ``kill`` (SIGKILL, the default:
    nothing is flushed, as when a node is lost) or ``stop`` (SIGSTOP: the process hangs,
    as a wedged worker or a network partition does). This is the one place the variable
    is read; the fault-tolerance tests use it to kill workers at exact points.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    import signal  # only when the hook is armed

    rank = os.environ.get("RANK", "0")
    for entry in spec.split(","):
        parts = entry.strip().split(":")
        if len(parts) < 2 or parts[0] != point or parts[1] != str(step):
            continue
        if len(parts) > 2 and parts[2] not in ("", "*", rank):
            continue
        action = parts[3] if len(parts) > 3 else "kill"
        import sys
        import time

        # The tests time the restart from this line.
        print(f"{FAULT_ENV}: rank {rank} {action} at {point}:{step} time={time.time():.3f}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
