"""Optimizer, learning-rate schedule, BatchNorm freezing and mixed-precision settings.

SGD with momentum in two parameter groups (decayed conv/linear kernels, undecayed norm
scales/shifts and biases) and the paper's poly schedule, as a resumable ``LRScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler

from deeplab._utils import ConfigError

__all__ = [
    "AmpSettings",
    "PolyLR",
    "amp_settings",
    "build_optimizer",
    "freeze_batchnorm",
    "poly_lr",
    "set_train_mode",
]


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
        raise ConfigError("the model has no trainable parameters (all requires_grad=False)")
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
            raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = int(max_steps)
        self.power = float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:  # type: ignore[override]
        """Rates for the current ``last_epoch`` (= completed steps)."""
        return [poly_lr(base, self.last_epoch, self.max_steps, self.power) for base in self.base_lrs]  # type: ignore[arg-type]

    def _get_closed_form_lr(self) -> List[float]:
        return self.get_lr()


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
        raise ConfigError(f"unknown amp dtype {dtype!r}; choose from ['auto', 'bf16', 'fp16']")
    if device_type == "cpu":
        if dtype == "fp16":
            raise ConfigError("amp_dtype='fp16' is not supported on CPU; use 'bf16' or 'auto' (bf16)")
        return AmpSettings(True, torch.bfloat16, False)
    if device_type == "cuda":
        if bf16_supported is None:
            bf16_supported = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if dtype == "bf16" and not bf16_supported:
            raise ConfigError("this GPU does not support bf16; use amp_dtype='fp16' or 'auto'")
        if dtype == "auto":
            dtype = "bf16" if bf16_supported else "fp16"
    elif dtype == "auto":
        dtype = "bf16"
    if dtype == "bf16":
        return AmpSettings(True, torch.bfloat16, False)
    return AmpSettings(True, torch.float16, True)
