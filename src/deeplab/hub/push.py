"""Uploading a saved folder to the Hub: :func:`push_to_hub`, checked before it goes up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .format import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    HubError,
    PathLike,
    first_line,
    hub_endpoint,
    parse_hub_id,
    read_folder_config,
    require_huggingface_hub,
    verify_weights,
)

__all__ = ["PushResult", "push_to_hub"]

@dataclass(frozen=True)
class PushResult:
    """Where :func:`push_to_hub` put the model: the repo, the branch and the new commit."""

    repo_id: str
    revision: str
    commit: str
    url: str

def push_to_hub(
    save_directory: PathLike,
    repo_id: str,
    *,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    private: bool = False,
    commit_message: Optional[str] = None,
    create_repo: bool = True,
) -> PushResult:
    """Upload a folder written by :func:`save_pretrained` to the Hub repo ``repo_id``.

    The folder is checked first (its weights must match the size and sha256 that its
    ``config.json`` records), the repo is created when missing, and the three files go up in one
    commit (the weights through the Hub's large-file protocol).

    Args:
        save_directory: the folder.
        repo_id: ``org/name`` (an ``hf://`` prefix is accepted).
        token: a write token (default: ``HF_TOKEN`` / the one ``huggingface-cli login`` stored).
        revision: the branch to commit to (default ``main``).
        private: create the repo private.
        commit_message: default "Upload deeplab <arch> <backbone>".
        create_repo: create the repo if it does not exist.

    Raises:
        HubError: a folder that is not a saved model, or the Hub refusing (the message says why).
    """
    hf = require_huggingface_hub()
    directory = Path(save_directory)
    config = read_folder_config(directory, what=str(directory))
    verify_weights(directory / WEIGHTS_NAME, config, what=str(directory / WEIGHTS_NAME))
    repo, pinned = parse_hub_id(repo_id, revision)
    branch = pinned or "main"
    api = hf.HfApi(endpoint=hub_endpoint(), token=token)
    message = commit_message or f"Upload deeplab {config['model_config'].get('arch')} {config['model_config'].get('backbone')}"
    try:
        if create_repo:
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if branch != "main":
            api.create_branch(repo, branch=branch, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(directory), revision=branch, commit_message=message,
                                 allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME], repo_type="model")
    except hf.errors.HfHubHTTPError as exc:
        raise HubError(f"the Hub refused the upload to {repo}: {first_line(exc)}; check the token "
                       "(HF_TOKEN or `huggingface-cli login`, with write access) and the repo name") from exc
    except (OSError, ValueError) as exc:
        raise HubError(f"cannot upload {directory} to {repo}: {first_line(exc)}") from exc
    endpoint = (hub_endpoint() or hf.constants.ENDPOINT).rstrip("/")
    return PushResult(repo_id=repo, revision=branch, commit=str(info.oid), url=f"{endpoint}/{repo}")
