"""What a training run writes besides checkpoints: ``metrics.jsonl``, TensorBoard, the bar.

``run_dir/metrics.jsonl`` holds one JSON object per line, told apart by ``"kind"``:
``"start"``/``"resume"`` (world size, the resolved recipe), ``"train"`` (see
:func:`train_record`) and ``"eval"`` (the step and ``eval_fn``'s metrics). The same
scalars go to ``run_dir/tb`` when the ``tensorboard`` package is installed. After every
``"eval"`` line, ``run_dir/curves.png`` (loss, lr and mIoU against step) is redrawn from
``metrics.jsonl``, so a person can look at a run while it trains. Only rank 0 writes; on
the other ranks a :class:`RunLog` is inert.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import IO, Any, Dict, Mapping, Optional

import torch
from tqdm import tqdm

from deeplab._utils import atomic_write, jsonable
from deeplab.viz import plot_curves, read_metrics

__all__ = ["STEP_KINDS", "RunLog", "open_tensorboard", "progress_bar", "scalars", "show_on_bar", "train_record",
           "truncate_records"]


def scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """The plain numbers of ``metrics`` (one-element tensors included; lists and bools not)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def open_tensorboard(log_dir: Path, enabled: bool, purge_step: Optional[int] = None) -> Any:
    """A ``SummaryWriter`` on ``log_dir``, or ``None`` if disabled or not installed.

    ``purge_step``: on resume, the first step the resumed run will log; TensorBoard hides
    the events of the interrupted run from that step on (logged after the checkpoint and
    about to be logged again).
    """
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    if purge_step is None:
        return SummaryWriter(log_dir=str(log_dir))
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


STEP_KINDS = ("train", "eval")


def truncate_records(path: Path, *, after_step: int) -> int:
    """Drop the ``"train"``/``"eval"`` lines of ``path`` past ``after_step`` (atomically).

    A run resumed from the checkpoint of ``after_step`` trains and logs the later steps
    again, so without this a restart would leave those steps twice in ``metrics.jsonl``.
    ``"start"``/``"resume"`` lines are kept; an unparsable line (the torn last line of a
    killed run) is dropped.

    Returns:
        How many lines were dropped.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if record.get("kind") in STEP_KINDS and int(record.get("step", 0)) > after_step:
            dropped += 1
            continue
        kept.append(line + "\n")
    if dropped:
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.write("".join(kept))
    return dropped


class RunLog:
    """``metrics.jsonl`` (appended, flushed per line) and the TensorBoard writer of a run.

    Args:
        run_dir: the run directory (created when ``enabled``).
        enabled: write at all; ``False`` on ranks other than 0.
        tensorboard: also write TensorBoard scalars if the package is installed.
        resume_step: the step this run starts from (its checkpoint's, 0 for a fresh run);
            records of later steps, left by an interrupted run (or by a torchrun generation
            killed before its first checkpoint), are removed from both logs, so every step
            appears once however many times the run was restarted.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: Optional[int] = None) -> None:
        self.file: Optional[IO[str]] = None
        self.writer: Any = None
        self.run_dir = run_dir
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            purge_step = None
            if resume_step is not None:
                truncate_records(run_dir / "metrics.jsonl", after_step=resume_step)
                if (run_dir / "tb").exists():  # events of an earlier attempt to hide
                    purge_step = resume_step + 1
            self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            self.writer = open_tensorboard(run_dir / "tb", tensorboard, purge_step=purge_step)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line; flushed so a killed run keeps everything logged so far."""
        if self.file is not None:
            self.file.write(json.dumps(jsonable(dict(record))) + "\n")
            self.file.flush()
            if record.get("kind") == "eval":
                self.write_curves()

    def write_curves(self) -> Optional[Path]:
        """Redraw ``run_dir/curves.png`` from ``metrics.jsonl``; a failure warns, never stops the run."""
        if self.file is None:
            return None
        try:
            return plot_curves({self.run_dir.name: read_metrics(self.run_dir)}, self.run_dir / "curves.png",
                               title=str(self.run_dir))
        except Exception as exc:  # a picture must not cost a training run
            warnings.warn(f"could not draw {self.run_dir / 'curves.png'}: {exc}", stacklevel=2)
            return None

    def add_scalars(self, prefix: str, metrics: Mapping[str, Any], step: int) -> None:
        """TensorBoard ``prefix/key`` for every plain number in ``metrics``."""
        if self.writer is not None:
            for key, value in scalars(metrics).items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        """Close the file and the writer."""
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def train_record(
    *, step: int, epoch: int, loss: float, lr: float, img_per_s: float, now: float, start_time: float
) -> Dict[str, Any]:
    """The ``"train"`` line: mean loss since the last one, the LR the step used, throughput."""
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
            "img_per_s": img_per_s, "time": now, "elapsed": now - start_time}


def progress_bar(*, total: int, initial: int, enabled: bool) -> tqdm:
    """The tqdm bar over optimizer steps (disabled: a no-op bar)."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)


def show_on_bar(bar: tqdm, *, loss: float, lr: float, img_per_s: float) -> None:
    """Loss, LR and images/s as the bar's postfix."""
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.1f}")
