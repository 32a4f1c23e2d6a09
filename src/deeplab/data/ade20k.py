"""ADE20K SceneParsing (the MIT Scene Parsing benchmark, SceneParse150).

Layout (``ADEChallengeData2016.zip`` extracted)::

    ADEChallengeData2016/
        images/{training,validation}/ADE_{train,val}_<n>.jpg
        annotations/{training,validation}/ADE_{train,val}_<n>.png   values 0..150

Annotation value 0 means "other/unlabelled" and is ignored (255); value ``k`` in 1..150 is
class ``k - 1`` of :data:`~deeplab.data.palettes.ADE20K_CLASSES`.
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
from .palettes import ADE20K_CLASSES, ADE20K_PALETTE

SPLIT_DIRS: Dict[str, str] = {"train": "training", "val": "validation",
                              "training": "training", "validation": "validation"}
_DOWNLOAD_HINT = ("Download ADEChallengeData2016.zip from the MIT Scene Parsing benchmark "
                  "and extract it there.")


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing, 150 classes, 255 = ignore (annotation 0).

    Args:
        root: ``ADEChallengeData2016`` itself, or the directory that contains it.
        split: "train" or "val" (also "training" / "validation").
        transform: ``transform(image, mask[, generator=g])``.
        seed: base seed for reproducible per-sample augmentation.

    Items are ``(image, mask)``: a ``PIL.Image`` RGB and an ``(H, W)`` uint8 mask in
    ``[0, 149]`` or 255, before ``transform``.
    """

    _label_hint = ""

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None,
                 *, seed: Optional[int] = None) -> None:
        if split not in SPLIT_DIRS:
            raise ValueError(f"unknown ADE20K split '{split}'; choose from {sorted(SPLIT_DIRS)}")
        given = Path(root).expanduser()
        base = next((c for c in (given, given / "ADEChallengeData2016")
                     if (c / "images").is_dir()), None)
        if base is None:
            raise DatasetNotFoundError(
                f"no ADE20K found at {given}: neither {given / 'images'} nor "
                f"{given / 'ADEChallengeData2016' / 'images'} exists. {_DOWNLOAD_HINT}")
        mask_dir, images = split_images(base, SPLIT_DIRS[split], name="ADE20K", hint=_DOWNLOAD_HINT)
        samples = []
        for img in images:
            mask = mask_dir / f"{img.stem}.png"
            if not mask.is_file():
                raise DatasetNotFoundError(
                    f"image {img} has no annotation: expected {mask}. Re-extract "
                    f"ADEChallengeData2016.zip or remove the image.")
            samples.append((img, mask))
        super().__init__(base, split, samples, classes=ADE20K_CLASSES, palette=ADE20K_PALETTE,
                         transform=transform, seed=seed)

    def _decode_mask(self, mask: Image.Image, path: Path) -> np.ndarray:
        raw = index_mask_array(mask, path)
        if raw.min() < 0 or raw.max() > 150:
            bad = np.unique(raw[(raw < 0) | (raw > 150)])[:10].tolist()
            raise DatasetError(
                f"ADE20K annotation {path} has value(s) {bad}; SceneParsing annotations hold "
                f"0 (unlabelled) and 1-150. This is not an ADEChallengeData2016 annotation "
                f"(the full ADE20K index uses other encodings).")
        raw = raw.astype(np.uint8)
        return np.where(raw == 0, np.uint8(self.ignore_index), raw - np.uint8(1))
