"""COCO-Stuff-164k (171 classes: 80 things + 91 stuff; 255 unlabeled).

Layout (``train2017.zip``, ``val2017.zip`` and ``stuffthingmaps_trainval2017.zip`` of
github.com/nightrome/cocostuff, extracted)::

    coco_stuff164k/
        images/{train2017,val2017}/<id>.jpg
        annotations/{train2017,val2017}/<id>.png     stuffthingmaps: COCO category id - 1, 255 unlabeled

The maps hold 0-181 (things 0-89, stuff 91-181); the 11 values no class uses (unused COCO
thing ids) and 255 are ignored, the other 171 map in order to 0-170
(:data:`~deeplab.data.palettes.COCO_STUFF_CLASSES`). A tree already converted to 0-170
(mmseg's ``*_labelTrainIds.png``) is read as it is when ``converted=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
from PIL import Image

from .base import (
    DatasetError,
    DatasetNotFoundError,
    PathLike,
    SegmentationDataset,
    Transform,
    index_mask_array,
    split_images,
)
from .palettes import COCO_STUFF_CLASSES, COCO_STUFF_PALETTE, COCO_STUFF_RAW_IDS, IGNORE_INDEX

SPLIT_DIRS: Dict[str, str] = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}
_DOWNLOAD_HINT = ("Download train2017/val2017 images and stuffthingmaps_trainval2017.zip (github.com/nightrome/"
                  "cocostuff) and extract them to images/ and annotations/.")


def coco_stuff_lut() -> np.ndarray:
    """256-entry lookup table: stuffthingmaps value -> class id 0-170, or 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for class_id, raw in enumerate(COCO_STUFF_RAW_IDS):
        lut[raw] = class_id
    return lut


class COCOStuff(SegmentationDataset):
    """COCO-Stuff-164k, 171 classes, 255 = unlabeled.

    Args:
        root: the folder holding ``images/`` and ``annotations/``.
        split: "train" or "val" (also "train2017" / "val2017").
        transform: ``transform(image, mask[, generator=g])``.
        converted: annotations already hold 0-170 (no remapping).
        seed: base seed for reproducible per-sample augmentation.
    """

    _label_hint = "COCO-Stuff stuffthingmaps hold COCO category id - 1 (0-181) and 255."

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None,
                 *, converted: bool = False, seed: Optional[int] = None) -> None:
        if split not in SPLIT_DIRS:
            raise ValueError(f"unknown COCO-Stuff split '{split}'; choose from {sorted(SPLIT_DIRS)}")
        given = Path(root).expanduser()
        base = next((c for c in (given, given / "coco_stuff164k") if (c / "images").is_dir()), None)
        if base is None:
            raise DatasetNotFoundError(f"no COCO-Stuff at {given}: {given / 'images'} does not exist. {_DOWNLOAD_HINT}")
        mask_dir, images = split_images(base, SPLIT_DIRS[split], name="COCO-Stuff", hint=_DOWNLOAD_HINT)
        samples = []
        for img in images:
            mask = mask_dir / f"{img.stem}.png"
            if not mask.is_file() and (mask_dir / f"{img.stem}_labelTrainIds.png").is_file():
                mask = mask_dir / f"{img.stem}_labelTrainIds.png"
            if not mask.is_file():
                raise DatasetNotFoundError(f"COCO-Stuff image {img} has no annotation: expected {mask}.")
            samples.append((img, mask))
        super().__init__(base, split, samples, classes=COCO_STUFF_CLASSES, palette=COCO_STUFF_PALETTE,
                         transform=transform, seed=seed)
        self.converted = converted
        self._lut = coco_stuff_lut()

    def _decode_mask(self, mask: Image.Image, path: Path) -> np.ndarray:
        raw = index_mask_array(mask, path)
        if self.converted or path.name.endswith("_labelTrainIds.png"):
            return raw
        if raw.dtype != np.uint8:
            raise DatasetError(f"COCO-Stuff annotation {path} is a {mask.mode} image; stuffthingmaps are 8-bit PNGs.")
        return self._lut[raw]
