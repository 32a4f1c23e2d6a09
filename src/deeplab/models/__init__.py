"""DeepLab models: backbones, ASPP, decoder and the builder."""

from .aspp import ASPP, default_aspp_rates
from .backbones import BACKBONES, build_backbone
from .deeplab import MODELS, Decoder, DeepLabV3, DeepLabV3Plus, build_model, build_model_from_config

__all__ = [
    "ASPP",
    "BACKBONES",
    "MODELS",
    "Decoder",
    "DeepLabV3",
    "DeepLabV3Plus",
    "build_backbone",
    "build_model",
    "build_model_from_config",
    "default_aspp_rates",
]
