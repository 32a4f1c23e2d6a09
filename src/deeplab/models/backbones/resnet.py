"""ResNet-50/101 (v1.5, torchvision layout) with atrous convolution and multi-grid.

Parameter names match torchvision's ``resnet50``/``resnet101`` files (``conv1.weight``,
``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``, ``bn1.running_mean``...), so those
files load with strict key matching; their classifier ``fc.*`` is listed in
``pretrained_ignore``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    FeatureSpec,
    Normalization,
    init_conv_bn,
    stride_to_dilation,
    validate_multi_grid,
)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv, "ResNet v1.5")."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Sequential] = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as torchvision: no extra feature-map allocation per block
        return self.relu(out)


class ResNet(Backbone):
    """ResNet backbone for DeepLab.

    Output stride 32 is the plain network; 16 dilates ``layer4`` (rate 2); 8 dilates
    ``layer3`` (rate 2) and ``layer4`` (rate 4). The first unit of a dilated stage keeps the
    previous rate on its 3x3 conv (it is the conv that gave up its stride; torchvision's
    ``previous_dilation``, TF's ``stack_blocks_dense``). With ``multi_grid=(r1, r2, r3)`` the
    paper's rule applies to ``layer4`` instead: unit ``i`` runs at ``rate * r_i`` (OS 16:
    (2, 4, 8)).

    Returns ``{"low_level": layer1 output (B, 256, H/4, W/4), "out": layer4 output
    (B, 2048, H/OS, W/OS)}``.

    Args:
        layers: units per stage, e.g. ``(3, 4, 23, 3)`` for ResNet-101.
        output_stride: 8, 16 or 32.
        multi_grid: optional per-unit rate multipliers for ``layer4``.
        name: backbone name for messages.
    """

    pretrained_ignore = ("fc.",)

    def __init__(
        self,
        layers: Sequence[int],
        *,
        output_stride: int = 16,
        multi_grid: Optional[Sequence[int]] = None,
        name: str = "resnet",
    ) -> None:
        super().__init__()
        grid = validate_multi_grid(multi_grid, layers[3], name)
        self.output_stride = output_stride
        self.normalization = Normalization(IMAGENET_MEAN, IMAGENET_STD)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        nominal = (1, 2, 2, 2)
        plan = stride_to_dilation(nominal, initial_stride=4, output_stride=output_stride)
        widths = (64, 128, 256, 512)
        stages: List[nn.Sequential] = []
        for index, ((stride, rate), nominal_stride, planes, units) in enumerate(zip(plan, nominal, widths, layers)):
            # A stage that gave up its stride runs its first unit's 3x3 (the conv that would
            # have strided) at the old rate and every later unit at the multiplied rate.
            later = rate * nominal_stride if stride != nominal_stride else rate
            if index == 3 and grid is not None:
                rates = [later * g for g in grid]
            else:
                rates = [rate] + [later] * (units - 1)
            stages.append(self._make_layer(planes, units, stride=stride, rates=rates))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_specs = {
            "low_level": FeatureSpec(256, 4),
            "out": FeatureSpec(512 * Bottleneck.expansion, output_stride),
        }
        init_conv_bn(self)

    def _make_layer(self, planes: int, units: int, *, stride: int, rates: Sequence[int]) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        blocks = [Bottleneck(self.inplanes, planes, stride=stride, dilation=rates[0], downsample=downsample)]
        self.inplanes = planes * Bottleneck.expansion
        blocks += [Bottleneck(self.inplanes, planes, dilation=rate) for rate in rates[1:]]
        return nn.Sequential(*blocks)


    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low_level = self.layer1(x)
        out = self.layer4(self.layer3(self.layer2(low_level)))
        return {"low_level": low_level, "out": out}


def resnet50(
    *, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None, tf_compat: bool = False
) -> ResNet:
    """ResNet-50 (torchvision layout). ``tf_compat`` changes nothing in the backbone: the TF
    reference's ``resnet_v1_*_beta`` is another network (three-conv stem, stride on the last unit of a
    block): :mod:`deeplab.models.backbones.resnet_tf`."""
    return ResNet((3, 4, 6, 3), output_stride=output_stride, multi_grid=multi_grid, name="resnet50")


def resnet101(
    *, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None, tf_compat: bool = False
) -> ResNet:
    """ResNet-101 (torchvision layout). ``tf_compat`` changes nothing in the backbone (see
    :func:`resnet50`)."""
    return ResNet((3, 4, 23, 3), output_stride=output_stride, multi_grid=multi_grid, name="resnet101")
