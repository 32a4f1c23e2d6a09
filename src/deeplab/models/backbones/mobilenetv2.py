"""MobileNetV2 (torchvision layout) with atrous convolution.

Parameter names match torchvision's ``mobilenet_v2`` file (``features.0.0.weight``,
``features.1.conv.0.0.weight``, ``features.2.conv.3.running_mean``...). DeepLab uses the
network up to the last inverted residual (320 ch, TF ``layer_18``); the file's final 1x1 conv
``features.18.*`` and classifier ``classifier.*`` are listed in ``pretrained_ignore``.

``tf_compat=True`` reproduces the TF reference's MobileNetV2 (slim ``mobilenet_v2`` as DeepLab
builds it) with the same parameters: BatchNorm epsilon 1e-3 (slim's default; torchvision uses
1e-5), TF ``"SAME"`` padding on the five stride-2 convs (asymmetric on even input sizes) and
inputs scaled to [-1, 1].
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, cast

import torch
from torch import nn

from deeplab._utils import ConfigError

from ...nn.layers import Conv2dSame
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Backbone,
    FeatureSpec,
    Normalization,
    init_conv_bn,
    stride_to_dilation,
)

# slim.batch_norm's default epsilon, used by the TF reference's MobileNetV2.
TF_MOBILENET_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5

# (expand ratio t, channels c, units n, stride s) of the paper/torchvision.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` with ReLU6: children ``0`` (conv), ``1`` (bn), ``2``.

    ``tf_compat``: TF ``"SAME"`` padding when strided and BatchNorm epsilon 1e-3.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        tf_compat: bool = False,
    ) -> None:
        conv: nn.Conv2d
        if tf_compat and stride > 1:
            conv = Conv2dSame(cin, cout, kernel_size, stride, 0, dilation=dilation, groups=groups, bias=False)
        else:
            padding = dilation * (kernel_size - 1) // 2
            conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False)
        super().__init__(
            conv,
            nn.BatchNorm2d(cout, eps=TF_MOBILENET_BN_EPS if tf_compat else TORCH_BN_EPS),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 (stride, rate) -> linear 1x1, residual when shapes allow."""

    def __init__(
        self, cin: int, cout: int, *, stride: int, dilation: int, expand_ratio: int, tf_compat: bool = False
    ) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, 1, tf_compat=tf_compat))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden, tf_compat=tf_compat),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout, eps=TF_MOBILENET_BN_EPS if tf_compat else TORCH_BN_EPS),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(Backbone):
    """MobileNetV2 backbone (width 1.0).

    Returns ``{"low_level": output of ``features.3`` (B, 24, H/4, W/4), "out": output of
    ``features.17`` (B, 320, H/OS, W/OS)}``.

    Args:
        output_stride: 8, 16 or 32 (same stride-to-rate rule as TF's mobilenet
            ``output_stride``).
        tf_compat: behave like the TF reference's MobileNetV2 (see the module docstring).
    """

    pretrained_ignore = ("features.18.", "classifier.")

    def __init__(self, *, output_stride: int = 16, tf_compat: bool = False) -> None:
        super().__init__()
        self.output_stride = output_stride
        self.tf_compat = tf_compat
        if tf_compat:
            self.normalization = Normalization(INCEPTION_MEAN, INCEPTION_STD)
        else:
            self.normalization = Normalization(IMAGENET_MEAN, IMAGENET_STD)
        unit_strides = [s if i == 0 else 1 for _, _, n, s in INVERTED_RESIDUAL_SETTING for i in range(n)]
        plan = stride_to_dilation(unit_strides, initial_stride=2, output_stride=output_stride)
        features: List[nn.Module] = [ConvBNReLU6(3, 32, 3, stride=2, tf_compat=tf_compat)]
        cin = 32
        unit = 0
        current_stride = 2
        self.low_level_index = 0
        for t, c, n, _ in INVERTED_RESIDUAL_SETTING:
            for _ in range(n):
                stride, dilation = plan[unit]
                features.append(
                    InvertedResidual(cin, c, stride=stride, dilation=dilation, expand_ratio=t, tf_compat=tf_compat)
                )
                current_stride *= stride
                if current_stride == 4:
                    self.low_level_index = len(features) - 1  # last unit at stride 4
                cin = c
                unit += 1
        self.features = nn.Sequential(*features)
        self.feature_specs = {
            "low_level": FeatureSpec(cast(InvertedResidual, features[self.low_level_index]).out_channels, 4),
            "out": FeatureSpec(cin, output_stride),
        }
        init_conv_bn(self)


    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        low_level = x
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index == self.low_level_index:
                low_level = x
        return {"low_level": low_level, "out": x}


def mobilenet_v2(
    *, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None, tf_compat: bool = False
) -> MobileNetV2:
    """MobileNetV2 (torchvision layout). ``multi_grid`` is not defined for it."""
    if multi_grid is not None:
        raise ConfigError("multi_grid applies to resnet50/resnet101/xception* backbones, not mobilenet_v2")
    return MobileNetV2(output_stride=output_stride, tf_compat=tf_compat)
