"""Synchronised BatchNorm for every backend, Gloo on CPU included.

``torch.nn.SyncBatchNorm`` (torch 2.13) raises ``ValueError`` for CPU tensors, so on CPU
(Gloo) :class:`CPUSyncBatchNorm` is used instead: one ``all_reduce`` of per-channel sum,
sum of squares and count in the forward pass, one of ``sum(dy)`` and
``sum(dy * x_hat)`` in the backward pass. :func:`convert_sync_batchnorm` picks the native
layer where torch supports the device and this one elsewhere.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CPUSyncBatchNorm", "convert_sync_batchnorm", "native_sync_batchnorm_supported"]


def native_sync_batchnorm_supported(device_type: str) -> bool:
    """Whether ``torch.nn.SyncBatchNorm`` accepts tensors of this device type.

    torch 2.13 only synchronises CUDA/HPU/XPU/PrivateUse1 tensors; CPU raises
    ``ValueError: SyncBatchNorm expected input tensor to be on GPU ...``.
    """
    supported = {"cuda", "hpu", "xpu"}
    getter = getattr(torch._C, "_get_privateuse1_backend_name", None)
    if getter is not None:
        supported.add(getter())
    return device_type in supported


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch norm over the union of all ranks' batches, with an exact backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        eps: float,
        momentum: float,
        group: Any,
    ) -> torch.Tensor:
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        # float64 accumulators: sum-of-squares variance loses precision in float32.
        xd = x.double()
        stats = torch.cat(
            [
                xd.sum(dims),
                (xd * xd).sum(dims),
                torch.tensor([x.numel() // max(channels, 1)], dtype=torch.float64, device=x.device),
            ]
        )
        dist.all_reduce(stats, group=group)
        total, total_sq, count = stats[:channels], stats[channels : 2 * channels], stats[-1]
        if count.item() <= 1:
            raise ValueError(
                f"SyncBatchNorm needs more than 1 value per channel over all processes, got {int(count.item())}"
            )
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = var * count / (count - 1)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        mean_c, invstd_c = mean.to(compute), invstd.to(compute)
        x_hat = (x.to(compute) - mean_c.view(shape)) * invstd_c.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.to(compute).view(shape)
        if bias is not None:
            y = y + bias.to(compute).view(shape)
        ctx.save_for_backward(x_hat, invstd_c, weight)
        ctx.count = float(count.item())
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.in_dtype = x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x_hat, invstd, weight = ctx.saved_tensors
        channels = x_hat.shape[1]
        dims = [0] + list(range(2, x_hat.dim()))
        shape = [1, channels] + [1] * (x_hat.dim() - 2)
        dy = grad_out.to(x_hat.dtype)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * x_hat).sum(dims)
        # Parameter grads stay local: DDP sums (averages) them across ranks like any other.
        grad_weight = sum_dy_xhat.clone() if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.clone() if ctx.has_bias and ctx.needs_input_grad[2] else None
        # Input grads need the global sums because every x entered the global statistics.
        reduced = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(reduced, group=ctx.group)
        g_sum, g_dot = reduced[:channels] / ctx.count, reduced[channels:] / ctx.count
        scale = invstd if weight is None else invstd * weight.to(x_hat.dtype)
        grad_in = (dy - g_sum.view(shape) - x_hat * g_dot.view(shape)) * scale.view(shape)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_in.to(ctx.in_dtype), grad_weight, grad_bias, None, None, None, None, None


class CPUSyncBatchNorm(_BatchNorm):
    """SyncBatchNorm that works with any backend, including Gloo on CPU.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm*d``, so checkpoints are
    interchangeable. In eval mode, outside a process group or with one process it is
    plain batch norm. Statistics are biased-variance over all processes' pixels; running
    variance uses the unbiased estimate, as ``nn.BatchNorm`` does.

    Args:
        num_features: channels ``C`` of a ``(N, C, ...)`` input.
        process_group: group to synchronise over (default: the whole world).
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``(N, C, ...)`` input with statistics gathered from every process."""
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        sync = (
            use_batch_stats
            and self.training
            and group is not None
            and dist.get_world_size(group) > 1
        )
        track = self.training and self.track_running_stats
        if not sync:
            return F.batch_norm(
                input,
                self.running_mean if (not self.training or self.track_running_stats) else None,
                self.running_var if (not self.training or self.track_running_stats) else None,
                self.weight,
                self.bias,
                use_batch_stats,
                momentum,
                self.eps,
            )
        return _SyncBatchNormFn.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.eps,
            momentum,
            group,
        )


def convert_sync_batchnorm(
    module: nn.Module,
    *,
    device: Union[str, torch.device, None] = None,
    process_group: Any = None,
) -> nn.Module:
    """Replace every BatchNorm layer by a synchronised one, keeping the same tensors.

    Uses ``torch.nn.SyncBatchNorm`` where it supports the device (CUDA), otherwise
    :class:`CPUSyncBatchNorm`. Parameters and buffers are the *same objects*, so an
    optimizer built before the conversion still updates them and state-dict keys are
    unchanged. Call before wrapping in DDP.

    Args:
        module: the model (converted in place where possible; use the return value).
        device: device the model trains on; defaults to the device of its first
            parameter (CPU for a parameterless model).
        process_group: group to synchronise over (default: world).

    Returns:
        The converted module.
    """
    if device is None:
        first = next(module.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device_type = torch.device(device).type
    if native_sync_batchnorm_supported(device_type):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, process_group: Any) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (CPUSyncBatchNorm, nn.SyncBatchNorm)):
        out = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        # Share the buffers themselves, not copies, so running statistics stay one object.
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child, process_group))
    return out
