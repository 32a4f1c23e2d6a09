"""The training loop: SGD + poly LR, AMP, accumulation, DDP, exact resume.

Objects in, no config files: :func:`train` takes a model, a dataset, a
:class:`~deeplab.config.TrainConfig` and an ``eval_fn``, and writes into
``cfg.run_dir``::

    last.pt        every ``ckpt_every`` steps, at the end and on SIGINT/SIGTERM
    last.prev.pt   the ``last.pt`` before, used should ``last.pt`` be unreadable
    best.pt        whenever ``eval_fn``'s ``"mIoU"`` improves
    metrics.jsonl  one JSON object per line: train logs, evaluations, starts/resumes
    tb/            TensorBoard scalars, when the ``tensorboard`` package is installed

The loop counts optimizer steps (``max_steps``), not epochs, and is a short composition
of named steps: :func:`setup_model`, :func:`deeplab.train.resume.restore`,
:func:`run_step` (one optimizer step), :func:`log_step`, :func:`evaluate_and_track_best`
and :func:`save_last`. What changes from step to step lives in one :class:`TrainState`,
what is fixed for the run in one :class:`Run`. How a resumed run continues
bit-identically is in :mod:`deeplab.train.resume`, how the loss is normalised over the
global batch in :mod:`deeplab.losses`, how the global batch is split over processes in
:mod:`deeplab.distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from deeplab._utils import ConfigError, fault_point
from deeplab.checkpoint import restore_rng_state, save_checkpoint
from deeplab.config import ModelConfig, TrainConfig
from deeplab.distributed import (
    PeerFailureError,
    all_reduce_,
    barrier,
    convert_sync_batchnorm,
    get_rank,
    get_world_size,
    is_peer_failure,
    peer_failure_message,
    resolve_device,
    restart_count,
    wrap_ddp,
)
from deeplab.losses import Criterion, build_criterion
from deeplab.train.checks import StopOnSignal, check_arguments, check_batch
from deeplab.train.loader import SeededDataset, build_train_loader, close_loader
from deeplab.train.logging import RunLog, progress_bar, show_on_bar, train_record
from deeplab.train.optim import AmpSettings, PolyLR, amp_settings, build_optimizer, freeze_batchnorm, set_train_mode
from deeplab.train.qat import disable_fake_quant, enable_fake_quant
from deeplab.train.resume import (
    CheckpointMeta,
    Restored,
    checkpoint_payload,
    keep_previous,
    preserved_rng,
    resolve_resume,
    restore,
    seed_everything,
)
from deeplab.train.sampling import DeterministicBatchSampler

__all__ = ["EvalFn", "Run", "TrainResult", "TrainState", "train"]

EvalFn = Callable[[nn.Module], Mapping[str, Any]]
Batch = Tuple[torch.Tensor, torch.Tensor]


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
        restarts: how many times torchrun restarted the job before this run finished
            (``TORCHELASTIC_RESTART_COUNT``; 0 outside torchrun).
    """

    step: int
    reason: str
    last_checkpoint: Optional[Path] = None
    best_checkpoint: Optional[Path] = None
    best_metric: Optional[float] = None
    last_eval: Dict[str, Any] = field(default_factory=dict)
    train_loss: Optional[float] = None
    restarts: int = 0


@dataclass
class TrainState:
    """What changes from step to step (and what ``last.pt`` records of it).

    Attributes:
        step: global optimizer steps done.
        epoch, pos: data position, ``pos`` steps done in ``epoch``.
        best: ``{"metric", "value", "step"}`` of the best evaluation.
        last_eval: metrics of the last evaluation.
        running_loss: sum of step losses since the last log (float64, on the device).
        running_steps: steps in ``running_loss``.
        last_log_time, last_log_step: when the last train line was written.
        checked_batch: the first batch passed :func:`check_batch`.
    """

    step: int
    epoch: int
    pos: int
    best: Dict[str, Any]
    last_eval: Dict[str, Any]
    running_loss: torch.Tensor
    running_steps: int = 0
    last_log_time: float = 0.0
    last_log_step: int = 0
    checked_batch: bool = False

    @classmethod
    def begin(cls, restored: Optional[Restored], *, best: Dict[str, Any], device: torch.device) -> "TrainState":
        """A fresh run's state, or the state a checkpoint left."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        if restored is None:
            return cls(0, 0, 0, dict(best), {}, zero)
        return cls(restored.step, restored.epoch, restored.pos, restored.best, restored.last_eval, zero,
                   last_log_step=restored.step)


@dataclass
class Run:
    """What a run is made of; set up once by :func:`train`, read by the steps."""

    cfg: TrainConfig
    device: torch.device
    world_size: int
    is_main: bool
    model: nn.Module  # the bare model (SyncBatchNorm converted): what checkpoints hold
    ddp_model: nn.Module  # what the step calls: DDP-wrapped, or ``model`` alone
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    amp: AmpSettings
    channels_last: bool
    dataset: SeededDataset
    sampler: DeterministicBatchSampler
    loader: DataLoader
    meta: CheckpointMeta
    eval_fn: Optional[EvalFn]
    best_metric: str
    end_step: int
    handle_signals: bool
    last_path: Path
    best_path: Path
    log: RunLog
    start_time: float
    bar: tqdm
    criterion: Criterion

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the dataset."""
        return self.sampler.steps_per_epoch


