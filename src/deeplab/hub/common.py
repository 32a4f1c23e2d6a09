"""What every part of :mod:`deeplab.hub` shares: file names, ids, errors, the optional packages."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from torch import nn

from deeplab._utils import DeeplabError

PathLike = Union[str, "os.PathLike[str]"]

HUB_PREFIX = "hf://"
HUB_FORMAT = "deeplab-hub"
HUB_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
INSTALL_HINT = 'pip install "deeplab[hub]"  (huggingface_hub and safetensors)'
# The Hub's rule for a repo id: namespace/name, letters, digits, "-", "_", "." (no "--", no "..").
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

CITATION = """@inproceedings{deeplabv3plus2018,
  title     = {Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation},
  author    = {Liang-Chieh Chen and Yukun Zhu and George Papandreou and Florian Schroff and Hartwig Adam},
  booktitle = {ECCV},
  year      = {2018}
}"""
TF_REFERENCE = "https://github.com/tensorflow/models/tree/master/research/deeplab"
TF_ZOO_PAGE = "https://github.com/tensorflow/models/blob/master/research/deeplab/g3doc/model_zoo.md"


class HubError(DeeplabError, ValueError):
    """A Hub model cannot be saved, pushed or loaded; the message names the repo or file and the fix."""


@dataclass
class HubModel:
    """What :func:`load_pretrained` returns: the model and everything ``config.json`` says of it.

    Attributes:
        model: the DeepLab model in eval mode (weights loaded strictly).
        config: the parsed ``config.json``.
        directory: the folder the files were read from (a snapshot in the Hub cache).
        repo_id, revision: where it came from (``None`` for a local folder); ``revision`` is the
            commit the files belong to when known.
    """

    model: nn.Module
    config: Dict[str, Any]
    directory: Path
    repo_id: Optional[str] = None
    revision: Optional[str] = None

    @property
    def classes(self) -> List[str]:
        return [str(c) for c in self.config["classes"]]

    @property
    def palette(self) -> Optional[List[List[int]]]:
        return self.config.get("palette")

    @property
    def normalization(self) -> Dict[str, List[float]]:
        return dict(self.config["normalization"])

    @property
    def source(self) -> str:
        if self.repo_id is None:
            return str(self.directory)
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class PushResult:
    """Where :func:`push_to_hub` put the model: the repo, the branch and the new commit."""

    repo_id: str
    revision: str
    commit: str
    url: str


# --------------------------------------------------------------------------- names


def is_hub_id(source: str) -> bool:
    """``hf://org/repo[@rev]`` always; ``org/repo[@rev]`` when no such local path exists."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return True
    if os.path.exists(text):
        return False
    return _REPO_ID.match(text.split("@", 1)[0]) is not None


def parse_hub_id(source: str, revision: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``"hf://org/repo@v1"`` -> ``("org/repo", "v1")``; an explicit ``revision`` must agree.

    Raises:
        HubError: not ``org/repo``, or two different revisions asked for.
    """
    text = str(source)
    if text.startswith(HUB_PREFIX):
        text = text[len(HUB_PREFIX):]
    repo_id, _, pinned = text.partition("@")
    repo_id = repo_id.strip("/")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise HubError(f"{source!r} is not a Hub model id; write org/name (optionally @revision), "
                       "e.g. hf://org/deeplab-voc@v1")
    if pinned and revision and pinned != revision:
        raise HubError(f"{source!r} pins revision {pinned!r} but revision={revision!r} was passed; give one")
    return repo_id, (pinned or revision or None)


# --------------------------------------------------------------------------- optional packages


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise HubError(f"the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}") from exc
    return huggingface_hub


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:
        raise HubError(f"model.safetensors files need safetensors: {INSTALL_HINT}") from exc
    return safetensors.torch


def _endpoint() -> Optional[str]:
    # huggingface_hub reads HF_ENDPOINT once, at import; read it per call so it can be set later.
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _cache_dir(cache_dir: Optional[PathLike]) -> Optional[str]:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------- small helpers


def _percent(value: Any) -> Optional[float]:
    """A metric as a percentage: fractions (training's ``mIoU`` 0.71) and percents (the zoo's 82.2) alike."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return None
    return float(value) * 100.0 if abs(value) <= 1.0 else float(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
