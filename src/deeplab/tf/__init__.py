"""The TF reference's checkpoints: a TensorFlow-free tensor-bundle reader, name maps, converter.

>>> from deeplab.tf import convert_checkpoint
>>> conv = convert_checkpoint("deeplabv3_pascal_train_aug_2018_01_04.tar.gz",
...                           reference_config="xception65_voc")  # doctest: +SKIP
>>> conv.module  # a tf_compat DeepLabv3+ / Xception-65 with the paper's weights  # doctest: +SKIP
"""

from .bundle import BundleError, CheckpointReader, crc32c
from .convert import (
    Conversion,
    ConversionError,
    ConversionWarning,
    DictSource,
    Recognised,
    convert_checkpoint,
    convert_source,
    open_checkpoint,
    recognise,
)
from .settings import REFERENCE_CONFIGS, ReferenceConfig, ReferenceSettings, SettingsError

__all__ = [
    "BundleError",
    "CheckpointReader",
    "Conversion",
    "ConversionError",
    "ConversionWarning",
    "REFERENCE_CONFIGS",
    "ReferenceConfig",
    "ReferenceSettings",
    "SettingsError",
    "DictSource",
    "Recognised",
    "convert_checkpoint",
    "convert_source",
    "crc32c",
    "open_checkpoint",
    "recognise",
]
