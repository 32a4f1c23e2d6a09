"""The saved-model contract both sides read: file names, ``hf://`` ids, checking a folder.

A leaf of :mod:`deeplab.hub`: the names of the three files and the ``config.json`` format tag,
:class:`HubError`, parsing ``org/repo@revision``, the optional packages (``huggingface_hub``,
``safetensors``) and ``HF_ENDPOINT`` read at call time, and reading / verifying a saved folder
(:func:`read_folder_config`, :func:`verify_weights`), which pushing and loading both do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .._utils import DeeplabError, sha256_of

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "HUB_FORMAT",
    "HUB_PREFIX",
    "HUB_VERSION",
    "INSTALL_HINT",
    "WEIGHTS_NAME",
    "HubError",
    "PathLike",
    "first_line",
    "hub_endpoint",
    "is_hub_id",
    "parse_hub_id",
    "read_folder_config",
    "require_huggingface_hub",
    "require_safetensors",
    "verify_weights",
]

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


class HubError(DeeplabError, ValueError):
    """A Hub model cannot be saved, pushed or loaded; the message names the repo or file and the fix."""


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


# --------------------------------------------------------------------------- optional packages, environment


def require_huggingface_hub() -> Any:
    """The ``huggingface_hub`` module; :class:`HubError` with the install line where it is missing."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise HubError(f"the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}") from exc
    return huggingface_hub


def require_safetensors() -> Any:
    """The ``safetensors.torch`` module; :class:`HubError` with the install line where it is missing."""
    try:
        import safetensors.torch
    except ImportError as exc:
        raise HubError(f"model.safetensors files need safetensors: {INSTALL_HINT}") from exc
    return safetensors.torch


def hub_endpoint() -> Optional[str]:
    """``HF_ENDPOINT`` without a trailing slash, or ``None`` (then huggingface_hub's default)."""
    # huggingface_hub reads HF_ENDPOINT once, at import; read it per call so it can be set later.
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


# --------------------------------------------------------------------------- reading a saved folder


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (the Hub's errors carry a response body after it)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_folder_config(directory: Path, *, what: str) -> Dict[str, Any]:
    """The ``config.json`` of a saved folder, checked to be a deeplab one this version reads."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise HubError(f"{what} has no {CONFIG_NAME}; it is not a model written by deeplab save_pretrained "
                       "(deeplab push --checkpoint best.pt writes one)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HubError(f"cannot read {path}: {first_line(exc)}; download it again") from exc
    if not isinstance(config, dict) or config.get("format") != HUB_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise HubError(f"{path} is not a deeplab model config (format {found!r}, expected {HUB_FORMAT!r}); "
                       "this repo holds another library's model")
    if not isinstance(config.get("version"), int) or config["version"] > HUB_VERSION:
        raise HubError(f"{path} has version {config.get('version')!r}, newer than this deeplab reads "
                       f"(<= {HUB_VERSION}); upgrade deeplab")
    missing = [k for k in ("model_config", "classes", "normalization", "weights") if not config.get(k)]
    if missing:
        raise HubError(f"{path} lacks {missing}; save the model again with deeplab save_pretrained")
    return config


def verify_weights(path: Path, config: Mapping[str, Any], *, what: str) -> None:
    """The weights file must be exactly the one ``config.json`` records (size, then sha256)."""
    if not path.is_file():
        raise HubError(f"{what} is missing; save or download the model again")
    expected = dict(config["weights"])
    size = path.stat().st_size
    if size != int(expected.get("size", -1)):
        raise HubError(f"{what} has {size} bytes but {CONFIG_NAME} records {expected.get('size')}: the file was "
                       "changed or truncated after it was saved; refusing to load it - download it again "
                       "(force_download=True) or ask the repo's owner to re-upload")
    digest = sha256_of(path)
    if digest != expected.get("sha256"):
        raise HubError(f"{what} has sha256 {digest[:16]}... but {CONFIG_NAME} records "
                       f"{str(expected.get('sha256'))[:16]}...: the file was changed after it was saved; refusing "
                       "to load it - download it again (force_download=True) or ask the repo's owner to re-upload")
