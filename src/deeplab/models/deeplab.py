"""DeepLabv3 and DeepLabv3+ assembled from a backbone, ASPP and (for v3+) the decoder."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from deeplab._utils import ConfigError

from ..config import ARCHS, ModelConfig
from ..nn.layers import ConvBNReLU, conv3x3_bn_relu, resize
from .aspp import ASPP, default_aspp_rates
from .backbones import Backbone, Normalization, build_backbone
from .backbones.base import inflate_stem, init_conv_bn


class Decoder(nn.Module):
    """The DeepLabv3+ decoder (paper Sec. 3.1).

    Upsample the encoder output to the low-level feature's size (x4 at OS 16), project the
    low-level feature to ``low_level_channels`` (48) with 1x1 conv + BN + ReLU, concatenate,
    apply two 3x3 convs of ``channels`` (256).

    Shapes: ``encoder (B, in_channels, H/OS, W/OS)``, ``low_level (B, low_in, H/4, W/4)`` ->
    ``(B, channels, H/4, W/4)``.
    """

    def __init__(
        self,
        in_channels: int,
        low_level_in_channels: int,
        *,
        low_level_channels: int = 48,
        channels: int = 256,
        separable: bool = True,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.low_level = ConvBNReLU(low_level_in_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(
            conv3x3_bn_relu(in_channels + low_level_channels, channels, separable=separable),
            conv3x3_bn_relu(channels, channels, separable=separable),
        )
        self.out_channels = channels
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low = self.low_level(low_level)
        x = resize(x, low.shape[-2:], align_corners=self.align_corners)
        return self.fuse(torch.cat([x, low], dim=1))


class DeepLabV3(nn.Module):
    """DeepLabv3: backbone -> ASPP -> 1x1 classifier -> bilinear upsample to the input size.

    ``forward(images (B, 3, H, W) float, normalised) -> logits (B, num_classes, H, W)``; any H, W.
    The loss lives outside the model.

    Args:
        backbone: a built :class:`~deeplab.models.backbones.Backbone`.
        num_classes: classifier outputs.
        aspp_rates: rates of ASPP's 3x3 branches (``()`` for 1x1 + image pooling only).
        separable: atrous separable or regular 3x3 convs in the head.
        image_pooling: ASPP image-level branch.
        aspp_channels: ASPP width.
        dropout: dropout after the ASPP projection.
        align_corners: bilinear resizes with ``align_corners=True`` (TF compatibility).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        aspp_rates: Sequence[int] = (6, 12, 18),
        separable: bool = True,
        image_pooling: bool = True,
        aspp_channels: int = 256,
        dropout: float = 0.1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.output_stride = backbone.output_stride
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.aspp = ASPP(
            backbone.feature_specs["out"].channels,
            out_channels=aspp_channels,
            rates=aspp_rates,
            separable=separable,
            image_pooling=image_pooling,
            dropout=dropout,
        )
        self.classifier = nn.Conv2d(self._head_channels(), num_classes, 1)
        self.config: Optional[ModelConfig] = None
        self.normalization: Normalization = backbone.normalization
        self.in_channels = 3
        # Inference on the CPU computes in channels-last (NHWC) memory: oneDNN's NHWC convolutions
        # run R101 at 513x513 ~6% faster than NCHW (benchmarks/smp_compare.py); the same ops, float
        # rounding apart (~3e-6 of the logits). Off for export (deploy.export.prepare_for_export) and
        # in training.
        self.channels_last_inference = True

    def _head_channels(self) -> int:
        return self.aspp.out_channels

    def _init_head(self) -> None:
        for name, child in self.named_children():
            if name != "backbone":
                init_conv_bn(child)

    def check_input(self, x: torch.Tensor) -> None:
        channels = getattr(self, "in_channels", 3)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"expected a float image batch of shape (B, {channels}, H, W), got {shape}; "
                "add a batch dimension with x[None]"
                + (" and convert grey images to RGB" if channels == 3 else
                   f" (this model was built with in_channels={channels})")
            )
        if not x.is_floating_point():
            raise ConfigError(
                f"expected a float tensor, got {x.dtype}; normalise pixels first "
                "(x / 255 - mean) / std with the backbone's normalisation"
            )

    def _decode(self, features: Dict[str, torch.Tensor], encoded: torch.Tensor) -> torch.Tensor:
        return encoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        size = x.shape[-2:]
        nhwc = (getattr(self, "channels_last_inference", False) and not self.training and x.device.type == "cpu"
                and not torch.compiler.is_compiling() and not x.is_contiguous(memory_format=torch.channels_last))
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        encoded = self.aspp(features["out"])
        logits = resize(self.classifier(self._decode(features, encoded)), size, align_corners=self.align_corners)
        return logits.contiguous() if nhwc else logits  # the caller's layout back


