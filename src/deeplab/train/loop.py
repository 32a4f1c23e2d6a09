"""The training loop: SGD + poly LR, AMP, accumulation, DDP, exact resume.

Objects in, no config files: :func:`train` takes a model, a dataset, a
:class:`~deeplab.config.TrainConfig` and an ``eval_fn``, and writes into
``cfg.run_dir``::

    last.pt        every ``ckpt_every`` steps, at the end and on SIGINT/SIGTERM
    best.pt        whenever ``eval_fn``'s ``"mIoU"`` improves
    metrics.jsonl  one JSON object per line: train logs, evaluations, starts/resumes
    tb/            TensorBoard scalars, when the ``tensorboard`` package is installed

The loop counts optimizer steps (``max_steps``), not epochs. Data order, augmentation
and model-side randomness are functions of ``cfg.seed``, the epoch and the sample
index only, so a run resumed from ``last.pt`` continues bit-identically (same weights as
never stopping), with any ``num_workers``; see :mod:`deeplab.train.distributed` for
how the global batch is split over processes.

Loss normalisation: the loss of a step is the mean cross-entropy over all valid
(non-ignore) pixels of the *global* batch - every micro-batch of every process. Each
process divides its pixel-loss sum by ``global_valid_count / world_size`` (the count is
all-reduced before the forward pass), so DDP's gradient averaging yields exactly the
gradient of the global mean; a per-process mean would weight a pixel of a mostly-ignore
crop more than a pixel of a full crop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from deeplab.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    RESUME_KEYS,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    strip_state_dict_prefixes,
    to_plain,
)
from deeplab._utils import jsonable, one_line
from deeplab.config import ModelConfig, TrainConfig
from deeplab.train.distributed import (
    DeterministicBatchSampler,
    all_reduce_,
    barrier,
    broadcast_object,
    convert_sync_batchnorm,
    derive_seed,
    get_rank,
    get_world_size,
    resolve_device,
    unwrap_model,
    wrap_ddp,
)

__all__ = [
    "AmpSettings",
    "PolyLR",
    "SeededDataset",
    "TrainResult",
    "amp_settings",
    "build_optimizer",
    "build_train_loader",
    "freeze_batchnorm",
    "poly_lr",
    "segmentation_loss",
    "set_train_mode",
    "train",
]

EvalFn = Callable[[nn.Module], Mapping[str, Any]]

# Settings an exact resume cannot change: the data order depends on seed and batch
# size, the poly schedule on max_steps.
_RESUME_MUST_MATCH = ("seed", "batch_size", "max_steps")
# Settings that change nothing about the optimisation trajectory.
_RESUME_FREE = ("run_dir", "resume_from", "num_workers", "device", "eval_every", "ckpt_every", "log_every")


# --------------------------------------------------------------------------- optimizer / LR


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm))


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 4e-5,
    decay_norm_and_bias: bool = False,
    decay_depthwise: bool = True,
    nesterov: bool = False,
) -> SGD:
    """SGD with momentum and L2 weight decay on conv/linear weights.

    Default grouping: conv and linear kernels (parameters with ``ndim > 1`` outside
    normalisation layers) are decayed; BatchNorm/GroupNorm scales and shifts and all
    biases are not. This is what the TF reference does (slim regularises ``weights``
    of conv layers only); the paper's "weight decay 4e-5" refers to those weights.
    Frozen parameters (``requires_grad=False``, e.g. with ``freeze_bn``) are left out.

    Args:
        model: the (unwrapped or DDP) model.
        lr: base learning rate (the poly scheduler scales it).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: L2 coefficient for the decayed group.
        decay_norm_and_bias: decay every parameter (the habit of many PyTorch ports).
        decay_depthwise: decay depthwise kernels; ``False`` matches the TF reference's
            ``regularize_depthwise=False``.
        nesterov: Nesterov momentum.

    Returns:
        ``torch.optim.SGD`` with two param groups, ``"decay"`` and ``"no_decay"``
        (always both, possibly empty, so optimizer state dicts line up on resume).
    """
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    seen = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if decay_norm_and_bias:
                wanted = True
            else:
                wanted = param.ndim > 1 and not _is_norm(module) and (decay_depthwise or not _is_depthwise(module))
            (decay if wanted else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """The paper's "poly" schedule: ``base_lr * (1 - step / max_steps) ** power``.

    ``step`` counts completed optimizer steps; the rate is 0 from ``max_steps`` on.
    """
    progress = min(max(step, 0), max_steps) / float(max_steps)
    return base_lr * (1.0 - progress) ** power


class PolyLR(LRScheduler):
    """Poly learning-rate decay as a resumable ``LRScheduler``.

    After ``k`` calls to :meth:`step`, every group's LR is
    ``poly_lr(initial_lr, k, max_steps, power)`` (closed form: no drift on resume).

    Args:
        optimizer: the optimizer.
        max_steps: steps at which the rate reaches 0.
        power: decay exponent (paper: 0.9).
        last_epoch: ``-1`` to start; the state dict restores it on resume.
    """

    def __init__(self, optimizer: Optimizer, *, max_steps: int, power: float = 0.9, last_epoch: int = -1) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = int(max_steps)
        self.power = float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:  # type: ignore[override]
        """Rates for the current ``last_epoch`` (= completed steps)."""
        return [poly_lr(base, self.last_epoch, self.max_steps, self.power) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> List[float]:
        return self.get_lr()


# --------------------------------------------------------------------------- loss


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    normalizer: Union[float, torch.Tensor, None] = None,
) -> torch.Tensor:
    """Pixel-wise cross-entropy, summed and divided by ``normalizer``.

    Args:
        logits: ``(B, C, H, W)``; computed in float32 whatever the autocast dtype.
        target: ``(B, H, W)`` integer class ids, ``ignore_index`` where unlabelled.
        ignore_index: label contributing neither loss nor gradient.
        normalizer: divisor of the summed loss; default: this batch's valid-pixel count
            (the usual mean). The loop passes ``global_valid / world_size``.

    Returns:
        Scalar loss. A batch with no valid pixel gives 0 with zero gradients, not NaN.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    if normalizer is None:
        normalizer = (target != ignore_index).sum().clamp_min(1)
    return total / normalizer


