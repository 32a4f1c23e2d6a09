"""Backbones: name -> builder, each ``builder(*, output_stride, multi_grid, tf_compat) -> Backbone``."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from deeplab._utils import ConfigError

from ...config import BACKBONE_NAMES
from .base import Backbone, FeatureSpec, Normalization, check_output_stride
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet50, resnet101
from .resnet_tf import ResNetTF, resnet_v1_50, resnet_v1_50_beta, resnet_v1_101, resnet_v1_101_beta
from .xception import Xception, xception41, xception65, xception71

BACKBONES: Dict[str, Callable[..., Backbone]] = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "xception41": xception41,
    "xception65": xception65,
    "xception71": xception71,
    "mobilenet_v2": mobilenet_v2,
    "resnet_v1_50": resnet_v1_50,
    "resnet_v1_101": resnet_v1_101,
    "resnet_v1_50_beta": resnet_v1_50_beta,
    "resnet_v1_101_beta": resnet_v1_101_beta,
}
# ModelConfig validates ``backbone`` against config.BACKBONE_NAMES without importing model code;
# keep the two lists one.
if tuple(BACKBONES) != BACKBONE_NAMES:  # pragma: no cover - a programming error, caught by any import
    raise AssertionError(f"BACKBONES {list(BACKBONES)} and config.BACKBONE_NAMES {list(BACKBONE_NAMES)} differ")


def build_backbone(
    name: str, *, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None, tf_compat: bool = False
) -> Backbone:
    """Build a backbone by name for an output stride of 8, 16 or 32.

    ``tf_compat=True`` builds the variant that computes what the TF reference computes with the
    same weights (MobileNetV2: TF "SAME" padding, BN eps 1e-3, [-1, 1] inputs; Xception is
    already TF's; ResNet is unchanged; the resnet_v1_* backbones are TF's layout already).
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    check_output_stride(output_stride)
    return BACKBONES[name](output_stride=output_stride, multi_grid=multi_grid, tf_compat=tf_compat)


__all__ = [
    "BACKBONES",
    "Backbone",
    "FeatureSpec",
    "MobileNetV2",
    "Normalization",
    "ResNet",
    "ResNetTF",
    "Xception",
    "build_backbone",
]
