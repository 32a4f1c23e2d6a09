"""Opening the TF reference's checkpoints: a prefix, its ``.index``, a directory or a model-zoo tarball,
read by this package's tensor-bundle reader or by TensorFlow's; and the converter's errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Protocol, Tuple, Union

import numpy as np

from .._utils import DeeplabError
from .bundle import BundleError, CheckpointReader

PathLike = Union[str, "os.PathLike[str]"]
READERS = ("python", "tensorflow")


class ConversionError(DeeplabError, ValueError):
    """The checkpoint cannot be converted; the message lists the offending variables."""


class ConversionWarning(UserWarning):
    """Variables outside the model (training state, optimizer slots, summaries) were skipped."""


class TensorSource(Protocol):
    """What the converter needs from a checkpoint."""

    def shapes(self) -> Dict[str, Tuple[int, ...]]: ...

    def read(self, name: str) -> np.ndarray: ...


class DictSource:
    """An in-memory checkpoint: ``{tf_name: array}`` (tests, or tensors from elsewhere)."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def read(self, name: str) -> np.ndarray:
        return self.tensors[name]


class TensorFlowSource:
    """A checkpoint read by TensorFlow's own ``tf.train.load_checkpoint`` (``--reader tensorflow``)."""

    def __init__(self, prefix: PathLike) -> None:
        try:
            import tensorflow as tf  # noqa: F401  (optional; only for this reader)
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConversionError(
                "--reader tensorflow needs TensorFlow (pip install 'deeplab[tf]'); the default "
                "--reader python needs nothing"
            ) from exc
        from .bundle import resolve_prefix

        self._reader = tf.train.load_checkpoint(str(resolve_prefix(prefix)))

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: tuple(v) for k, v in self._reader.get_variable_to_shape_map().items()}

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._reader.get_tensor(name))


class PythonSource:
    """A checkpoint read by :class:`deeplab.tf.bundle.CheckpointReader` (no TensorFlow)."""

    def __init__(self, prefix: PathLike) -> None:
        self._reader = CheckpointReader(prefix)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return self._reader.shapes()

    def read(self, name: str) -> np.ndarray:
        return self._reader.read(name)


def _is_tarball(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return True
    # A renamed download: sniff it, but never a checkpoint's own files.
    return not (path.name.endswith(".index") or ".data-" in path.name) and tarfile.is_tarfile(path)


def _extract_checkpoint(tarball: Path, dest: Path) -> Path:
    """Extract the one checkpoint (``.index`` + its data shards) of a tarball into ``dest``.

    Only those members are written, each under its base name, so a hostile archive cannot
    write outside ``dest``.
    """
    with tarfile.open(tarball) as archive:
        members = [m for m in archive.getmembers() if m.isfile()]
        indexes = [m for m in members if m.name.endswith(".index")]
        if len(indexes) != 1:
            found = [m.name for m in indexes] or "none"
            raise ConversionError(
                f"{tarball} holds {len(indexes)} TensorFlow checkpoints ({found}); a model-zoo tarball holds "
                "one. Extract it and pass the prefix of the checkpoint you want (DIR/model.ckpt)"
            )
        prefix = indexes[0].name[: -len(".index")]
        wanted = [m for m in members if m.name == indexes[0].name or m.name.startswith(prefix + ".data-")]
        if len(wanted) < 2:
            raise ConversionError(f"{tarball}: {indexes[0].name} has no .data-* file next to it; the archive is incomplete")
        for member in wanted:
            handle = archive.extractfile(member)
            if handle is None:  # pragma: no cover - regular files always have a handle
                raise ConversionError(f"{tarball}: cannot read {member.name}")
            with handle, open(dest / Path(member.name).name, "wb") as out:
                shutil.copyfileobj(handle, out, 1 << 20)
    return dest / Path(prefix).name


@contextlib.contextmanager
def open_checkpoint(path: PathLike, *, reader: str = "python") -> Iterator[TensorSource]:
    """Open a TF checkpoint: a prefix, its ``.index``, a directory, or a model-zoo tarball.

    Args:
        path: where the checkpoint is.
        reader: ``"python"`` (this package's tensor-bundle reader, no TensorFlow needed) or
            ``"tensorflow"`` (``tf.train.load_checkpoint``; needs TensorFlow installed).
    """
    if reader not in READERS:
        raise ConversionError(f"unknown reader {reader!r}; choose from {list(READERS)}")
    p = Path(path).expanduser()
    if not p.exists() and not p.with_name(p.name + ".index").exists():
        raise ConversionError(
            f"{p} does not exist; pass the model-zoo .tar.gz, or the checkpoint prefix (e.g. "
            "DIR/model.ckpt for DIR/model.ckpt.index + DIR/model.ckpt.data-00000-of-00001)"
        )
    with contextlib.ExitStack() as stack:
        if _is_tarball(p):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deeplab-tf-")))
            try:
                p = _extract_checkpoint(p, tmp)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise ConversionError(f"{path}: not a readable tar archive ({exc}); download it again") from exc
        try:
            source: TensorSource = PythonSource(p) if reader == "python" else TensorFlowSource(p)
        except BundleError as exc:
            raise ConversionError(str(exc)) from exc
        yield source


__all__ = ["ConversionError", "ConversionWarning", "DictSource", "PythonSource", "READERS", "TensorFlowSource",
           "TensorSource", "open_checkpoint"]
