"""Conv + BatchNorm + ReLU, atrous separable convolution and resizing."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# The DeepLab head's BatchNorm epsilon (TF reference: batch_norm_params epsilon 1e-5).
HEAD_BN_EPS = 1e-5


class ConvBNReLU(nn.Sequential):
    """``conv -> bn -> relu`` with 'same' padding for odd kernels at any dilation.

    Children are named ``conv``, ``bn`` and ``relu`` (``relu`` is omitted when ``relu=False``),
    so export code can fold ``bn`` into ``conv`` by name.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size.
        stride: convolution stride.
        dilation: atrous rate.
        groups: ``in_channels`` for a depthwise conv.
        relu: append a ReLU.
        bn_eps: BatchNorm epsilon.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        relu: bool = True,
        bn_eps: float = HEAD_BN_EPS,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        layers["bn"] = nn.BatchNorm2d(out_channels, eps=bn_eps)
        if relu:
            layers["relu"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class SeparableConv2d(nn.Sequential):
    """Atrous separable convolution as in the paper's ASPP and decoder.

    ``depthwise 3x3 (rate) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU``; the TF reference's
    ``split_separable_conv2d``. Shapes: ``(B, in, H, W) -> (B, out, H, W)``.

    Args:
        in_channels: input channels (also the depthwise channels).
        out_channels: output channels of the pointwise conv.
        kernel_size: depthwise kernel size.
        dilation: atrous rate of the depthwise conv.
        bn_eps: BatchNorm epsilon of both BNs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dilation: int = 1,
        bn_eps: float = HEAD_BN_EPS,
    ) -> None:
        super().__init__(
            OrderedDict(
                depthwise=ConvBNReLU(
                    in_channels,
                    in_channels,
                    kernel_size,
                    dilation=dilation,
                    groups=in_channels,
                    bn_eps=bn_eps,
                ),
                pointwise=ConvBNReLU(in_channels, out_channels, 1, bn_eps=bn_eps),
            )
        )


def conv3x3_bn_relu(
    in_channels: int, out_channels: int, *, dilation: int = 1, separable: bool = True
) -> nn.Module:
    """A 3x3 (atrous) conv + BN + ReLU, separable or regular (the paper's ablation switch)."""
    if separable:
        return SeparableConv2d(in_channels, out_channels, 3, dilation=dilation)
    return ConvBNReLU(in_channels, out_channels, 3, dilation=dilation)


def resize(x: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size = (H', W')``.

    ``align_corners=True`` reproduces TensorFlow 1's ``resize_bilinear(align_corners=True)``
    used by the reference implementation; PyTorch's default is ``False``.
    """
    out_size: Tuple[int, int] = (int(size[0]), int(size[1]))
    return F.interpolate(x, size=out_size, mode="bilinear", align_corners=align_corners)
