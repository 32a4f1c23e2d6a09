"""DeepLabv3+ in PyTorch: the paper's models, recipe and evaluation.

>>> import deeplab
>>> model = deeplab.build_model(arch="deeplabv3plus", backbone="xception65", num_classes=21)
"""

from .config import ModelConfig
from .models import BACKBONES, build_model, build_model_from_config
from .segmenter import Segmenter

__version__ = "0.1.0"

__all__ = ["BACKBONES", "ModelConfig", "Segmenter", "build_model", "build_model_from_config", "__version__"]
