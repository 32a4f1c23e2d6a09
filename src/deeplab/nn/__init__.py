"""Building blocks shared by backbones and heads."""

from .layers import ConvBNReLU, SeparableConv2d, resize

__all__ = ["ConvBNReLU", "SeparableConv2d", "resize"]
