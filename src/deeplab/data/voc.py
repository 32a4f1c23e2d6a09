"""PASCAL VOC 2012 segmentation, with the SBD-augmented ``train_aug`` set.

Layout (as extracted from ``VOCtrainval_11-May-2012.tar``)::

    VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png            palette PNG, index = class id, 255 = boundary
        ImageSets/Segmentation/{train,val,trainval}.txt
        SegmentationClassAug/<id>.png         (augmented set, added by the user)
        ImageSets/Segmentation/train_aug.txt  (or train_aug.txt next to VOCdevkit/VOC2012)

The paper trains on ``train_aug`` (10,582 images: VOC train + SBD, minus VOC val) and
evaluates on ``val`` (1,449 images).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from .base import (
    DatasetError,
    DatasetNotFoundError,
    PathLike,
    SegmentationDataset,
    Transform,
    colour_mask_to_ids,
    index_mask_array,
    read_split_list,
)
from .palettes import VOC_CLASSES, VOC_IGNORE_COLOR, VOC_PALETTE

_DOWNLOAD_HINT = (
    "Download VOCtrainval_11-May-2012.tar from the PASCAL VOC 2012 site and extract it "
    "there (it creates VOCdevkit/VOC2012), or run: deeplab data fetch voc2012 --root DIR."
)
_AUG_HINT = (
    "The augmented set is not part of VOC2012: get SegmentationClassAug (the SBD masks "
    "converted to VOC index PNGs, as used by DeepLab) and its train_aug.txt list, unzip the "
    "masks to VOCdevkit/VOC2012/SegmentationClassAug/ and put train_aug.txt in "
    "VOCdevkit/VOC2012/ImageSets/Segmentation/ - or let `deeplab data fetch voc2012 --sbd --root DIR` "
    "download SBD and build both."
)


def find_voc_root(root: PathLike) -> Path:
    """The ``VOC2012`` directory under ``root`` (``root`` itself, or ``VOCdevkit/VOC2012``).

    Raises:
        DatasetNotFoundError: no ``JPEGImages`` directory in any of the candidates.
    """
    root = Path(root).expanduser()
    candidates = [root, root / "VOCdevkit" / "VOC2012", root / "VOC2012"]
    for cand in candidates:
        if (cand / "JPEGImages").is_dir():
            return cand
    tried = ", ".join(str(c / "JPEGImages") for c in candidates)
    raise DatasetNotFoundError(
        f"no PASCAL VOC 2012 found at {root}: looked for {tried}. Pass the directory that "
        f"contains VOCdevkit (or VOCdevkit/VOC2012 itself). {_DOWNLOAD_HINT}"
    )


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC 2012 semantic segmentation (21 classes, 255 = ignore).

    Args:
        root: directory containing ``VOCdevkit``, or ``VOCdevkit/VOC2012`` itself.
        split: name of a list ``ImageSets/Segmentation/{split}.txt`` ("train", "val",
            "trainval", "train_aug", ...). The list may also sit in the VOC2012 directory
            or in ``root``.
        transform: ``transform(image, mask[, generator=g])``; see
            :class:`~deeplab.data.base.SegmentationDataset`.
        aug_masks: read masks from ``SegmentationClassAug`` instead of
            ``SegmentationClass``; default: for split names containing "aug".
        seed: base seed for reproducible per-sample augmentation.

    Items are ``(image, mask)``: a ``PIL.Image`` RGB of size ``(W, H)`` and an ``(H, W)``
    uint8 mask in ``[0, 20]`` or 255, before ``transform``.

    Colour-coded RGB masks (VOC's palette rendered to RGB, a common conversion accident)
    are mapped back to ids through the VOC palette.
    """

    _label_hint = ("VOC masks are palette PNGs whose indices are the class ids 0-20, with "
                   "255 for the object boundary; re-export the mask as such a PNG.")

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None,
                 *, aug_masks: Optional[bool] = None, seed: Optional[int] = None) -> None:
        given = Path(root).expanduser()
        voc = find_voc_root(given)
        use_aug = ("aug" in split) if aug_masks is None else aug_masks

        candidates = [voc / "ImageSets" / "Segmentation" / f"{split}.txt", voc / f"{split}.txt"]
        # users often drop train_aug.txt next to VOCdevkit, or into VOCdevkit itself
        for extra in (given / f"{split}.txt", voc.parent / f"{split}.txt"):
            if extra not in candidates:
                candidates.append(extra)
        list_file = next((c for c in candidates if c.is_file()), None)
        if list_file is None:
            tried = ", ".join(str(c) for c in candidates)
            hint = _AUG_HINT if use_aug else (
                "VOC2012's own lists are train.txt, val.txt and trainval.txt. " + _DOWNLOAD_HINT)
            raise DatasetNotFoundError(f"no list for split '{split}': tried {tried}. {hint}")

        if use_aug:
            mask_candidates = [voc / "SegmentationClassAug", given / "SegmentationClassAug",
                               voc.parent / "SegmentationClassAug"]
            mask_dir = next((d for d in mask_candidates if d.is_dir()), None)
            if mask_dir is None:
                tried = ", ".join(str(d) for d in mask_candidates)
                raise DatasetNotFoundError(
                    f"split '{split}' uses the augmented masks, but no SegmentationClassAug "
                    f"directory was found (tried {tried}). {_AUG_HINT}")
        else:
            mask_dir = voc / "SegmentationClass"

        ids = read_split_list(list_file)
        if not ids:
            raise DatasetError(f"split list {list_file} is empty: it should hold one image id "
                               f"(e.g. 2007_000032) per line.")
        samples = [(voc / "JPEGImages" / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids]
        _check_exist(samples, list_file, use_aug)
        super().__init__(voc, split, samples, classes=VOC_CLASSES, palette=VOC_PALETTE,
                         transform=transform, seed=seed)
        self.list_file = list_file
        self.mask_dir = mask_dir

    def _decode_mask(self, mask: Image.Image, path: Path) -> np.ndarray:
        if mask.mode in ("RGB", "RGBA"):
            rgb = np.asarray(mask.convert("RGB"))
            return colour_mask_to_ids(rgb, self.palette, path, ignore_colors=[VOC_IGNORE_COLOR],
                                      ignore_index=self.ignore_index, classes=self.classes)
        return index_mask_array(mask, path)


def _check_exist(samples: List[Tuple[Path, Path]], list_file: Path, use_aug: bool) -> None:
    """One error for all missing files of a split (a bad download shows as many)."""
    missing_img = [img for img, _ in samples if not img.is_file()]
    missing_mask = [m for _, m in samples if not m.is_file()]
    if missing_img:
        raise DatasetNotFoundError(
            f"{len(missing_img)} of {len(samples)} images listed in {list_file} are missing, "
            f"e.g. {missing_img[0]}. Re-extract VOC2012, or check that the list belongs to "
            f"this dataset.")
    if missing_mask:
        hint = _AUG_HINT if use_aug else (
            "SegmentationClass only covers the segmentation lists of VOC2012 "
            "(train/val/trainval); for other lists use the augmented masks.")
        raise DatasetNotFoundError(
            f"{len(missing_mask)} of {len(samples)} masks for {list_file} are missing, "
            f"e.g. {missing_mask[0]}. {hint}")
