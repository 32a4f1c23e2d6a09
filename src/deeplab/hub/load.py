"""Loading: a saved folder (:func:`load_pretrained`) or a Hub repo through the Hub cache
(:func:`load_from_hub`, :func:`from_pretrained`), and a deeplab checkpoint of a Hub model
(:func:`checkpoint_for`)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._utils import load_state_dict_strict
from ..config import ModelConfig
from .format import (
    CARD_NAME,
    CONFIG_NAME,
    HUB_PREFIX,
    WEIGHTS_NAME,
    HubError,
    PathLike,
    first_line,
    hub_endpoint,
    parse_hub_id,
    read_folder_config,
    require_huggingface_hub,
    require_safetensors,
    verify_weights,
)

__all__ = ["HubModel", "checkpoint_for", "from_pretrained", "load_from_hub", "load_pretrained"]

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


def load_pretrained(directory: PathLike, *, output_stride: Optional[int] = None, what: Optional[str] = None,
                    repo_id: Optional[str] = None, revision: Optional[str] = None) -> HubModel:
    """Rebuild and strictly load the model of a folder written by :func:`save_pretrained`.

    Raises:
        HubError: not a deeplab folder, weights that differ from what ``config.json`` records,
            or weights that do not fit the model rebuilt from the config.
    """
    safetensors_torch = require_safetensors()
    folder = Path(directory)
    label = what or str(folder)
    config = read_folder_config(folder, what=label)
    weights = folder / WEIGHTS_NAME
    verify_weights(weights, config, what=f"{label}: {WEIGHTS_NAME}")
    try:
        model_config = ModelConfig.from_dict(dict(config["model_config"]))
    except (TypeError, ValueError) as exc:
        raise HubError(f"{label}: {CONFIG_NAME} has an unusable model config: {first_line(exc)}") from exc
    if len(config["classes"]) != model_config.num_classes:
        raise HubError(f"{label}: {CONFIG_NAME} names {len(config['classes'])} classes for a model with "
                       f"{model_config.num_classes}; fix the file or save the model again")
    if output_stride is not None:
        model_config = dataclasses.replace(model_config, output_stride=int(output_stride))
    try:
        state = safetensors_torch.load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
        raise HubError(f"{label}: {WEIGHTS_NAME} is not a readable safetensors file ({first_line(exc)}); "
                       "download it again") from exc
    from ..models import build_model_from_config

    model = build_model_from_config(model_config, pretrained_backbone=None)
    load_state_dict_strict(
        model, state,
        source=f"weights in {label} do not fit the {model_config.arch} / {model_config.backbone} model rebuilt "
               f"from its {CONFIG_NAME}",
        fix="the repo mixes files of different models; upload them again with deeplab push",
        error=HubError,
    )
    return HubModel(model=model.eval(), config=config, directory=folder, repo_id=repo_id, revision=revision)


def _download(repo_id: str, revision: Optional[str], *, cache_dir: Optional[PathLike], token: Optional[str],
              force_download: bool) -> Tuple[Path, Optional[str]]:
    """``config.json``, ``model.safetensors`` and the card into the Hub cache; their snapshot folder."""
    hf = require_huggingface_hub()
    errors = hf.errors
    offline = _offline()
    where = _cache_dir(cache_dir)
    label = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    paths = {}
    for filename in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        try:
            paths[filename] = hf.hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=where, token=token, endpoint=hub_endpoint(),
                local_files_only=offline, force_download=force_download and not offline,
            )
        except errors.LocalEntryNotFoundError as exc:
            if filename == CARD_NAME:
                continue
            cache = where or hf.constants.HF_HUB_CACHE
            if offline:
                raise HubError(f"{label}: {filename} is not in the Hub cache {cache} and HF_HUB_OFFLINE=1 forbids "
                               "downloading it; load it once online (or copy the cache), or unset HF_HUB_OFFLINE") from exc
            raise HubError(f"cannot download {label} ({first_line(exc)}) and {filename} is not in the Hub cache "
                           f"{cache}; check the network or HF_ENDPOINT") from exc
        except errors.RepositoryNotFoundError as exc:
            raise HubError(f"{label}: no such model repo, or it is private (log in: HF_TOKEN or "
                           "`huggingface-cli login`)") from exc
        except errors.RevisionNotFoundError as exc:
            raise HubError(f"{label}: the repo has no revision {revision!r}; give a branch, tag or commit "
                           "it has") from exc
        except errors.EntryNotFoundError as exc:
            if filename == CARD_NAME:
                continue  # the card is for people; a repo without one still loads
            # (after LocalEntryNotFoundError, its subclass)
            raise HubError(f"{label} has no {filename}; it is not a deeplab model (upload one with deeplab push)") from exc
        except errors.HfHubHTTPError as exc:
            raise HubError(f"cannot download {filename} of {label}: {first_line(exc)}") from exc
        except OSError as exc:  # huggingface_hub's size check after a download ("Consistency check failed")
            raise HubError(f"cannot download {filename} of {label}: {first_line(exc)}; try again "
                           "(force_download=True)") from exc
    snapshot = Path(paths[CONFIG_NAME]).parent
    if Path(paths[WEIGHTS_NAME]).parent != snapshot:
        raise HubError(f"{label}: {CONFIG_NAME} and {WEIGHTS_NAME} came from different commits (the repo changed "
                       "while downloading); pin a commit with @revision or try again")
    # the cache keeps one folder per commit: snapshots/<commit>/
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    return snapshot, commit


def load_from_hub(
    source: str,
    *,
    revision: Optional[str] = None,
    output_stride: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    token: Optional[str] = None,
    force_download: bool = False,
) -> HubModel:
    """:func:`load_pretrained` for a Hub id (``org/repo``, ``hf://org/repo@rev``) or a saved folder."""
    if os.path.isdir(os.fspath(source)) and not str(source).startswith(HUB_PREFIX):
        return load_pretrained(source, output_stride=output_stride)
    repo_id, pinned = parse_hub_id(source, revision)
    snapshot, commit = _download(repo_id, pinned, cache_dir=cache_dir, token=token, force_download=force_download)
    label = f"{HUB_PREFIX}{repo_id}" + (f"@{pinned}" if pinned else "")
    return load_pretrained(snapshot, output_stride=output_stride, what=label, repo_id=repo_id, revision=commit)


def from_pretrained(
    source: str,
    *,
    revision: Optional[str] = None,
    output_stride: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    token: Optional[str] = None,
    force_download: bool = False,
) -> nn.Module:
    """The model of a Hub repo (or a folder written by :func:`save_pretrained`), in eval mode.

    Args:
        source: ``org/repo``, ``org/repo@revision``, ``hf://org/repo[@revision]`` or a folder.
        revision: a branch, tag or commit (or ``@revision`` in ``source``); default ``main``.
        output_stride: rebuild at this output stride (the weights do not depend on it).
        cache_dir: the Hub cache (default ``HF_HUB_CACHE`` / ``HF_HOME/hub`` / ``~/.cache/huggingface/hub``).
        token: for private repos (default ``HF_TOKEN`` / the stored login).
        force_download: fetch again even when cached.

    Raises:
        HubError: unknown repo or revision, offline without a cached copy, a tampered or
            truncated weights file, or weights that do not fit the stored config.
    """
    return load_from_hub(source, revision=revision, output_stride=output_stride, cache_dir=cache_dir, token=token,
                         force_download=force_download).model


def checkpoint_for(source: str, *, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                   token: Optional[str] = None) -> Path:
    """A deeplab checkpoint (``.pt``) of a Hub model, for everything that opens checkpoints.

    The Hub files are fetched into the Hub cache and verified (:func:`load_from_hub`) on every
    call; the checkpoint is derived from them once per weights file, under
    ``$TORCH_HOME/hub/checkpoints/deeplab/hub/ORG--NAME/SHA256[:16].pt``, and carries the
    classes, palette, normalisation, dataset and the Hub provenance.
    """
    from ..checkpoint import save_checkpoint

    loaded = load_from_hub(source, revision=revision, cache_dir=cache_dir, token=token)
    digest = str(loaded.config["weights"]["sha256"])
    name = (loaded.repo_id or loaded.directory.name).replace("/", "--")
    dest = Path(torch.hub.get_dir()) / "checkpoints" / "deeplab" / "hub" / name / f"{digest[:16]}.pt"
    if dest.is_file():
        return dest
    config = loaded.config
    payload: Dict[str, Any] = {
        "model": loaded.model.state_dict(),
        "config": dict(config["model_config"]),
        "classes": loaded.classes,
        "palette": config.get("palette"),
        "normalization": loaded.normalization,
        "dataset": dict(config.get("dataset") or {}),
        "metrics": {k: v for k, v in dict(config.get("metrics") or {}).items() if isinstance(v, (int, float))},
        "hub": {"source": loaded.source, "repo_id": loaded.repo_id, "revision": loaded.revision, "sha256": digest},
    }
    save_checkpoint(dest, payload)
    return dest
