"""Training: the loop and the named steps it is composed of.

``loop`` (:func:`train`), ``optim`` (SGD groups, poly LR, BN freezing, AMP settings),
``resume`` (exact resume, the checkpoint payload), ``logging`` (metrics.jsonl,
TensorBoard, the progress bar), ``loader`` (seeded augmentation, the DataLoader) and
(process group, DDP, sampling: :mod:`deeplab.distributed`, shared with eval and predict).
"""

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
    "PolyLR",
    "SeededDataset",
    "TrainResult",
    "amp_settings",
    "build_optimizer",
    "build_train_loader",
    "freeze_batchnorm",
    "poly_lr",
    "set_train_mode",
    "train",
]
