"""Training: the entry point, the loop and the named steps it is composed of.

:func:`run` (``entry``) composes data (a :class:`DataSpec`), model (a ``ModelConfig``) and
recipe (a ``TrainConfig``) and trains: ``deeplab train`` and ``deeplab demo`` both call it.
``loop`` (:func:`train`), ``optim`` (SGD groups, poly LR, BN freezing, AMP settings),
``resume`` (exact resume, the checkpoint payload), ``logging`` (metrics.jsonl,
TensorBoard, the progress bar), ``loader`` (seeded augmentation, the DataLoader) and
(process group, DDP, sampling: :mod:`deeplab.distributed`, shared with eval and predict).
"""

from deeplab.train.entry import DataSpec, run
from deeplab.train.loader import SeededDataset, build_train_loader
from deeplab.train.loop import TrainResult, train
from deeplab.train.optim import (
    AmpSettings,
    PolyLR,
    amp_settings,
    build_optimizer,
    freeze_batchnorm,
    poly_lr,
    set_train_mode,
)

__all__ = [
    "AmpSettings",
    "DataSpec",
    "PolyLR",
    "SeededDataset",
    "TrainResult",
    "amp_settings",
    "build_optimizer",
    "build_train_loader",
    "freeze_batchnorm",
    "poly_lr",
    "run",
    "set_train_mode",
    "train",
]
