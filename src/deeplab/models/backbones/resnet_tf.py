"""ResNet-50/101 in the TF reference's layout: slim's ``resnet_v1`` and DeepLab's ``resnet_v1_beta``.

Written from tensorflow/models ``research/deeplab/core/resnet_v1_beta.py`` and slim's
``nets/resnet_v1.py`` / ``nets/resnet_utils.py``. It differs from the torchvision layout of
:mod:`deeplab.models.backbones.resnet` in three ways that change both the weights and the work:

- the stride of each block sits on its *last* unit (``resnet_v1_beta_block``: units 1..n-1
  stride 1, unit n stride 2), applied by the 3x3 ``conv2`` (``conv2d_same``); a strided unit
  whose width does not change has no projection, its shortcut is ``subsample`` (a 1x1 max pool,
  i.e. every other pixel);
- ``_beta``: the 7x7 root conv is three 3x3 convs (64 stride 2, 64, 128;
  ``root_block_fn_for_beta_variant``), so ``block1`` starts from 128 channels;
- ``pool1`` is ``max_pool2d(3, stride 2, padding="SAME")``: TF's asymmetric padding (the odd
  pixel after) on even sizes.

Output stride follows slim's ``stack_blocks_dense`` unit by unit: once the target stride is
reached, a unit that would stride runs with stride 1 at the current rate and every later unit at
the rate times that stride. ``block4``'s units multiply their rate by ``multi_grid``
(``unit_rate``). BatchNorm epsilon 1e-5 (``resnet_arg_scope`` as ``feature_extractor`` calls it).

The decoder's low-level feature is the reference's end point
``block1/unit_2/bottleneck_v1/conv3``: the BatchNorm output of ``conv3`` in the second unit of
``block1`` (stride 4, 256 channels) *before* the shortcut is added and before the ReLU.

Parameter names mirror the TF scopes (``conv1_1.conv.weight``, ``block3.22.conv2.bn.running_var``,
``block1.0.shortcut.conv.weight``) so the name map in :mod:`deeplab.tf.names` is a direct
rename. Inputs: ``_beta`` takes pixels in [-1, 1] (``_preprocess_zero_mean_unit_range``), the
plain ``resnet_v1_*`` the pixels minus the ImageNet mean in 0..255 units
(``_preprocess_subtract_imagenet_mean``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deeplab._utils import ConfigError

from ...nn.layers import tf_same_padding
from .base import INCEPTION_MEAN, INCEPTION_STD, Backbone, FeatureSpec, Normalization, init_conv_bn, validate_multi_grid

RESNET_TF_BN_EPS = 1e-5
# tensorflow/models research/deeplab/core/feature_extractor.py:446 ``_MEAN_RGB = [123.15, 115.90,
# 103.06]`` (unchanged since 2018), which ``_preprocess_subtract_imagenet_mean`` (:449; the
# ``_PREPROCESS_FN`` of ``resnet_v1_50``/``resnet_v1_101``, :471/:473) subtracts from 0..255 pixels, with no
# scaling. Here in [0, 1] pixel units (std 1/255). Not torchvision's/VGG's (123.68, 116.779, 103.939):
# with those, converted plain-ResNet models disagree with the reference.
TF_IMAGENET_MEAN = (123.15 / 255.0, 115.90 / 255.0, 103.06 / 255.0)
TF_IMAGENET_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)
# Units per block of each depth (block1..block4) and the base depths (bottleneck widths).
RESNET_TF_UNITS: Dict[int, Tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BASE_DEPTHS = (64, 128, 256, 512)
BLOCK_STRIDES = (2, 2, 2, 1)  # on the last unit of each block; block4 never strides
# The unit (block, index) whose conv3 is the decoder's low-level feature.
LOW_LEVEL_UNIT = (0, 1)


class ConvBN(nn.Module):
    """slim ``conv2d`` with BatchNorm (no bias) and optional ReLU; 'same' padding for odd kernels.

    With stride 2 this is ``conv2d_same``'s explicit symmetric padding ``rate * (k - 1) / 2``,
    which for odd kernels equals the stride-1 "SAME" padding: no asymmetric case exists here.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, *, stride: int = 1, rate: int = 1,
                 relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=rate * (kernel_size - 1) // 2,
                              dilation=rate, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=RESNET_TF_BN_EPS)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class MaxPool2dSame(nn.Module):
    """``max_pool2d(kernel, stride, padding="SAME")`` as TF computes it (padding from each input's size)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = tf_same_padding(x.shape[-1], self.kernel_size, self.stride)
        if torch.compiler.is_compiling() or top or bottom or left or right:  # see Conv2dSame.forward
            # TF's max pool ignores padded positions: pad with -inf, not zeros.
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class BottleneckV1(nn.Module):
    """slim ``bottleneck`` (``bottleneck_v1``): 1x1 -> 3x3 (stride, rate) -> 1x1, plus shortcut.

    ``forward(x) -> (relu(shortcut + conv3), conv3)``: the second value is the pre-activation
    branch output the reference taps as an end point.
    """

    def __init__(self, cin: int, depth: int, bottleneck: int, *, stride: int, rate: int) -> None:
        super().__init__()
        self.stride = stride
        # depth == depth_in: resnet_utils.subsample (1x1 max pool with the stride), no weights.
        self.shortcut = ConvBN(cin, depth, 1, stride=stride, relu=False) if depth != cin else None
        self.conv1 = ConvBN(cin, bottleneck, 1)
        self.conv2 = ConvBN(bottleneck, bottleneck, 3, stride=stride, rate=rate)
        self.conv3 = ConvBN(bottleneck, depth, 1, relu=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.shortcut is not None:
            shortcut = self.shortcut(x)
        else:
            shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        branch = self.conv3(self.conv2(self.conv1(x)))
        return F.relu(shortcut + branch), branch


def unit_plan(
    units: Sequence[int], *, output_stride: int, multi_grid: Optional[Sequence[int]] = None
) -> List[List[Tuple[int, int]]]:
    """``(stride, rate)`` of every unit, block by block, as slim's ``stack_blocks_dense`` runs them.

    Args:
        units: units per block (``block1`` .. ``block4``).
        output_stride: 8, 16 or 32 (the root block's stride 4 included).
        multi_grid: ``block4``'s ``unit_rate`` per unit (default all 1).
    """
    if output_stride % 4:
        raise ConfigError(f"output_stride must be a multiple of 4 for ResNet, got {output_stride}")
    target = output_stride // 4  # resnet_v1_beta: the root block takes 4 out first
    grid = tuple(multi_grid) if multi_grid is not None else (1,) * units[3]
    current, rate = 1, 1
    plan: List[List[Tuple[int, int]]] = []
    for block, (count, block_stride) in enumerate(zip(units, BLOCK_STRIDES)):
        row: List[Tuple[int, int]] = []
        for i in range(count):
            stride = block_stride if i == count - 1 else 1
            unit_rate = grid[i] if block == 3 else 1
            if current == target:
                row.append((1, rate * unit_rate))
                rate *= stride
            else:
                row.append((stride, unit_rate))  # bottleneck(rate=1) * unit_rate
                current *= stride
        plan.append(row)
    if current != target:
        raise ConfigError(f"output_stride {output_stride} cannot be reached; the ResNet's natural stride is {current * 4}")
    return plan


class ResNetTF(Backbone):
    """ResNet v1 in the TF reference's layout (``resnet_v1_50/101`` and ``resnet_v1_50/101_beta``).

    Returns ``{"low_level": block1/unit_2 conv3 (B, 256, H/4, W/4), "out": block4 output
    (B, 2048, H/OS, W/OS)}``.

    Args:
        depth: 50 or 101.
        beta: three 3x3 root convs (DeepLab's ``_beta``) instead of one 7x7.
        output_stride: 8, 16 or 32.
        multi_grid: ``block4`` rate multipliers (3 values; the paper's (1, 2, 4)).
        name: backbone name for messages.
    """

    def __init__(self, depth: int, *, beta: bool, output_stride: int = 16,
                 multi_grid: Optional[Sequence[int]] = None, name: str = "resnet_v1") -> None:
        super().__init__()
        if depth not in RESNET_TF_UNITS:
            raise ConfigError(f"depth must be one of {sorted(RESNET_TF_UNITS)}, got {depth!r}")
        units = RESNET_TF_UNITS[depth]
        grid = validate_multi_grid(multi_grid, units[3], name)
        self.depth = depth
        self.beta = beta
        self.output_stride = output_stride
        self.multi_grid = grid
        if beta:
            self.normalization = Normalization(INCEPTION_MEAN, INCEPTION_STD)
            self.conv1_1 = ConvBN(3, 64, 3, stride=2)
            self.conv1_2 = ConvBN(64, 64, 3)
            self.conv1_3 = ConvBN(64, 128, 3)
            cin = 128
        else:
            self.normalization = Normalization(TF_IMAGENET_MEAN, TF_IMAGENET_STD)
            self.conv1 = ConvBN(3, 64, 7, stride=2)
            cin = 64
        self.pool1 = MaxPool2dSame(3, 2)
        plan = unit_plan(units, output_stride=output_stride, multi_grid=grid)
        blocks = []
        for base, row in zip(BASE_DEPTHS, plan):
            unit_list = []
            for stride, rate in row:
                unit_list.append(BottleneckV1(cin, base * 4, base, stride=stride, rate=rate))
                cin = base * 4
            blocks.append(nn.ModuleList(unit_list))
        self.block1, self.block2, self.block3, self.block4 = blocks
        self.feature_specs = {"low_level": FeatureSpec(256, 4), "out": FeatureSpec(2048, output_stride)}
        init_conv_bn(self)

    def blocks(self) -> List[nn.ModuleList]:
        return [self.block1, self.block2, self.block3, self.block4]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.beta:
            x = self.conv1_3(self.conv1_2(self.conv1_1(x)))
        else:
            x = self.conv1(x)
        x = self.pool1(x)
        low_level = x
        for b, block in enumerate(self.blocks()):
            for i, unit in enumerate(block):
                x, branch = unit(x)
                if (b, i) == LOW_LEVEL_UNIT:
                    low_level = branch
        return {"low_level": low_level, "out": x}


def resnet_v1_50(*, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None,
                 tf_compat: bool = False) -> ResNetTF:
    """slim/DeepLab ``resnet_v1_50`` (7x7 root; ``tf_compat`` changes nothing: it is TF's already)."""
    return ResNetTF(50, beta=False, output_stride=output_stride, multi_grid=multi_grid, name="resnet_v1_50")


def resnet_v1_101(*, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None,
                  tf_compat: bool = False) -> ResNetTF:
    """slim/DeepLab ``resnet_v1_101`` (7x7 root)."""
    return ResNetTF(101, beta=False, output_stride=output_stride, multi_grid=multi_grid, name="resnet_v1_101")


def resnet_v1_50_beta(*, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None,
                      tf_compat: bool = False) -> ResNetTF:
    """DeepLab's ``resnet_v1_50_beta`` (three 3x3 root convs; the model zoo's ImageNet file)."""
    return ResNetTF(50, beta=True, output_stride=output_stride, multi_grid=multi_grid, name="resnet_v1_50_beta")


def resnet_v1_101_beta(*, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None,
                       tf_compat: bool = False) -> ResNetTF:
    """DeepLab's ``resnet_v1_101_beta`` (three 3x3 root convs): the paper's ResNet-101."""
    return ResNetTF(101, beta=True, output_stride=output_stride, multi_grid=multi_grid, name="resnet_v1_101_beta")
