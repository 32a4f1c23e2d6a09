"""Datasets, transforms and palettes. Knows nothing of models.

``build_dataset(name, root, split)`` picks a dataset class from :data:`DATASETS`; every
dataset yields ``transform(image, mask)`` (or the raw PIL image and uint8 mask) and carries
``classes``, ``palette``, ``num_classes`` and ``ignore_index`` (255).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

from .ade20k import ADE20K
from .base import DatasetError, DatasetNotFoundError, SegmentationDataset, Transform, load_image
from .camvid import CamVid
from .cityscapes import Cityscapes
from .coco_stuff import COCOStuff
from .demo_data import fetch_demo_data
from .folder import FolderSegmentation
from .palettes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    PALETTES,
    VOC_CLASSES,
    VOC_PALETTE,
    colorize,
    voc_colormap,
)
from .pascal_context import PascalContext
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    EvalTransform,
    TrainTransform,
    denormalize,
    normalize_image,
    pad_collate,
    to_uint8_image,
)
from .voc import VOCSegmentation

DATASETS: Dict[str, Type[SegmentationDataset]] = {
    "voc": VOCSegmentation,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "folder": FolderSegmentation,
    "camvid": CamVid,
    "coco_stuff": COCOStuff,
    "pascal_context": PascalContext,
}


def build_dataset(name: str, root: str, split: Optional[str] = None,
                  transform: Optional[Transform] = None, **kwargs: Any) -> SegmentationDataset:
    """Build a dataset by name.

    Args:
        name: one of :data:`DATASETS` ("voc", "cityscapes", "ade20k", "folder", "camvid",
            "coco_stuff", "pascal_context").
        root: the dataset's root directory (see each class for the layout).
        split: split name; ``None`` takes the class default ("train"; all images for
            "folder").
        transform: ``transform(image, mask[, generator=g])``.
        **kwargs: passed to the class (e.g. ``seed=``, ``classes=`` for "folder").

    Returns:
        The dataset; ``ds[i]`` is ``transform(image, mask)``.

    Raises:
        ValueError: unknown name (the message lists the choices).
        DatasetError: the files do not match the layout (the message names file and fix).
    """
    try:
        cls = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset '{name}'; choose from {sorted(DATASETS)}") from None
    if split is not None:
        kwargs["split"] = split
    return cls(root, transform=transform, **kwargs)


__all__ = [
    "ADE20K", "ADE20K_CLASSES", "ADE20K_PALETTE", "COCOStuff", "CamVid", "PascalContext", "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAINID", "CITYSCAPES_PALETTE", "Cityscapes", "DATASETS",
    "DatasetError", "DatasetNotFoundError", "EvalTransform", "FolderSegmentation",
    "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD",
    "PALETTES", "SegmentationDataset", "TrainTransform", "VOCSegmentation", "VOC_CLASSES",
    "VOC_PALETTE", "build_dataset", "colorize", "denormalize", "fetch_demo_data",
    "load_image", "normalize_image", "pad_collate", "to_uint8_image", "voc_colormap",
]
