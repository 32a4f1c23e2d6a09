"""Exact resume: what ``last.pt`` holds, whether a run may resume, and restoring it.

Data order, augmentation and model-side randomness are functions of ``cfg.seed``, the
epoch and the sample index only, so a run resumed from ``last.pt`` continues
bit-identically (same weights as never stopping), with any ``num_workers``. For that a
checkpoint carries, besides the weights: the optimizer, scheduler and GradScaler states,
the data position (epoch, step inside it) and every RNG state (:func:`checkpoint_payload`);
:func:`restore` puts them back and :func:`check_resume` refuses recipe changes that would
make the continuation differ silently.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from deeplab._utils import atomic_write, load_state_dict_strict, unwrap_model
from deeplab.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    RESUME_KEYS,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    strip_state_dict_prefixes,
    to_plain,
)
from deeplab.config import ModelConfig, RunSettings, TrainConfig
from deeplab.distributed import broadcast_object, get_rank
from deeplab.train.qat import load_qat_state, qat_state
from deeplab.train.sampling import derive_seed

__all__ = [
    "RESUME_FREE",
    "RESUME_MUST_MATCH",
    "CheckpointMeta",
    "Restored",
    "check_resume",
    "checkpoint_payload",
    "complete_checkpoint",
    "keep_previous",
    "model_config_dict",
    "preserved_rng",
    "previous_path",
    "resolve_resume",
    "restore",
    "seed_everything",
]

# Settings an exact resume cannot change: the data order depends on seed and batch
# size, the poly schedule on max_steps.
RESUME_MUST_MATCH = ("seed", "batch_size", "max_steps")
# Settings that change nothing about the optimisation trajectory: the run half of TrainConfig.
RESUME_FREE = tuple(f.name for f in fields(RunSettings))


# --------------------------------------------------------------------------- what a checkpoint describes


@dataclass(frozen=True)
class CheckpointMeta:
    """What every checkpoint of a run stores so it rebuilds and describes its model alone.

    Attributes:
        config: ``ModelConfig.to_dict()``, ``None`` if ``train()`` got none.
        classes: class names.
        palette: one RGB colour per class.
        normalization: ``{"mean": ..., "std": ...}`` of the input images.
        dataset: what the model was trained on (``"dataset"``, ``"root"``, splits).
    """

    config: Optional[Dict[str, Any]]
    classes: Sequence[str] = ()
    palette: Sequence[Sequence[int]] = ()
    normalization: Optional[Mapping[str, Sequence[float]]] = None
    dataset: Mapping[str, Any] = field(default_factory=dict)


def model_config_dict(
    model_config: Union[ModelConfig, Mapping[str, Any], None], *, stacklevel: int = 1
) -> Optional[Dict[str, Any]]:
    """The validated dict form of ``model_config``; warns when it is missing.

    ``stacklevel`` here and below counts frames from the caller (1: the caller's line),
    so a warning can point at the code that called :func:`deeplab.train.train`.
    """
    if isinstance(model_config, ModelConfig):
        return model_config.to_dict()
    if model_config is not None:
        return ModelConfig.from_dict(dict(model_config)).to_dict()
    warnings.warn(
        "train() got no model_config: checkpoints will not be able to rebuild the model on their own",
        stacklevel=stacklevel + 1,
    )
    return None


def checkpoint_payload(
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
    meta: CheckpointMeta,
    cfg: TrainConfig,
    step: int,
    epoch: int,
    pos: int,
    steps_per_epoch: int,
    num_samples: int,
    world_size: int,
    last_eval: Mapping[str, Any],
    best: Mapping[str, Any],
) -> Dict[str, Any]:
    """Everything ``last.pt``/``best.pt`` hold; the RNG states are captured now.

    ``pos`` is the number of steps done in ``epoch``; a finished epoch is stored as the
    start of the next one.
    """
    data_epoch, data_pos = (epoch + 1, 0) if pos >= steps_per_epoch else (epoch, pos)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "config": meta.config,
        "classes": [str(c) for c in meta.classes],
        "palette": to_plain(list(meta.palette)),
        "normalization": to_plain(dict(meta.normalization)) if meta.normalization is not None else None,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng_state(),
        "data": {
            "epoch": data_epoch,
            "step_in_epoch": data_pos,
            "steps_per_epoch": steps_per_epoch,
            "num_samples": num_samples,
            "world_size": world_size,
        },
        "train_config": cfg.to_dict(),
        "dataset": to_plain(dict(meta.dataset or {})),
        "metrics": to_plain(dict(last_eval)),
        "best": to_plain(dict(best)),
        "qat": qat_state(model),  # None unless --qat: the tracked int8 input ranges (deeplab.train.qat)
    }


# --------------------------------------------------------------------------- may we resume?


def previous_path(last_path: Path) -> Path:
    """Where the checkpoint before ``last_path`` is kept: ``last.prev.pt`` beside ``last.pt``."""
    return last_path.with_name(f"{last_path.stem}.prev{last_path.suffix}")


def keep_previous(last_path: Path) -> None:
    """Before ``last_path`` is overwritten, keep the complete file it holds as :func:`previous_path`.

    A hard link, so no bytes are copied (a copy where the filesystem has no links), swapped
    in with ``os.replace``: ``last.pt`` itself is never missing. Costs the disk space of one
    more checkpoint; it is what :func:`resolve_resume` falls back to should ``last.pt`` ever
    be unreadable (a torn copy, a filesystem that lost the last write).
    """
    if not last_path.exists():
        return
    with atomic_write(previous_path(last_path), mode=None) as tmp:
        try:
            os.link(last_path, tmp)
        except OSError:
            shutil.copy2(last_path, tmp)


def complete_checkpoint(last_path: Path) -> Optional[Path]:
    """The newest checkpoint of the run that reads completely: ``last.pt``, else ``last.prev.pt``.

    Returns ``None`` when neither exists (a fresh run). Warns when ``last.pt`` is unreadable
    and the previous one is used: the steps since it are trained again, identically.

    Raises:
        CheckpointError: ``last.pt`` exists but is unreadable and no previous one is.
    """
    candidates = [p for p in (last_path, previous_path(last_path)) if p.exists()]
    errors = []
    for path in candidates:
        try:
            load_checkpoint(path, map_location="cpu", required_keys=RESUME_KEYS)
        except CheckpointError as exc:
            errors.append(exc)
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous complete checkpoint {path} instead",
                          stacklevel=2)
        return path
    if errors:
        raise errors[0]
    return None


def resolve_resume(cfg: TrainConfig, last_path: Path) -> Optional[Path]:
    """Decide (on rank 0, shared with all ranks) what to resume from, or raise.

    ``resume_from="auto"`` takes the newest complete checkpoint (:func:`complete_checkpoint`).

    Raises:
        FileExistsError: ``last_path`` exists and ``cfg.resume_from`` is unset.
        CheckpointError: with ``"auto"``, ``last_path`` and its previous one are unreadable.
    """
    # (path, error class, message): exceptions do not cross ranks, their names do.
    decision: Tuple[Optional[str], Optional[str], str] = (None, None, "")
    if get_rank() == 0:
        if cfg.resume_from == "auto":
            try:
                found = complete_checkpoint(last_path)
            except CheckpointError as exc:
                decision = (None, "checkpoint", str(exc))
            else:
                decision = (str(found) if found else None, None, "")
        elif cfg.resume_from:
            decision = (str(cfg.resume_from), None, "")
        elif last_path.exists():
            decision = (
                None,
                "exists",
                f"{last_path} already exists; refusing to start a new run over it. Resume with "
                f"resume_from='{last_path}' (or 'auto'), or choose another run_dir",
            )
    path, kind, message = broadcast_object(decision)
    if kind == "checkpoint":
        raise CheckpointError(message)
    if kind == "exists":
        raise FileExistsError(message)
    return Path(path) if path else None


def check_resume(saved: Mapping[str, Any], cfg: TrainConfig, path: Path, *, stacklevel: int = 1) -> None:
    """Refuse recipe changes an exact resume cannot honour; warn about the harmless rest.

    Raises:
        CheckpointError: a :data:`RESUME_MUST_MATCH` setting differs from ``saved``.
    """
    now = cfg.to_dict()
    diffs = {
        key: (saved.get(key), value)
        for key, value in now.items()
        if key not in RESUME_FREE and key in saved and saved.get(key) != value
    }
    hard = {k: v for k, v in diffs.items() if k in RESUME_MUST_MATCH}
    if hard:
        listed = ", ".join(f"{k}={old!r} in the checkpoint but {new!r} now" for k, (old, new) in hard.items())
        raise CheckpointError(
            f"cannot resume {path} exactly: {listed}. The data order and the poly schedule depend on "
            "them; resume with the checkpoint's values (see its 'train_config') or start a new run "
            "in another run_dir"
        )
    if diffs:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diffs.items())
        warnings.warn(
            f"resuming {path} with changed settings ({listed}); training continues but will not "
            "match an uninterrupted run",
            stacklevel=stacklevel + 1,
        )


# --------------------------------------------------------------------------- restoring


@dataclass
class Restored:
    """Where a restored run continues.

    Attributes:
        step: global optimizer steps done.
        epoch, pos: the data position (``pos`` steps done in ``epoch``).
        best: ``{"metric", "value", "step"}`` of the best evaluation so far.
        last_eval: metrics of the last evaluation.
        rng: the RNG states to restore right before the first step.
    """

    step: int
    epoch: int
    pos: int
    best: Dict[str, Any]
    last_eval: Dict[str, Any]
    rng: Mapping[str, Any]


def restore(
    path: Path,
    *,
    cfg: TrainConfig,
    config_dict: Optional[Dict[str, Any]],
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: Optional[torch.amp.GradScaler],
    steps_per_epoch: int,
    num_samples: int,
    world_size: int,
    best: Mapping[str, Any],
    stacklevel: int = 1,
) -> Restored:
    """Load ``path`` into the model, optimizer, scheduler and scaler (in place).

    Args:
        path: a ``last.pt`` written by :func:`checkpoint_payload`.
        cfg: the recipe now; checked against the saved one (:func:`check_resume`).
        config_dict: the model config now; must equal the saved one.
        model, optimizer, scheduler: receive the saved states.
        scaler: receives the saved GradScaler state; ``None`` when no scaler is used.
        steps_per_epoch, num_samples, world_size: this run's data layout.
        best: the best-so-far record to keep if the checkpoint has none.
        stacklevel: where the warnings point (1: the caller's line).

    Returns:
        The position and RNG states to continue from (RNG is not restored here: the
        caller does it last, after everything that might consume randomness).

    Raises:
        CheckpointError: unreadable, not resumable, or incompatible with this run.
    """
    ckpt = load_checkpoint(path, map_location="cpu", required_keys=RESUME_KEYS)
    check_resume(ckpt["train_config"], cfg, path, stacklevel=stacklevel + 1)
    if config_dict is not None and ckpt["config"] and ckpt["config"] != config_dict:
        changed = sorted(k for k in config_dict if ckpt["config"].get(k) != config_dict[k])
        raise CheckpointError(
            f"cannot resume {path}: it was trained with another model config (differs in {changed}); "
            "resume with the same model, or start a new run (e.g. OS 8 fine-tuning) initialised from it"
        )
    load_state_dict_strict(
        unwrap_model(model),
        strip_state_dict_prefixes(ckpt["model"]),
        source=f"cannot resume {path}: its weights do not fit this model",
        fix="resume with the model configuration the run was started with",
        error=CheckpointError,
    )
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"cannot resume {path}: its optimizer state does not fit this optimizer ({exc}); "
            "freeze_bn / decay settings or the model changed since it was written"
        ) from exc
    scheduler.load_state_dict(ckpt["scheduler"])
    load_qat_state(model, ckpt.get("qat"))
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    step = int(ckpt["step"])
    data = ckpt.get("data") or {}
    epoch, pos = int(data.get("epoch", step // steps_per_epoch)), int(data.get("step_in_epoch", step % steps_per_epoch))
    _warn_about_layout(path, data, num_samples=num_samples, world_size=world_size, stacklevel=stacklevel + 1)
    if pos >= steps_per_epoch:
        epoch, pos = epoch + 1, 0
    return Restored(step=step, epoch=epoch, pos=pos, best=dict(ckpt.get("best") or best),
                    last_eval=dict(ckpt.get("metrics") or {}), rng=ckpt["rng"])


def _warn_about_layout(path: Path, data: Mapping[str, Any], *, num_samples: int, world_size: int,
                       stacklevel: int) -> None:
    if data.get("num_samples", num_samples) != num_samples:
        warnings.warn(
            f"{path} was trained on {data['num_samples']} samples, the dataset now has {num_samples}; "
            "continuing, but the data order differs from the original run",
            stacklevel=stacklevel + 1,
        )
    if data.get("world_size", world_size) != world_size:
        warnings.warn(
            f"{path} was written by {data['world_size']} processes, resuming with {world_size}: "
            "the data order is the same, BatchNorm statistics are not",
            stacklevel=stacklevel + 1,
        )


# --------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seed torch, ``random`` and numpy from ``seed`` (each its own derived stream)."""
    torch.manual_seed(derive_seed("torch", seed))
    random.seed(derive_seed("python", seed))
    try:
        import numpy as np

        np.random.seed(derive_seed("numpy", seed) % (2**32))
    except ImportError:
        pass


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block and put every RNG state back afterwards.

    Evaluation must not consume training randomness: with it, enabling eval (or
    changing ``eval_every``) would change the trained weights.
    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