class DeepLabV3Plus(DeepLabV3):
    """DeepLabv3+: DeepLabv3's encoder + the decoder on the stride-4 low-level feature.

    ``forward(images (B, 3, H, W)) -> logits (B, num_classes, H, W)``.

    Args:
        backbone: a built backbone; its ``feature_specs`` give the channel counts.
        num_classes: classifier outputs.
        low_level_channels: decoder projection width (paper: 48).
        decoder_channels: width of the decoder's two 3x3 convs (paper: 256).
        **kwargs: as :class:`DeepLabV3`.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        separable: bool = True,
        align_corners: bool = False,
        **kwargs: Any,
    ) -> None:
        self._decoder_channels = decoder_channels
        super().__init__(backbone, num_classes=num_classes, separable=separable, align_corners=align_corners, **kwargs)
        self.decoder = Decoder(
            self.aspp.out_channels,
            backbone.feature_specs["low_level"].channels,
            low_level_channels=low_level_channels,
            channels=decoder_channels,
            separable=separable,
            align_corners=align_corners,
        )

    def _head_channels(self) -> int:
        return self._decoder_channels

    def _decode(self, features: Dict[str, torch.Tensor], encoded: torch.Tensor) -> torch.Tensor:
        return self.decoder(encoded, features["low_level"])


MODELS = {"deeplabv3": DeepLabV3, "deeplabv3plus": DeepLabV3Plus}
# ModelConfig validates ``arch`` against config.ARCHS without importing this module; keep them one list.
if set(MODELS) != set(ARCHS):  # pragma: no cover - a programming error, caught by any import
    raise AssertionError(f"MODELS {sorted(MODELS)} and config.ARCHS {sorted(ARCHS)} differ; update both")


def build_model(
    *,
    arch: str = "deeplabv3plus",
    backbone: str = "xception65",
    num_classes: int = 21,
    output_stride: int = 16,
    separable: bool = True,
    pretrained_backbone: Union[str, "os.PathLike[str]", None] = None,
    aspp_rates: Optional[Sequence[int]] = None,
    multi_grid: Optional[Sequence[int]] = None,
    image_pooling: bool = True,
    aspp_channels: int = 256,
    low_level_channels: int = 48,
    decoder_channels: int = 256,
    dropout: float = 0.1,
    tf_compat: bool = False,
    in_channels: int = 3,
    input_mean: Optional[Sequence[float]] = None,
    input_std: Optional[Sequence[float]] = None,
) -> DeepLabV3:
    """Build DeepLabv3 or DeepLabv3+ from keywords: ``build_model_from_config(ModelConfig(**kw))``.

    Args:
        arch: ``"deeplabv3plus"`` or ``"deeplabv3"``.
        backbone: one of ``BACKBONES`` (resnet50, resnet101, xception41/65/71, mobilenet_v2).
        num_classes: number of classes (e.g. 21 for PASCAL VOC).
        output_stride: 8, 16 or 32.
        separable: atrous separable convs in ASPP and decoder (paper's best), else regular 3x3.
        pretrained_backbone: ``None`` (random init), ``"imagenet"`` (the public file for this
            backbone from the torch hub cache, see :mod:`deeplab.weights`) or a file path.
        aspp_rates: ASPP 3x3 rates; ``None`` derives them from ``output_stride``.
        multi_grid: rate multipliers for the last backbone stage, e.g. ``(1, 2, 4)``.
        image_pooling, aspp_channels, low_level_channels, decoder_channels, dropout, tf_compat, in_channels, input_mean, input_std: see :class:`deeplab.config.ModelConfig`.

    Returns:
        The model; ``model(images (B, 3, H, W)) -> logits (B, num_classes, H, W)``. It carries
        ``model.config`` (a :class:`ModelConfig`) and ``model.normalization``.

    Raises:
        ConfigError: (a ``ValueError``) unknown arch/backbone, bad output stride, class count,
            channels, rates or dropout.
        ValueError: a multi_grid of the wrong length for the backbone.
    """
    config = ModelConfig(
        arch=arch,
        backbone=backbone,
        num_classes=num_classes,
        output_stride=output_stride,
        separable=separable,
        aspp_rates=None if aspp_rates is None else tuple(aspp_rates),
        multi_grid=None if multi_grid is None else tuple(multi_grid),
        image_pooling=image_pooling,
        aspp_channels=aspp_channels,
        low_level_channels=low_level_channels,
        decoder_channels=decoder_channels,
        dropout=dropout,
        tf_compat=tf_compat,
        in_channels=in_channels,
        input_mean=None if input_mean is None else tuple(input_mean),
        input_std=None if input_std is None else tuple(input_std),
    )
    return build_model_from_config(config, pretrained_backbone=pretrained_backbone)


def build_model_from_config(
    config: ModelConfig,
    *,
    pretrained_backbone: Union[str, "os.PathLike[str]", None] = None,
    **overrides: Any,
) -> DeepLabV3:
    """The one place a :class:`ModelConfig` becomes a model.

    Args:
        config: a validated model config (its ``__post_init__`` has checked every field).
        pretrained_backbone: ``None`` (random init), ``"imagenet"`` or a backbone weight file;
            see :func:`build_model`.
        **overrides: config fields to replace first (``dataclasses.replace``, so validated
            too), e.g. ``output_stride=8`` to evaluate an OS-16 model at OS 8.

    Returns:
        The model (head initialised, backbone random or pretrained), with ``model.config``
        and ``model.normalization``.
    """
    if overrides:
        config = dataclasses.replace(config, **overrides)
    body = build_backbone(
        config.backbone, output_stride=config.output_stride, multi_grid=config.multi_grid, tf_compat=config.tf_compat
    )
    rates = default_aspp_rates(config.output_stride) if config.aspp_rates is None else config.aspp_rates
    kwargs: Dict[str, Any] = dict(
        num_classes=config.num_classes,
        aspp_rates=rates,
        separable=config.separable,
        image_pooling=config.image_pooling,
        aspp_channels=config.aspp_channels,
        dropout=config.dropout,
        align_corners=config.tf_compat,
    )
    if config.arch == "deeplabv3plus":
        kwargs.update(low_level_channels=config.low_level_channels, decoder_channels=config.decoder_channels)
    model = MODELS[config.arch](body, **kwargs)
    model._init_head()
    model.config = config
    if pretrained_backbone is not None:
        # Lazy: weights.py (file fetching, hashing) is only needed for pretrained builds.
        from ..weights import load_backbone_weights

        load_backbone_weights(body, config.backbone, pretrained_backbone)
    if config.in_channels != 3:
        # after the (3-channel) ImageNet weights are in, so they are what gets inflated
        inflate_stem(body, config.in_channels)
    model.in_channels = config.in_channels
    model.normalization = input_normalization(config, body.normalization)
    return model


def input_normalization(config: ModelConfig, rgb: Normalization) -> Normalization:
    """The normalisation of ``config``'s ``in_channels`` inputs: its own statistics, else the backbone's
    RGB ones extended with 0.5 / 0.5 for each extra channel (and cut for fewer channels)."""
    extra = max(config.in_channels - 3, 0)
    mean = config.input_mean or (tuple(rgb.mean) + (0.5,) * extra)[: config.in_channels]
    std = config.input_std or (tuple(rgb.std) + (0.5,) * extra)[: config.in_channels]
    return Normalization(tuple(mean), tuple(std))
