"""Frozen configuration dataclasses.

Only ``cli/`` turns argv or YAML into these; the rest of the package takes them (or plain
keyword arguments) as objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

ARCHS = ("deeplabv3plus", "deeplabv3")
OUTPUT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored verbatim in every checkpoint.

    Attributes:
        arch: ``"deeplabv3plus"`` (encoder + decoder) or ``"deeplabv3"`` (encoder only).
        backbone: one of ``deeplab.models.backbones.BACKBONES``.
        num_classes: number of output channels of the classifier.
        output_stride: 8, 16 or 32; decided when the backbone is built.
        separable: atrous separable 3x3 convs in ASPP and decoder (the paper's best) or
            regular 3x3 convs (ablation).
        aspp_rates: atrous rates of ASPP's 3x3 branches; ``None`` derives them from the
            output stride (16 -> (6, 12, 18), 8 -> (12, 24, 36), 32 -> (3, 6, 9)); ``()``
            keeps only the 1x1 branch and image pooling (the released MobileNetV2 head).
        multi_grid: per-unit rate multipliers for the last backbone stage (ResNet only),
            e.g. ``(1, 2, 4)``.
        image_pooling: keep ASPP's image-level branch.
        aspp_channels: channels of every ASPP branch and its projection.
        low_level_channels: channels of the decoder's low-level projection (paper: 48).
        decoder_channels: channels of the decoder's two 3x3 convs.
        dropout: dropout after the ASPP projection in training (TF reference: 0.1).
        tf_compat: reproduce TensorFlow-reference behaviour that changes outputs
            (align_corners resizes); set by the TF checkpoint converter.
    """

    arch: str = "deeplabv3plus"
    backbone: str = "xception65"
    num_classes: int = 21
    output_stride: int = 16
    separable: bool = True
    aspp_rates: Optional[Tuple[int, ...]] = None
    multi_grid: Optional[Tuple[int, ...]] = None
    image_pooling: bool = True
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    dropout: float = 0.1
    tf_compat: bool = False

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (tuples as lists) that ``torch.load(weights_only=True)`` accepts."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error that lists them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        kwargs = dict(data)
        for key in ("aspp_rates", "multi_grid"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return cls(**kwargs)
