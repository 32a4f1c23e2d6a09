"""PASCAL-Context, the 59-class setting (PASCAL VOC 2010 images, full-scene labels).

Layout (VOC2010 + the Context masks converted with the Detail API, as mmsegmentation's
``tools/dataset_converters/pascal_context.py`` writes them)::

    VOCdevkit/VOC2010/
        JPEGImages/<id>.jpg
        SegmentationClassContext/<id>.png            0 = outside the 59 classes, 1-59 = the classes
        ImageSets/SegmentationContext/{train,val}.txt  4996 / 5104 ids

Value 0 becomes 255 (ignored) and ``k`` in 1-59 becomes class ``k - 1`` of
:data:`~deeplab.data.palettes.PASCAL_CONTEXT_CLASSES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .base import (
    DatasetError,
    DatasetNotFoundError,
    PathLike,
    SegmentationDataset,
    Transform,
    index_mask_array,
    read_split_list,
)
from .palettes import PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE

_HINT = ("Get VOC2010 (VOCtrainval_03-May-2010.tar) and the Context annotations (trainval_merged.json), and "
         "convert them with mmsegmentation's tools/dataset_converters/pascal_context.py.")


def find_context_root(root: PathLike) -> Path:
    """The ``VOC2010`` folder under ``root`` (``root`` itself, ``VOCdevkit/VOC2010`` or ``VOC2010``)."""
    given = Path(root).expanduser()
    candidates = [given, given / "VOCdevkit" / "VOC2010", given / "VOC2010"]
    for cand in candidates:
        if (cand / "SegmentationClassContext").is_dir():
            return cand
    tried = ", ".join(str(c / "SegmentationClassContext") for c in candidates)
    raise DatasetNotFoundError(f"no PASCAL-Context found at {given}: looked for {tried}. {_HINT}")


class PascalContext(SegmentationDataset):
    """PASCAL-Context, 59 classes, 0 -> 255.

    Args:
        root: directory containing ``VOCdevkit``, or ``VOCdevkit/VOC2010`` itself.
        split: "train" or "val" (a list in ``ImageSets/SegmentationContext/``).
        transform: ``transform(image, mask[, generator=g])``.
        seed: base seed for reproducible per-sample augmentation.
    """

    _label_hint = "PASCAL-Context (59) masks hold 0 (other) and 1-59."

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None,
                 *, seed: Optional[int] = None) -> None:
        base = find_context_root(root)
        list_file = base / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        if not list_file.is_file():
            raise DatasetNotFoundError(f"no list for PASCAL-Context split '{split}': {list_file} does not exist. {_HINT}")
        ids = read_split_list(list_file)
        if not ids:
            raise DatasetError(f"split list {list_file} is empty.")
        samples = [(base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClassContext" / f"{i}.png") for i in ids]
        missing = [p for pair in samples for p in pair if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(f"{len(missing)} files listed in {list_file} are missing, e.g. {missing[0]}. {_HINT}")
        super().__init__(base, split, samples, classes=PASCAL_CONTEXT_CLASSES, palette=PASCAL_CONTEXT_PALETTE,
                         transform=transform, seed=seed)

    def _decode_mask(self, mask: Image.Image, path: Path) -> np.ndarray:
        raw = index_mask_array(mask, path)
        if raw.size and (raw.min() < 0 or raw.max() > 59):
            bad = np.unique(raw[(raw < 0) | (raw > 59)])[:10].tolist()
            raise DatasetError(f"PASCAL-Context annotation {path} has value(s) {bad}; the 59-class masks hold 0-59. "
                               f"Convert the 459-class annotations to the 59-class setting. {_HINT}")
        raw = raw.astype(np.uint8)
        return np.where(raw == 0, np.uint8(self.ignore_index), raw - np.uint8(1))
