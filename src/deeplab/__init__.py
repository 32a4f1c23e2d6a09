"""DeepLabv3+ in PyTorch: the paper's models, recipe and evaluation.

>>> import deeplab
>>> model = deeplab.build_model(arch="deeplabv3plus", backbone="xception65", num_classes=21)
>>> model = deeplab.from_pretrained("xception65_coco_voc_trainaug")  # the paper's weights  # doctest: +SKIP
"""

from ._version import __version__
from .checkpoint import load_model
from .config import InferenceConfig, ModelConfig, RunSettings, TrainConfig, TrainRecipe
from .models import BACKBONES, build_model, build_model_from_config
from .segmenter import Segmenter
from .zoo import from_pretrained

__all__ = [
    "BACKBONES",
    "InferenceConfig",
    "ModelConfig",
    "RunSettings",
    "Segmenter",
    "TrainConfig",
    "TrainRecipe",
    "build_model",
    "build_model_from_config",
    "from_pretrained",
    "load_model",
    "__version__",
]