def train(
    model: nn.Module,
    train_set: Any,
    cfg: TrainConfig,
    *,
    transform: Optional[Callable[..., Any]] = None,
    eval_fn: Optional[EvalFn] = None,
    meta: Optional[CheckpointMeta] = None,
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

    Works alone or under ``torchrun`` (call :func:`deeplab.distributed.init_distributed`
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
        meta: what every checkpoint stores so it rebuilds and describes the model on its own
            (model config, classes, palette, normalisation, dataset); checked before any work.
        model_config, classes, palette, normalization, dataset_info: the fields of ``meta``
            one by one, for callers without a :class:`CheckpointMeta` (not together with it).
            ``dataset_info`` is what the model was trained on (``{"dataset": "voc", "root":
            ..., "train_split": ..., "val_split": ...}``), so evaluation can default to it.
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
    meta = checked_meta(model, meta, stop_at, model_config=model_config, classes=classes, palette=palette,
                        normalization=normalization, dataset_info=dataset_info)
    run, state, restored, resume_path = build_run(
        model, train_set, cfg, meta=meta, transform=transform, eval_fn=eval_fn, optimizer=optimizer,
        scheduler=scheduler, collate_fn=collate_fn, best_metric=best_metric, stop_at=stop_at, progress=progress,
        tensorboard=tensorboard, handle_signals=handle_signals,
    )
    result = start_result(run, state, cfg, resume_path)
    set_train_mode(run.ddp_model, freeze_bn=cfg.freeze_bn)
    state.last_log_time = time.time()

    # Last, so nothing above (model building, DDP, loader setup) shifts the state.
    if restored is not None:
        restore_rng_state(restored.rng)
    else:
        seed_everything(cfg.seed)
    try:
        with StopOnSignal(handle_signals) as stopper:
            train_loop(run, state, result, stopper)
    except RuntimeError as exc:
        if run.world_size > 1 and not isinstance(exc, PeerFailureError) and is_peer_failure(exc):
            # One line for the launcher's log instead of a C++ traceback per rank.
            raise PeerFailureError(peer_failure_message(
                exc, rank=get_rank(), step=state.step, timeout_s=cfg.dist_timeout,
                checkpoint=str(run.last_path) if run.last_path.exists() else None)) from exc
        raise
    finally:
        run.bar.close()
        run.log.close()
        close_loader(run.loader)
        disable_fake_quant(run.model)  # the caller's model computes in float again (its ranges are in last.pt)

    finish_result(run, state, result, cfg)
    barrier()  # nobody returns (and e.g. destroys the group) while rank 0 still writes
    return result


def checked_meta(
    model: nn.Module,
    meta: Optional[CheckpointMeta],
    stop_at: Optional[int],
    *,
    model_config: Union[ModelConfig, Mapping[str, Any], None],
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    normalization: Optional[Mapping[str, Sequence[float]]],
    dataset_info: Optional[Mapping[str, Any]],
) -> CheckpointMeta:
    """``meta``, or one built from its loose fields (not both), checked against the model."""
    if meta is None:
        meta = CheckpointMeta(model_config, classes, palette, normalization, dict(dataset_info or {}))  # type: ignore[arg-type]
    elif model_config is not None or classes or palette or normalization is not None or dataset_info is not None:
        raise ConfigError("give train() either meta= or its fields (model_config=, classes=, ...), not both")
    return dataclasses.replace(meta, config=check_arguments(model, meta.config, meta.classes, meta.palette, stop_at),
                               dataset=dict(meta.dataset))


def start_result(run: Run, state: TrainState, cfg: TrainConfig, resume_path: Optional[Path]) -> TrainResult:
    """Log the start (or resume) of the run and the result as it stands before the first step."""
    run.log.write({"kind": "resume" if resume_path else "start", "step": state.step, "time": run.start_time,
                   "world_size": run.world_size, "from": str(resume_path) if resume_path else None,
                   "restarts": restart_count(), "train_config": cfg.to_dict()})
    return TrainResult(step=state.step, reason="finished",
                       best_checkpoint=run.best_path if run.best_path.exists() else None,
                       best_metric=state.best.get("value"), last_eval=state.last_eval, restarts=restart_count())


def finish_result(run: Run, state: TrainState, result: TrainResult, cfg: TrainConfig) -> None:
    """Why and where the loop ended, once it has."""
    if result.reason != "signal" and state.step < cfg.max_steps:
        result.reason = "stop_at"
    result.step = state.step
    if result.last_checkpoint is None and run.last_path.exists():
        result.last_checkpoint = run.last_path


def train_loop(run: Run, state: TrainState, result: TrainResult, stopper: "StopOnSignal") -> None:
    """Optimizer steps from ``state`` to ``run.end_step``, epoch by epoch; logs, evaluates, saves."""
    cfg = run.cfg
    while state.step < run.end_step:
        run.sampler.set_epoch(state.epoch, start_step=state.pos)
        batches = iter(run.loader)
        stop = False
        while state.pos < run.steps_per_epoch and state.step < run.end_step:
            lr_used = run_step(run, state, [next(batches) for _ in range(cfg.accum_steps)])
            run.bar.update(1)
            step = state.step
            do_log = step % cfg.log_every == 0 or step == run.end_step
            do_eval = run.eval_fn is not None and (
                (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == cfg.max_steps
            )
            stop = stop_requested(run, stopper)
            do_ckpt = (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0) or step == run.end_step or stop
            if do_log or do_ckpt:
                result.train_loss = log_step(run, state, lr_used)
            if do_eval:
                evaluate_and_track_best(run, state, result)
            if do_ckpt:
                save_last(run, state, result)
            if stop:
                break
        if stop:
            result.reason = "signal"
            return
        if state.pos >= run.steps_per_epoch:
            state.epoch, state.pos = state.epoch + 1, 0


# --------------------------------------------------------------------------- the steps


def build_run(
    model: nn.Module,
    train_set: Any,
    cfg: TrainConfig,
    *,
    meta: CheckpointMeta,
    transform: Optional[Callable[..., Any]],
    eval_fn: Optional[EvalFn],
    optimizer: Optional[Optimizer],
    scheduler: Optional[LRScheduler],
    collate_fn: Optional[Callable[..., Any]],
    best_metric: str,
    stop_at: Optional[int],
    progress: bool,
    tensorboard: bool,
    handle_signals: bool,
) -> Tuple[Run, TrainState, Optional[Restored], Optional[Path]]:
    """Everything :func:`train` runs on: device, data, model, optimizer, restored state, logs.

    Consumes no global randomness (the caller seeds or restores the RNGs after it).

    Returns:
        The :class:`Run`, the :class:`TrainState` to start from, what was restored (if
        resuming) and the checkpoint resumed from.
    """
    rank, world_size = get_rank(), get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    device = resolve_device(cfg.device, local_rank)
    last_path, best_path = Path(cfg.run_dir) / "last.pt", Path(cfg.run_dir) / "best.pt"

    resume_path = resolve_resume(cfg, last_path)
    dataset = train_set if isinstance(train_set, SeededDataset) and transform is None else SeededDataset(
        train_set, transform, seed=cfg.seed
    )
    sampler = DeterministicBatchSampler(len(dataset), global_batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                                        world_size=world_size, accum_steps=cfg.accum_steps)
    channels_last = device.type == "cuda" and cfg.channels_last
    model, optimizer, scheduler = setup_model(model, cfg, device, world_size, channels_last=channels_last,
                                              optimizer=optimizer, scheduler=scheduler)
    amp = amp_settings(device.type, enabled=cfg.amp, dtype=cfg.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.use_scaler)
    best = {"metric": best_metric, "value": None, "step": None}
    restored = None if resume_path is None else restore(
        resume_path, cfg=cfg, config_dict=meta.config, model=model, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler if amp.use_scaler else None, steps_per_epoch=sampler.steps_per_epoch,
        num_samples=len(dataset), world_size=world_size, best=best, stacklevel=3,
    )
    state = TrainState.begin(restored, best=best, device=device)

    ddp_model = wrap_ddp(model, device) if world_size > 1 else model
    loader = build_train_loader(dataset, sampler, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                collate_fn=collate_fn)
    run = Run(
        cfg=cfg, device=device, world_size=world_size, is_main=rank == 0, model=model, ddp_model=ddp_model,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp=amp, channels_last=channels_last,
        dataset=dataset, sampler=sampler, loader=loader, meta=meta, eval_fn=eval_fn, best_metric=best_metric,
        end_step=cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps), handle_signals=handle_signals,
        last_path=last_path, best_path=best_path,
        log=RunLog(Path(cfg.run_dir), enabled=rank == 0, tensorboard=tensorboard,
                   resume_step=state.step),
        start_time=time.time(),
        bar=progress_bar(total=cfg.max_steps, initial=state.step, enabled=progress and rank == 0),
        criterion=criterion_from_config(cfg, meta.config),
    )
    return run, state, restored, resume_path


def criterion_from_config(cfg: TrainConfig, model_config: Optional[Mapping[str, Any]]) -> Criterion:
    """The loss of ``cfg.loss`` with its options and class weights (see :mod:`deeplab.losses`)."""
    num_classes = None if model_config is None else model_config.get("num_classes")
    if cfg.class_weights is not None and num_classes is not None and len(cfg.class_weights) != num_classes:
        raise ConfigError(f"{len(cfg.class_weights)} class weights for {num_classes} classes; give one weight per class")
    return build_criterion(cfg.loss, ignore_index=cfg.ignore_index, class_weights=cfg.class_weights,
                           ohem_thresh=cfg.ohem_thresh, ohem_min_kept=cfg.ohem_min_kept, topk_percent=cfg.topk_percent,
                           focal_gamma=cfg.focal_gamma, dice_smooth=cfg.dice_smooth,
                           lovasz_per_image=cfg.lovasz_per_image)


def setup_model(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    world_size: int,
    *,
    channels_last: bool,
    optimizer: Optional[Optimizer],
    scheduler: Optional[LRScheduler],
) -> Tuple[nn.Module, Optimizer, LRScheduler]:
    """Model to the device (SyncBatchNorm, frozen BN as ``cfg`` says), optimizer, schedule.

    Returns:
        The model to train (SyncBatchNorm conversion may replace the object) and the
        given or default (:func:`build_optimizer`, :class:`PolyLR`) optimizer and schedule.
    """
    model.to(device)
    if device.type == "cuda":
        # Fixed crop size -> the same conv shapes every step, so autotuning pays off.
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
    if world_size > 1 and cfg.sync_bn and not cfg.freeze_bn:
        model = convert_sync_batchnorm(model, device=device)
    if cfg.freeze_bn:
        freeze_batchnorm(model)
    if cfg.qat:  # after SyncBatchNorm conversion, which would replace the patched modules
        enable_fake_quant(model)
    if optimizer is None:
        optimizer = build_optimizer(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                    decay_norm_and_bias=cfg.decay_norm_and_bias,
                                    decay_depthwise=cfg.decay_depthwise, nesterov=cfg.nesterov)
    if scheduler is None:
        scheduler = PolyLR(optimizer, max_steps=cfg.max_steps, power=cfg.poly_power)
    return model, optimizer, scheduler


def run_step(run: Run, state: TrainState, micro: Sequence[Batch]) -> float:
    """One optimizer step over ``cfg.accum_steps`` micro-batches; advances ``state``.

    The loss is normalised by the valid-pixel count of the *global* batch (every
    micro-batch of every rank; see :mod:`deeplab.losses`), all-reduced before the first
    forward pass. Gradients accumulate locally (DDP ``no_sync``) and are all-reduced once,
    with the last micro-batch.

    Returns:
        The learning rate the step used.
    """
    ignore = run.cfg.ignore_index
    valid = torch.tensor([float(sum(int((masks != ignore).sum()) for _, masks in micro))],
                         dtype=torch.float64, device=run.device)
    all_reduce_(valid, "sum")
    normalizer = max(float(valid.item()), 1.0) / run.world_size
    lr_used = float(run.optimizer.param_groups[0]["lr"])
    step_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    for i, (images, masks) in enumerate(micro):
        sync = run.world_size == 1 or i == len(micro) - 1
        context = contextlib.nullcontext() if sync else run.ddp_model.no_sync()  # type: ignore[operator]
        with context:
            step_loss += forward_backward(run, state, images, masks, normalizer).detach().double()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    state.step += 1
    state.pos += 1
    state.running_loss += step_loss
    state.running_steps += 1
    return lr_used


def forward_backward(run: Run, state: TrainState, images: torch.Tensor, masks: torch.Tensor,
                     normalizer: float) -> torch.Tensor:
    """Loss of one micro-batch (summed over pixels, divided by ``normalizer``), backpropagated."""
    images = images.to(run.device, non_blocking=True)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = masks.to(run.device, non_blocking=True).long()
    with torch.autocast(run.device.type, dtype=run.amp.dtype, enabled=run.amp.enabled):
        logits = run.ddp_model(images)
    fault_point("backward", state.step + 1)  # test-only: the peers then wait inside a collective
    if not state.checked_batch:
        check_batch(logits, masks, run.cfg.ignore_index)
        state.checked_batch = True
    loss = run.criterion(logits, masks, normalizer=normalizer)
    run.scaler.scale(loss).backward()
    return loss


def stop_requested(run: Run, stopper: "StopOnSignal") -> bool:
    """Whether a signal asked to stop, agreed by all ranks (every rank must stop together)."""
    if run.world_size > 1 and run.handle_signals:
        flag = torch.tensor([1.0 if stopper.requested else 0.0], device=run.device)
        return bool(all_reduce_(flag, "max").item())
    return stopper.requested is not None


def log_step(run: Run, state: TrainState, lr_used: float) -> float:
    """Write the train line (mean of the global-batch losses since the last one); all ranks call it.

    Returns:
        That mean loss.

    Raises:
        FloatingPointError: it is NaN/inf (and no GradScaler is there to skip the step).
    """
    mean_loss = all_reduce_(state.running_loss.clone(), "mean").item() / max(state.running_steps, 1)
    if not math.isfinite(mean_loss) and not run.scaler.is_enabled():
        saved = f" ({run.last_path})" if run.last_path.exists() else ""
        raise FloatingPointError(
            f"training loss became {mean_loss} by step {state.step}; nothing was saved after the "
            f"last checkpoint{saved}. Lower lr, check the data (labels, normalisation), or try amp=False"
        )
    now = time.time()
    img_per_s = (state.step - state.last_log_step) * run.cfg.batch_size / max(now - state.last_log_time, 1e-9)
    run.log.write(train_record(step=state.step, epoch=state.epoch, loss=mean_loss, lr=lr_used, img_per_s=img_per_s,
                               now=now, start_time=run.start_time))
    run.log.add_scalars("train", {"loss": mean_loss, "lr": lr_used, "img_per_s": img_per_s}, state.step)
    show_on_bar(run.bar, loss=mean_loss, lr=lr_used, img_per_s=img_per_s)
    state.running_loss.zero_()
    state.running_steps = 0
    state.last_log_time, state.last_log_step = now, state.step
    return mean_loss


def evaluate_and_track_best(run: Run, state: TrainState, result: TrainResult) -> None:
    """Run ``eval_fn`` (RNG preserved), log it, and write ``best.pt`` when the metric improves."""
    bare = run.model
    bare.eval()
    fault_point("eval", state.step)  # test-only
    try:
        with preserved_rng(), torch.no_grad():
            metrics = dict(run.eval_fn(bare))  # type: ignore[misc]
    finally:
        set_train_mode(run.ddp_model, freeze_bn=run.cfg.freeze_bn)
    if run.best_metric not in metrics:
        raise KeyError(f"eval_fn returned {sorted(metrics)}, without {run.best_metric!r}; return it or pass best_metric=")
    state.last_eval = metrics
    run.log.write({"kind": "eval", "step": state.step, "time": time.time(), **metrics})
    run.log.add_scalars("eval", metrics, state.step)
    value = float(metrics[run.best_metric])
    if state.best["value"] is None or value > state.best["value"]:
        state.best = {"metric": run.best_metric, "value": value, "step": state.step}
        if run.is_main:
            save_checkpoint(run.best_path, payload(run, state))
        result.best_checkpoint = run.best_path
    result.best_metric = state.best["value"]
    result.last_eval = metrics


def save_last(run: Run, state: TrainState, result: TrainResult) -> None:
    """Write ``last.pt`` (rank 0) and record it in ``result``."""
    if run.is_main:
        keep_previous(run.last_path)  # the fallback, should last.pt ever be unreadable
        save_checkpoint(run.last_path, payload(run, state))
    result.last_checkpoint = run.last_path
    fault_point("after_ckpt", state.step)  # test-only


def payload(run: Run, state: TrainState) -> Dict[str, Any]:
    """The checkpoint of the run as it stands (see :func:`deeplab.train.resume.checkpoint_payload`)."""
    return checkpoint_payload(
        model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler, meta=run.meta,
        cfg=run.cfg, step=state.step, epoch=state.epoch, pos=state.pos, steps_per_epoch=run.steps_per_epoch,
        num_samples=len(run.dataset), world_size=run.world_size, last_eval=state.last_eval, best=state.best,
    )
