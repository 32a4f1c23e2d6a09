"""Conv + BatchNorm + ReLU, atrous separable convolution and resizing."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence, Tuple

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


def tf_same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TensorFlow's ``padding="SAME"`` for one spatial dimension: ``(before, after)``.

    The output has ``ceil(size / stride)`` elements and the odd pixel of padding goes *after*
    (bottom/right). For stride 1 this is PyTorch's symmetric ``dilation * (k - 1) // 2``; for a
    stride-2 3x3 conv on an even size TF pads ``(0, 1)`` where PyTorch pads ``(1, 1)``, which
    shifts every output pixel by half an input pixel.
    """
    effective = dilation * (kernel_size - 1) + 1
    out = (size + stride - 1) // stride  # ceil, written as slicing x[::stride] sizes it (traced shapes then match)
    total = (out - 1) * stride + effective - size
    if effective < stride:  # only then can it be negative; no max() on a traced size otherwise
        total = max(total, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``"SAME"`` padding, computed from each input's size.

    Used by TF-compatible backbones (``tf_compat=True``) for strided convs, where TF's
    asymmetric padding differs from PyTorch's symmetric one on even input sizes. Parameter
    names and shapes are ``nn.Conv2d``'s; the constructor's ``padding`` must be 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 **kwargs: Any) -> None:
        if padding not in (0, (0, 0)):
            raise ValueError(f"Conv2dSame computes its padding from the input; pass padding=0, not {padding!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        # Traced (torch.export / torch.compile with dynamic sizes): always pad - a zero pad is a
        # no-op, and branching on a symbolic size would pin the graph to one parity of H and W.
        if torch.compiler.is_compiling() or top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def resize(x: torch.Tensor, size: Sequence[Any], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size = (H', W')`` (a ``torch.Size`` works).

    ``align_corners=True`` reproduces TensorFlow 1's ``resize_bilinear(align_corners=True)``
    used by the reference implementation; PyTorch's default is ``False``. Sizes are passed
    through untouched (no ``int()``), so a traced/exported graph keeps them symbolic.
    """
    return F.interpolate(x, size=tuple(size[-2:]), mode="bilinear", align_corners=align_corners)
