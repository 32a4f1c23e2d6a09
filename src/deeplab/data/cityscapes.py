"""Cityscapes fine annotations, mapped to the 19 evaluation ("train id") classes.

Layout (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip`` extracted in one
directory)::

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

``*_labelIds.png`` hold the 34 Cityscapes label ids; they are mapped here through
``CITYSCAPES_ID_TO_TRAINID`` (the ``trainId`` column of cityscapesScripts), so no
preprocessing script is needed. All other ids become 255 (ignore).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from .base import DatasetError, DatasetNotFoundError, PathLike, SegmentationDataset, Transform, index_mask_array
from .palettes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, cityscapes_lut

_SUFFIX = "_leftImg8bit.png"
_DOWNLOAD_HINT = (
    "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from the Cityscapes "
    "site and extract both into the same directory."
)


class Cityscapes(SegmentationDataset):
    """Cityscapes semantic segmentation, 19 classes (train ids), 255 = ignore.

    Args:
        root: directory containing ``leftImg8bit/`` and ``gtFine/`` (or a ``cityscapes/``
            subdirectory that does).
        split: "train", "val" or "test" (test masks are all "unlabeled" -> 255).
        transform: ``transform(image, mask[, generator=g])``.
        annotation: "gtFine" or "gtCoarse" (then split may also be "train_extra").
        seed: base seed for reproducible per-sample augmentation.

    Items are ``(image, mask)``: a ``PIL.Image`` RGB of size ``(W, H)`` (2048x1024 for the
    real data) and an ``(H, W)`` uint8 mask of train ids in ``[0, 18]`` or 255.
    """

    _label_hint = "Cityscapes masks must be the *_labelIds.png files."

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None,
                 *, annotation: str = "gtFine", seed: Optional[int] = None) -> None:
        given = Path(root).expanduser()
        base = given
        if not (base / "leftImg8bit").is_dir() and (given / "cityscapes" / "leftImg8bit").is_dir():
            base = given / "cityscapes"
        image_dir = base / "leftImg8bit" / split
        mask_root = base / annotation / split
        if not (base / "leftImg8bit").is_dir():
            raise DatasetNotFoundError(
                f"no Cityscapes found at {given}: {given / 'leftImg8bit'} does not exist. "
                f"Pass the directory that contains leftImg8bit/ and {annotation}/. "
                f"{_DOWNLOAD_HINT}")
        if not image_dir.is_dir():
            have = sorted(p.name for p in (base / "leftImg8bit").iterdir() if p.is_dir())
            raise DatasetNotFoundError(
                f"no Cityscapes split '{split}': {image_dir} does not exist (splits found: "
                f"{have}).")
        if not mask_root.is_dir():
            raise DatasetNotFoundError(
                f"no {annotation} annotations for split '{split}': {mask_root} does not exist. "
                f"{_DOWNLOAD_HINT}")

        samples: List[Tuple[Path, Path]] = []
        for city in sorted(p for p in image_dir.iterdir() if p.is_dir()):
            for img in sorted(city.glob(f"*{_SUFFIX}")):
                stem = img.name[: -len(_SUFFIX)]
                mask = mask_root / city.name / f"{stem}_{annotation}_labelIds.png"
                if not mask.is_file():
                    raise DatasetNotFoundError(
                        f"image {img} has no mask: expected {mask}. Extract {annotation} "
                        f"for split '{split}' next to leftImg8bit.")
                samples.append((img, mask))
        if not samples:
            raise DatasetError(
                f"no *{_SUFFIX} images under {image_dir}/<city>/. The expected layout is "
                f"leftImg8bit/{split}/<city>/<city>_<seq>_<frame>{_SUFFIX}.")
        super().__init__(base, split, samples, classes=CITYSCAPES_CLASSES,
                         palette=CITYSCAPES_PALETTE, transform=transform, seed=seed)
        self.annotation = annotation
        self._lut = cityscapes_lut()

    @property
    def names(self) -> List[str]:
        """Sample names ``<city>_<seq>_<frame>`` (the file name without its suffix)."""
        return [img.name[: -len(_SUFFIX)] for img, _ in self.samples]

    def _decode_mask(self, mask: Image.Image, path: Path) -> np.ndarray:
        ids = index_mask_array(mask, path)
        if ids.dtype != np.uint8 and (ids.min() < 0 or ids.max() > 255):
            raise DatasetError(f"mask {path} has values outside 0-255; it is not a "
                               f"Cityscapes *_labelIds.png.")
        return self._lut[ids]
