"""The contract between a backbone and the DeepLab heads."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from deeplab._utils import ConfigError

from ...config import OUTPUT_STRIDES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-trained Xception / MobileNet take pixels scaled to [-1, 1]: (x/255 - 0.5) / 0.5.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class FeatureSpec:
    """Channels and stride (w.r.t. the input) of one backbone output."""

    channels: int
    stride: int


@dataclass(frozen=True)
class Normalization:
    """Input normalisation a backbone's weights expect, in [0, 1] pixel units:
    ``x = (pixel / 255 - mean) / std``."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def to_dict(self) -> Dict[str, List[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


class Backbone(nn.Module):
    """Base class: ``forward(x) -> {"low_level": (B, C_low, H/4, W/4), "out": (B, C, H/OS, W/OS)}``.

    Subclasses set ``feature_specs`` (channels and stride of both outputs), ``output_stride``
    and ``normalization``, and list the key prefixes of the public ImageNet weight files that
    the segmentation backbone deliberately does not use (``pretrained_ignore``: classifier
    layers), so those files load with strict key matching.
    """

    feature_specs: Dict[str, FeatureSpec]
    output_stride: int
    normalization: Normalization
    pretrained_ignore: Tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def inflate_stem(backbone: nn.Module, in_channels: int) -> nn.Conv2d:
    """Replace the backbone's first convolution by one taking ``in_channels`` inputs.

    The rule (for ``in_channels > 3``): the kernels of the three RGB inputs are kept as they
    are; every extra input channel gets the mean of the RGB kernels scaled by ``3 / in_channels``.
    So an input whose extra channels are 0 after normalisation (their mean value) gives
    exactly the RGB model's output, and extra channels start with the colour-blind
    ("grey") filter of the pretrained stem, scaled down so the extra inputs together do not
    outweigh the RGB ones (their total weight is ``3 (N - 3) / N`` RGB-mean kernels, under 3)
    For ``in_channels < 3`` (e.g. 1 = grey) the kernel of each channel is the RGB sum divided
    by ``in_channels``, so a grey image replicated to RGB gives the same activations.

    Args:
        backbone: a built backbone (pretrained weights already loaded).
        in_channels: the new number of input channels.

    Returns:
        The new first convolution (already in place).
    """
    parent: nn.Module = backbone
    name = ""
    for full_name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            name = full_name
            break
    if not name:
        raise ConfigError(f"{type(backbone).__name__} has no Conv2d to inflate")
    *path, leaf = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    old = getattr(parent, leaf)
    if old.in_channels == in_channels:
        return old
    with torch.no_grad():
        w = old.weight
        if in_channels > old.in_channels:
            extra = w.mean(dim=1, keepdim=True) * (old.in_channels / in_channels)
            weight = torch.cat([w, extra.expand(-1, in_channels - old.in_channels, -1, -1)], dim=1)
        else:
            weight = w.sum(dim=1, keepdim=True).expand(-1, in_channels, -1, -1) / in_channels
    # a copy keeps the conv's class (e.g. TF "SAME" padding), bias, stride and padding
    new = copy.deepcopy(old)
    new.in_channels = in_channels
    new.weight = nn.Parameter(weight.contiguous().clone())
    setattr(parent, leaf, new)
    return new


def init_conv_bn(module: nn.Module) -> None:
    """torchvision's initialisation: He-normal (fan-out, ReLU gain) convs with zero bias,
    BatchNorm scale 1 and shift 0, so an untrained network behaves like theirs."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_output_stride(output_stride: int) -> None:
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output_stride must be one of {list(OUTPUT_STRIDES)}, got {output_stride!r}")


def stride_to_dilation(
    strides: Sequence[int], *, initial_stride: int, output_stride: int
) -> List[Tuple[int, int]]:
    """Turn a list of stage strides into ``(stride, dilation)`` pairs for a target output stride.

    The DeepLab rule (TF ``stack_blocks_dense``, timm, torchvision's ``previous_dilation``): the
    stage whose stride would exceed ``output_stride`` runs with stride 1 at the *current*
    rate, and every later stage runs at the rate multiplied by the stride it gave up.

    Args:
        strides: nominal stride of each stage, in order.
        initial_stride: stride of the input to the first stage.
        output_stride: target stride of the last stage.

    Returns:
        ``(stride, dilation)`` for each stage.
    """
    check_output_stride(output_stride)
    current_stride, dilation = initial_stride, 1
    result: List[Tuple[int, int]] = []
    for stride in strides:
        if stride > 1 and current_stride * stride > output_stride:
            result.append((1, dilation))
            dilation *= stride
        else:
            result.append((stride, dilation))
            current_stride *= stride
    if current_stride != output_stride:
        raise ConfigError(
            f"output_stride {output_stride} cannot be reached; the backbone's natural stride is {current_stride}"
        )
    return result


def validate_multi_grid(multi_grid: Optional[Sequence[int]], units: int, backbone: str) -> Optional[Tuple[int, ...]]:
    if multi_grid is None:
        return None
    grid = tuple(int(m) for m in multi_grid)
    if len(grid) != units or any(m < 1 for m in grid):
        raise ConfigError(
            f"multi_grid for {backbone} needs {units} positive integers (one per unit of the last stage, "
            f"e.g. (1, 2, 4)); got {tuple(multi_grid)!r}"
        )
    return grid
