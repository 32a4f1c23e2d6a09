"""Atrous Spatial Pyramid Pooling with image-level features (DeepLabv3, Sec. 3.3)."""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deeplab._utils import ConfigError

from ..nn.layers import HEAD_BN_EPS, ConvBNReLU, conv3x3_bn_relu

DEFAULT_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def default_aspp_rates(output_stride: int) -> Tuple[int, ...]:
    """The paper's ASPP rates for an output stride: 16 -> (6, 12, 18), 8 -> (12, 24, 36)."""
    if output_stride not in DEFAULT_RATES:
        raise ConfigError(f"no default ASPP rates for output_stride {output_stride}; choose from {sorted(DEFAULT_RATES)}")
    return DEFAULT_RATES[output_stride]


class PoolingBatchNorm(nn.BatchNorm2d):
    """BatchNorm for the 1x1 image-pooling map.

    In training, a batch of one image gives one value per channel, where batch statistics are
    undefined (PyTorch raises, TF silently outputs ``beta``). Then, and only then, this layer
    normalises with its running statistics and leaves them untouched; any larger batch is
    ordinary BatchNorm. Parameter names are BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


class ImagePooling(nn.Sequential):
    """Image-level features: global average pool -> 1x1 conv -> BN -> ReLU -> upsample.

    A global average over the whole feature map is the size-agnostic form of TF's average
    pool over the training-crop window, so any input size works.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),
                conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                bn=PoolingBatchNorm(out_channels, eps=HEAD_BN_EPS),
                relu=nn.ReLU(inplace=True),
            )
        )

    # LiteRT's BROADCAST_TO cannot run expand's shape; deeplab.deploy.tflite sets this on the copy it
    # converts. ``y * 1`` is ``y`` exactly, so both forms give the same values.
    broadcast_by_multiply = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = super().forward(x)
        if self.broadcast_by_multiply:
            return y * x.new_ones((1, 1, size[0], size[1]))
        # Bilinear upsampling of a 1x1 map is a broadcast; expand avoids the interpolation kernel.
        return y.expand(-1, -1, size[0], size[1])


class ASPP(nn.Module):
    """ASPP: a 1x1 branch, one 3x3 atrous branch per rate, optional image pooling, then a 1x1
    projection with dropout.

    Shapes: ``(B, in_channels, h, w) -> (B, out_channels, h, w)``.

    Args:
        in_channels: channels of the backbone's final feature.
        out_channels: channels of every branch and of the projection (paper: 256).
        rates: atrous rates of the 3x3 branches; ``()`` keeps only 1x1 + image pooling.
        separable: atrous separable (depthwise -> BN -> ReLU -> pointwise -> BN -> ReLU) or regular 3x3.
        image_pooling: include the image-level branch.
        dropout: dropout probability after the projection (TF: keep_prob 0.9).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        separable: bool = True,
        image_pooling: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        branches: List[nn.Module] = [ConvBNReLU(in_channels, out_channels, 1)]
        branches += [conv3x3_bn_relu(in_channels, out_channels, dilation=r, separable=separable) for r in rates]
        self.convs = nn.ModuleList(branches)
        self.image_pool: Optional[ImagePooling] = (
            ImagePooling(in_channels, out_channels) if image_pooling else None
        )
        n_branches = len(branches) + (1 if image_pooling else 0)
        self.project = ConvBNReLU(n_branches * out_channels, out_channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TF's order: image pooling first, then 1x1, then the atrous branches.
        outputs = [] if self.image_pool is None else [self.image_pool(x)]
        outputs += [branch(x) for branch in self.convs]
        return self.dropout(self.project(torch.cat(outputs, dim=1)))