# --------------------------------------------------------------------------- BN / AMP


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode and stop training its scale and shift.

    The paper freezes BN when fine-tuning at output stride 8 (batch statistics from a
    small batch of large feature maps are unreliable). Call :func:`set_train_mode`
    after every ``model.train()`` to keep the layers in eval mode.

    Returns:
        Number of BatchNorm layers frozen.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
            count += 1
    return count


def set_train_mode(model: nn.Module, *, freeze_bn: bool) -> None:
    """``model.train()``, then BatchNorm back to eval mode when ``freeze_bn``."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


@dataclass(frozen=True)
class AmpSettings:
    """How mixed precision runs on one device.

    Attributes:
        enabled: autocast on.
        dtype: autocast dtype (``torch.bfloat16``/``torch.float16``), ``None`` if off.
        use_scaler: fp16 needs a ``GradScaler`` against gradient underflow; bf16 has
            float32's exponent range and does not.
    """

    enabled: bool
    dtype: Optional[torch.dtype]
    use_scaler: bool


def amp_settings(
    device_type: str,
    *,
    enabled: bool,
    dtype: str = "auto",
    bf16_supported: Optional[bool] = None,
) -> AmpSettings:
    """Pick the autocast dtype and whether a GradScaler is needed.

    CPU: bf16 (CPU autocast's fast path; fp16 is refused). CUDA: bf16 when the GPU
    supports it (Ampere+) for ``"auto"``, else fp16 with a GradScaler.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ...
        enabled: ``TrainConfig.amp``.
        dtype: ``"auto"``, ``"bf16"`` or ``"fp16"``.
        bf16_supported: override detection (tests); default asks CUDA.

    Returns:
        The :class:`AmpSettings`.
    """
    if not enabled:
        return AmpSettings(False, None, False)
    if dtype not in ("auto", "bf16", "fp16"):
        raise ValueError(f"unknown amp dtype {dtype!r}; choose from ['auto', 'bf16', 'fp16']")
    if device_type == "cpu":
        if dtype == "fp16":
            raise ValueError("amp_dtype='fp16' is not supported on CPU; use 'bf16' or 'auto' (bf16)")
        return AmpSettings(True, torch.bfloat16, False)
    if device_type == "cuda":
        if bf16_supported is None:
            bf16_supported = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if dtype == "bf16" and not bf16_supported:
            raise ValueError("this GPU does not support bf16; use amp_dtype='fp16' or 'auto'")
        if dtype == "auto":
            dtype = "bf16" if bf16_supported else "fp16"
    elif dtype == "auto":
        dtype = "bf16"
    if dtype == "bf16":
        return AmpSettings(True, torch.bfloat16, False)
    return AmpSettings(True, torch.float16, True)


# --------------------------------------------------------------------------- data


class SeededDataset(Dataset):
    """Wraps a dataset so each sample is augmented by its own seeded ``torch.Generator``.

    Keys are ``(epoch, index)`` pairs (as yielded by
    :class:`~deeplab.train.distributed.DeterministicBatchSampler`) or plain indices
    (epoch 0). Sample ``index`` of ``epoch`` is transformed with a generator seeded from
    ``(seed, epoch, index)``: the same crop and flip whichever worker process, rank or
    resume point loads it, and nothing touches the global RNGs.

    Args:
        dataset: returns raw ``(image, mask)`` for an integer index. If it has its own
            ``transform`` and ``transform`` here is ``None``, it is asked for
            ``dataset[(index, sample_seed)]`` instead (the ``deeplab.data`` protocol).
        transform: called as ``transform(image, mask, generator=g)``; ``None`` passes
            samples through.
        seed: base seed.
    """

    def __init__(self, dataset: Any, transform: Optional[Callable[..., Any]] = None, *, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self._dataset_transforms = transform is None and getattr(dataset, "transform", None) is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_seed(self, epoch: int, index: int) -> int:
        """Seed of sample ``index``'s augmentation generator in ``epoch``."""
        return derive_seed("sample", self.seed, epoch, index)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Any:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))
        if self._dataset_transforms:
            return self.dataset[(index, self.sample_seed(epoch, index))]
        sample = self.dataset[index]
        if self.transform is None:
            return sample
        generator = torch.Generator()
        generator.manual_seed(self.sample_seed(epoch, index))
        image, mask = sample
        return self.transform(image, mask, generator=generator)


