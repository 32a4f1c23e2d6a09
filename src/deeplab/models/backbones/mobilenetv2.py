"""MobileNetV2 (torchvision layout) with atrous convolution.

Parameter names match torchvision's ``mobilenet_v2`` file (``features.0.0.weight``,
``features.1.conv.0.0.weight``, ``features.2.conv.3.running_mean``...). DeepLab uses the
network up to the last inverted residual (320 ch, TF ``layer_18``); the file's final 1x1 conv
``features.18.*`` and classifier ``classifier.*`` are listed in ``pretrained_ignore``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, FeatureSpec, Normalization, stride_to_dilation

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
    """torchvision's ``Conv2dNormActivation`` with ReLU6: children ``0`` (conv), ``1`` (bn), ``2``."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, *, stride: int = 1, dilation: int = 1, groups: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 (stride, rate) -> linear 1x1, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, *, stride: int, dilation: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, 1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
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
    """

    pretrained_ignore = ("features.18.", "classifier.")

    def __init__(self, *, output_stride: int = 16) -> None:
        super().__init__()
        self.output_stride = output_stride
        self.normalization = Normalization(IMAGENET_MEAN, IMAGENET_STD)
        unit_strides = [s if i == 0 else 1 for _, _, n, s in INVERTED_RESIDUAL_SETTING for i in range(n)]
        plan = stride_to_dilation(unit_strides, initial_stride=2, output_stride=output_stride)
        features: List[nn.Module] = [ConvBNReLU6(3, 32, 3, stride=2)]
        cin = 32
        unit = 0
        current_stride = 2
        self.low_level_index = 0
        for t, c, n, _ in INVERTED_RESIDUAL_SETTING:
            for _ in range(n):
                stride, dilation = plan[unit]
                features.append(InvertedResidual(cin, c, stride=stride, dilation=dilation, expand_ratio=t))
                current_stride *= stride
                if current_stride == 4:
                    self.low_level_index = len(features) - 1  # last unit at stride 4
                cin = c
                unit += 1
        self.features = nn.Sequential(*features)
        self.feature_specs = {
            "low_level": FeatureSpec(features[self.low_level_index].out_channels, 4),
            "out": FeatureSpec(cin, output_stride),
        }
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        low_level = x
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index == self.low_level_index:
                low_level = x
        return {"low_level": low_level, "out": x}


def mobilenet_v2(*, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None) -> MobileNetV2:
    """MobileNetV2 (torchvision layout). ``multi_grid`` is not defined for it."""
    if multi_grid is not None:
        raise ValueError("multi_grid applies to resnet50/resnet101/xception* backbones, not mobilenet_v2")
    return MobileNetV2(output_stride=output_stride)
