"""The training loop's guards: argument checks before any work, the batch check of the first
step, and the SIGINT/SIGTERM handler that turns a signal into a stop at the step boundary."""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from deeplab._utils import ConfigError
from deeplab.config import ModelConfig
from deeplab.train.resume import model_config_dict

__all__ = ["StopOnSignal", "check_arguments", "check_batch"]


def check_arguments(
    model: nn.Module,
    model_config: Union[ModelConfig, Mapping[str, Any], None],
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    stop_at: Optional[int],
) -> Optional[Dict[str, Any]]:
    """Metadata checks before any work, so a mistake costs seconds, not a run.

    Returns:
        The model config as a dict (``None``, with a warning, when not given).
    """
    # stacklevel 3: the warning points at whoever called train().
    config_dict = model_config_dict(model_config, stacklevel=3)
    if classes and config_dict is not None and len(classes) != config_dict["num_classes"]:
        raise ConfigError(
            f"{len(classes)} class names given but model_config.num_classes={config_dict['num_classes']}; "
            "they must agree"
        )
    if palette and classes and len(palette) != len(classes):
        raise ConfigError(f"{len(palette)} palette colours for {len(classes)} classes; give one colour per class")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ConfigError("pass the bare model to train(); it converts BatchNorm and wraps it in DDP itself")
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"stop_at must be >= 1, got {stop_at}")
    return config_dict


def check_batch(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """Catch the two classic data bugs with a readable message (once per run).

    Raises:
        ValueError: logits and masks do not line up, or a label is outside the classes.
    """
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ConfigError(
            f"model output {tuple(logits.shape)} does not match masks {tuple(target.shape)}: the model must "
            "return logits (B, C, H, W) at the input size and masks must be (B, H, W)"
        )
    labels = target[target != ignore_index]
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        num_classes = logits.shape[1]
        if low < 0 or high >= num_classes:
            bad = high if high >= num_classes else low
            raise ConfigError(
                f"training masks contain label {bad} but the model predicts {num_classes} classes "
                f"(0..{num_classes - 1}; {ignore_index} = ignore); fix the dataset's label mapping or "
                "the model's num_classes"
            )


class StopOnSignal:
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

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