def _seed_worker(worker_id: int) -> None:
    # Transforms must use the generator they are given; this only keeps a careless
    # numpy/random call from returning the same numbers in every forked worker.
    worker_seed = torch.initial_seed() % (2**32)
    random.seed(worker_seed)
    try:
        import numpy as np

        np.random.seed(worker_seed)
    except ImportError:
        pass


def build_train_loader(
    dataset: SeededDataset,
    batch_sampler: DeterministicBatchSampler,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Optional[Callable[..., Any]] = None,
) -> DataLoader:
    """DataLoader over ``batch_sampler``'s ``(epoch, index)`` keys.

    Workers are persistent (no respawn per epoch) and the loader has its own generator:
    left alone, a DataLoader draws its worker base seed from the global torch RNG each
    time an iterator is created, which would shift dropout masks after a resume.
    """
    generator = torch.Generator()
    generator.manual_seed(derive_seed("loader", dataset.seed))
    kwargs: Dict[str, Any] = {}
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
        **kwargs,
    )


# --------------------------------------------------------------------------- helpers


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        step: optimizer steps completed (global, including before a resume).
        reason: ``"finished"`` (reached ``max_steps``), ``"stop_at"`` or ``"signal"``
            (SIGINT/SIGTERM; ``last.pt`` was written first).
        last_checkpoint: path of ``last.pt``.
        best_checkpoint: path of ``best.pt`` if one was written in this run or before.
        best_metric: best value of the tracked metric, if evaluated.
        last_eval: metrics of the most recent evaluation.
        train_loss: the most recent logged training loss.
    """

    step: int
    reason: str
    last_checkpoint: Optional[Path] = None
    best_checkpoint: Optional[Path] = None
    best_metric: Optional[float] = None
    last_eval: Dict[str, Any] = field(default_factory=dict)
    train_loss: Optional[float] = None


class _StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step.

    Killing a run mid-step would lose everything since the last checkpoint; stopping at
    the step boundary lets the loop write ``last.pt`` first. A second signal restores
    the previous handler and re-delivers the signal (Ctrl-C twice really stops).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = signum

    def __enter__(self) -> "_StopOnSignal":
        if self.enabled:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    # Evaluation must not consume training randomness: with it, enabling eval (or
    # changing eval_every) would change the trained weights.
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(derive_seed("torch", seed))
    random.seed(derive_seed("python", seed))
    try:
        import numpy as np

        np.random.seed(derive_seed("numpy", seed) % (2**32))
    except ImportError:
        pass


def _scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def _open_tensorboard(log_dir: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _close_loader(loader: DataLoader) -> None:
    # Persistent workers otherwise live until garbage collection; stop them now so a
    # following run (or test) does not compete with idle processes for CPU and memory.
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def _check_batch(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """Catch the two classic data bugs with a readable message (once per run)."""
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"model output {tuple(logits.shape)} does not match masks {tuple(target.shape)}: the model must "
            "return logits (B, C, H, W) at the input size and masks must be (B, H, W)"
        )
    labels = target[target != ignore_index]
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        num_classes = logits.shape[1]
        if low < 0 or high >= num_classes:
            bad = high if high >= num_classes else low
            raise ValueError(
                f"training masks contain label {bad} but the model predicts {num_classes} classes "
                f"(0..{num_classes - 1}; {ignore_index} = ignore); fix the dataset's label mapping or "
                "the model's num_classes"
            )


def _check_resume(saved: Mapping[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = cfg.to_dict()
    diffs = {
        key: (saved.get(key), value)
        for key, value in now.items()
        if key not in _RESUME_FREE and key in saved and saved.get(key) != value
    }
    hard = {k: v for k, v in diffs.items() if k in _RESUME_MUST_MATCH}
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
            stacklevel=3,
        )


def _resolve_resume(cfg: TrainConfig, last_path: Path) -> Optional[Path]:
    """Decide (on rank 0, shared with all ranks) what to resume from, or raise."""
    decision: Tuple[Optional[str], Optional[str]] = (None, None)
    if get_rank() == 0:
        if cfg.resume_from == "auto":
            decision = (str(last_path) if last_path.exists() else None, None)
        elif cfg.resume_from:
            decision = (str(cfg.resume_from), None)
        elif last_path.exists():
            decision = (
                None,
                f"{last_path} already exists; refusing to start a new run over it. Resume with "
                f"resume_from='{last_path}' (or 'auto'), or choose another run_dir",
            )
    path, error = broadcast_object(decision)
    if error:
        raise FileExistsError(error)
    return Path(path) if path else None


# --------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    train_set: Any,
    cfg: TrainConfig,
    *,
    transform: Optional[Callable[..., Any]] = None,
    eval_fn: Optional[EvalFn] = None,
    model_config: Union[ModelConfig, Mapping[str, Any], None] = None,
    classes: Sequence[str] = (),
    palette: Sequence[Sequence[int]] = (),
    normalization: Optional[Mapping[str, Sequence[float]]] = None,
    dataset_info: Optional[Mapping[str, Any]] = None,
    optimizer: Optional[Optimizer] = None,
    scheduler: Optional[LRScheduler] = None,
    collate_fn: Optional[Callable[..., Any]] = None,
    best_metric: str = "mIoU",
    stop_at: Optional[int] = None,
    progress: bool = True,
    tensorboard: bool = True,
    handle_signals: bool = True,
) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps (or resume and finish).

    Works alone or under ``torchrun`` (call :func:`deeplab.train.distributed.init_distributed`
    first): the model is moved to the device, BatchNorm converted to SyncBatchNorm when
    ``cfg.sync_bn`` and wrapped in DDP; ``cfg.batch_size`` is the global batch.

    Args:
        model: maps ``(B, 3, H, W)`` images to ``(B, C, H, W)`` logits. Modified in place
            (device, SyncBatchNorm, frozen BN); its weights are the trained ones after.
        train_set: dataset of raw ``(image, mask)`` pairs (with ``transform``) or of
            ready ``(image_tensor, mask_tensor)``; wrapped in :class:`SeededDataset`.
        cfg: the recipe; ``cfg.run_dir`` receives checkpoints and logs.
        transform: ``transform(image, mask, generator=g)`` training augmentation.
        eval_fn: called as ``eval_fn(model)`` (bare model, eval mode, no grad) every
            ``cfg.eval_every`` steps and at the end, on every rank (so it may all-reduce);
            returns metrics including ``best_metric``. RNG state is preserved around it.
        model_config, classes, palette, normalization: stored in checkpoints so they
            rebuild and describe the model on their own.
        dataset_info: what the model was trained on (``{"dataset": "voc", "root": ...,
            "train_split": ..., "val_split": ...}``), stored as ``"dataset"`` so evaluation
            can default to it.
        optimizer, scheduler: override :func:`build_optimizer` / :class:`PolyLR`.
        collate_fn: DataLoader collate function.
        best_metric: metric (higher is better) deciding ``best.pt``.
        stop_at: stop after this global step (writing ``last.pt``) without changing the
            schedule, e.g. to split a run over time-limited jobs.
        progress: tqdm bar on rank 0.
        tensorboard: log to ``run_dir/tb`` if the tensorboard package is installed.
        handle_signals: first SIGINT/SIGTERM stops at the next step boundary after
            writing ``last.pt``.

    Returns:
        A :class:`TrainResult`.

    Raises:
        FileExistsError: ``run_dir/last.pt`` exists and ``cfg.resume_from`` is unset.
        CheckpointError: the resume checkpoint is unreadable or incompatible.
        ValueError: inconsistent metadata, batch/world sizes, or labels out of range.
        FloatingPointError: the loss became NaN/inf (nothing is overwritten).
    """
    rank, world_size = get_rank(), get_world_size()
    is_main = rank == 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    device = resolve_device(cfg.device, local_rank)
    run_dir = Path(cfg.run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"

    # ---- metadata checks before any work, so a mistake costs seconds, not a run
    if isinstance(model_config, ModelConfig):
        config_dict: Optional[Dict[str, Any]] = model_config.to_dict()
    elif model_config is not None:
        config_dict = ModelConfig.from_dict(dict(model_config)).to_dict()
    else:
        config_dict = None
        warnings.warn(
            "train() got no model_config: checkpoints will not be able to rebuild the model on their own",
            stacklevel=2,
        )
    if classes and config_dict is not None and len(classes) != config_dict["num_classes"]:
        raise ValueError(
            f"{len(classes)} class names given but model_config.num_classes={config_dict['num_classes']}; "
            "they must agree"
        )
    if palette and classes and len(palette) != len(classes):
        raise ValueError(f"{len(palette)} palette colours for {len(classes)} classes; give one colour per class")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError("pass the bare model to train(); it converts BatchNorm and wraps it in DDP itself")
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at must be >= 1, got {stop_at}")

    resume_path = _resolve_resume(cfg, last_path)
    dataset = train_set if isinstance(train_set, SeededDataset) and transform is None else SeededDataset(
        train_set, transform, seed=cfg.seed
    )
    sampler = DeterministicBatchSampler(
        len(dataset),
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        accum_steps=cfg.accum_steps,
    )
    steps_per_epoch = sampler.steps_per_epoch

    # ---- model, optimizer, schedule, precision
    model.to(device)
    use_channels_last = device.type == "cuda" and cfg.channels_last
    if device.type == "cuda":
        # Fixed crop size -> the same conv shapes every step, so autotuning pays off.
        torch.backends.cudnn.benchmark = True
    if use_channels_last:
        model.to(memory_format=torch.channels_last)
    if world_size > 1 and cfg.sync_bn and not cfg.freeze_bn:
        model = convert_sync_batchnorm(model, device=device)
    if cfg.freeze_bn:
        freeze_batchnorm(model)
    if optimizer is None:
        optimizer = build_optimizer(
            model,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            decay_norm_and_bias=cfg.decay_norm_and_bias,
            decay_depthwise=cfg.decay_depthwise,
            nesterov=cfg.nesterov,
        )
    if scheduler is None:
        scheduler = PolyLR(optimizer, max_steps=cfg.max_steps, power=cfg.poly_power)
    amp = amp_settings(device.type, enabled=cfg.amp, dtype=cfg.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.use_scaler)

    # ---- resume
    step, epoch, pos = 0, 0, 0
    best: Dict[str, Any] = {"metric": best_metric, "value": None, "step": None}
    last_eval: Dict[str, Any] = {}
    rng_state: Optional[Mapping[str, Any]] = None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location="cpu", required_keys=RESUME_KEYS)
        _check_resume(ckpt["train_config"], cfg, resume_path)
        if config_dict is not None and ckpt["config"] and ckpt["config"] != config_dict:
            changed = sorted(k for k in config_dict if ckpt["config"].get(k) != config_dict[k])
            raise CheckpointError(
                f"cannot resume {resume_path}: it was trained with another model config (differs in {changed}); "
                "resume with the same model, or start a new run (e.g. OS 8 fine-tuning) initialised from it"
            )
        try:
            unwrap_model(model).load_state_dict(strip_state_dict_prefixes(ckpt["model"]), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"cannot resume {resume_path}: its weights do not fit this model: {one_line(exc)}; resume "
                "with the model configuration the run was started with"
            ) from exc
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"cannot resume {resume_path}: its optimizer state does not fit this optimizer ({exc}); "
                "freeze_bn / decay settings or the model changed since it was written"
            ) from exc
        scheduler.load_state_dict(ckpt["scheduler"])
        if amp.use_scaler and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        data = ckpt.get("data") or {}
        epoch, pos = int(data.get("epoch", step // steps_per_epoch)), int(data.get("step_in_epoch", step % steps_per_epoch))
        if data.get("num_samples", len(dataset)) != len(dataset):
            warnings.warn(
                f"{resume_path} was trained on {data['num_samples']} samples, the dataset now has {len(dataset)}; "
                "continuing, but the data order differs from the original run",
                stacklevel=2,
            )
        if data.get("world_size", world_size) != world_size:
            warnings.warn(
                f"{resume_path} was written by {data['world_size']} processes, resuming with {world_size}: "
                "the data order is the same, BatchNorm statistics are not",
                stacklevel=2,
            )
        if pos >= steps_per_epoch:
            epoch, pos = epoch + 1, 0
        best = dict(ckpt.get("best") or best)
        last_eval = dict(ckpt.get("metrics") or {})
        rng_state = ckpt["rng"]
        del ckpt  # free host memory before the loop

    end_step = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    ddp_model = wrap_ddp(model, device) if world_size > 1 else model
    loader = build_train_loader(
        dataset, sampler, num_workers=cfg.num_workers, pin_memory=device.type == "cuda", collate_fn=collate_fn
    )

    # ---- logging (rank 0 only)
    metrics_file = None
    writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        writer = _open_tensorboard(run_dir / "tb", tensorboard)

    def log_line(record: Dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(jsonable(record)) + "\n")
            metrics_file.flush()

    start_time = time.time()
    log_line(
        {"kind": "resume" if resume_path else "start", "step": step, "time": start_time, "world_size": world_size,
         "from": str(resume_path) if resume_path else None, "train_config": cfg.to_dict()}
    )

    def payload() -> Dict[str, Any]:
        bare = unwrap_model(model)
        data_epoch, data_pos = (epoch + 1, 0) if pos >= steps_per_epoch else (epoch, pos)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": bare.state_dict(),
            "config": config_dict,
            "classes": [str(c) for c in classes],
            "palette": to_plain(list(palette)),
            "normalization": to_plain(dict(normalization)) if normalization is not None else None,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": capture_rng_state(),
            "data": {
                "epoch": data_epoch,
                "step_in_epoch": data_pos,
                "steps_per_epoch": steps_per_epoch,
                "num_samples": len(dataset),
                "world_size": world_size,
            },
            "train_config": cfg.to_dict(),
            "dataset": to_plain(dict(dataset_info or {})),
            "metrics": to_plain(last_eval),
            "best": to_plain(best),
        }

    def run_eval() -> Dict[str, Any]:
        bare = unwrap_model(model)
        bare.eval()
        try:
            with _preserved_rng(), torch.no_grad():
                metrics = dict(eval_fn(bare))  # type: ignore[misc]
        finally:
            set_train_mode(ddp_model, freeze_bn=cfg.freeze_bn)
        if best_metric not in metrics:
            raise KeyError(f"eval_fn returned {sorted(metrics)}, without {best_metric!r}; return it or pass best_metric=")
        return metrics

    # ---- the loop
    result = TrainResult(step=step, reason="finished", last_checkpoint=None,
                         best_checkpoint=best_path if best_path.exists() else None,
                         best_metric=best.get("value"), last_eval=last_eval)
    set_train_mode(ddp_model, freeze_bn=cfg.freeze_bn)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and is_main), desc="train", dynamic_ncols=True)
    running_loss = torch.zeros((), dtype=torch.float64, device=device)
    running_steps = 0
    last_log_time, last_log_step = time.time(), step
    checked_batch = False
    stopper = _StopOnSignal(handle_signals)

    # Last, so nothing above (model building, DDP, loader setup) shifts the state.
    if rng_state is not None:
        restore_rng_state(rng_state)
    else:
        _seed_everything(cfg.seed)

    try:
        with stopper:
            while step < end_step:
                sampler.set_epoch(epoch, start_step=pos)
                batches = iter(loader)
                stop = False
                while pos < steps_per_epoch and step < end_step:
                    micro = [next(batches) for _ in range(cfg.accum_steps)]
                    targets = [m[1] for m in micro]
                    # Global valid-pixel count first, so every micro-batch on every rank
                    # divides by the same number (see the module docstring).
                    valid = torch.tensor(
                        [float(sum(int((t != cfg.ignore_index).sum()) for t in targets))], dtype=torch.float64, device=device
                    )
                    all_reduce_(valid, "sum")
                    normalizer = max(float(valid.item()), 1.0) / world_size
                    lr_used = float(optimizer.param_groups[0]["lr"])
                    step_loss = torch.zeros((), dtype=torch.float64, device=device)
                    for i, (images, masks) in enumerate(micro):
                        images = images.to(device, non_blocking=True)
                        if use_channels_last:
                            images = images.contiguous(memory_format=torch.channels_last)
                        masks = masks.to(device, non_blocking=True).long()
                        sync = world_size == 1 or i == len(micro) - 1
                        # no_sync: accumulate locally, all-reduce gradients once per step.
                        context = contextlib.nullcontext() if sync else ddp_model.no_sync()  # type: ignore[operator]
                        with context:
                            with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
                                logits = ddp_model(images)
                            if not checked_batch:
                                _check_batch(logits, masks, cfg.ignore_index)
                                checked_batch = True
                            loss = segmentation_loss(logits, masks, ignore_index=cfg.ignore_index, normalizer=normalizer)
                            scaler.scale(loss).backward()
                        step_loss += loss.detach().double()
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    pos += 1
                    running_loss += step_loss
                    running_steps += 1
                    bar.update(1)

                    do_log = step % cfg.log_every == 0 or step == end_step
                    do_eval = eval_fn is not None and (
                        (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == cfg.max_steps
                    )
                    do_ckpt = (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0) or step == end_step
                    if world_size > 1 and handle_signals:
                        # Every rank must stop at the same step or the others hang.
                        flag = torch.tensor([1.0 if stopper.requested else 0.0], device=device)
                        stop = bool(all_reduce_(flag, "max").item())
                    else:
                        stop = stopper.requested is not None
                    do_ckpt = do_ckpt or stop

                    if do_log or do_ckpt:
                        # Mean over steps since the last log of the global-batch mean loss.
                        mean_loss = all_reduce_(running_loss.clone(), "mean").item() / max(running_steps, 1)
                        if not math.isfinite(mean_loss) and not scaler.is_enabled():
                            raise FloatingPointError(
                                f"training loss became {mean_loss} by step {step}; nothing was saved after the "
                                f"last checkpoint{f' ({last_path})' if last_path.exists() else ''}. Lower lr, "
                                "check the data (labels, normalisation), or try amp=False"
                            )
                        now = time.time()
                        img_per_s = (step - last_log_step) * cfg.batch_size / max(now - last_log_time, 1e-9)
                        record = {"kind": "train", "step": step, "epoch": epoch, "loss": mean_loss, "lr": lr_used,
                                  "img_per_s": img_per_s, "time": now, "elapsed": now - start_time}
                        log_line(record)
                        if writer is not None:
                            writer.add_scalar("train/loss", mean_loss, step)
                            writer.add_scalar("train/lr", lr_used, step)
                            writer.add_scalar("train/img_per_s", img_per_s, step)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_used:.2e}", img_s=f"{img_per_s:.1f}")
                        result.train_loss = mean_loss
                        running_loss.zero_()
                        running_steps = 0
                        last_log_time, last_log_step = now, step

                    if do_eval:
                        last_eval = run_eval()
                        log_line({"kind": "eval", "step": step, "time": time.time(), **last_eval})
                        if writer is not None:
                            for key, value in _scalars(last_eval).items():
                                writer.add_scalar(f"eval/{key}", value, step)
                        value = float(last_eval[best_metric])
                        if best["value"] is None or value > best["value"]:
                            best = {"metric": best_metric, "value": value, "step": step}
                            if is_main:
                                save_checkpoint(best_path, payload())
                            result.best_checkpoint = best_path
                        result.best_metric = best["value"]
                        result.last_eval = last_eval

                    if do_ckpt:
                        if is_main:
                            save_checkpoint(last_path, payload())
                        result.last_checkpoint = last_path
                    if stop:
                        break
                if stop:
                    result.reason = "signal"
                    break
                if pos >= steps_per_epoch:
                    epoch, pos = epoch + 1, 0
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
        _close_loader(loader)

    if result.reason != "signal" and step < cfg.max_steps:
        result.reason = "stop_at"
    result.step = step
    if result.last_checkpoint is None and last_path.exists():
        result.last_checkpoint = last_path
    barrier()  # nobody returns (and e.g. destroys the group) while rank 0 still writes
    return result
