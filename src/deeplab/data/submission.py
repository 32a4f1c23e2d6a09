"""Predictions in each benchmark server's format (``deeplab predict --format NAME``).

Our models predict *train ids* (0..C-1). The servers and official evaluation scripts want:

- ``cityscapes``: *label ids* (the 34-id scheme: road 7, sidewalk 8, ... bicycle 33; what the TF
  reference's ``vis.py`` writes with ``convert_to_eval_id``), one single-channel PNG per image named
  ``<city>_<seq>_<frame>*.png`` (the input's stem is kept: ``..._leftImg8bit.png``), which is the
  pattern ``cityscapesscripts``' ``evalPixelLevelSemanticLabeling`` searches, in ``OUT/results``
  (``CITYSCAPES_RESULTS=OUT/results``; the script walks its folder recursively, so the overlays
  go to the sibling ``OUT/overlays`` where no second file can match).
- ``voc``: the evaluation server's tree ``results/VOC2012/Segmentation/comp6_test_cls/<id>.png``
  (comp6: trained with data beyond VOC, e.g. SBD/COCO), palette PNGs whose indices are VOC ids.
- ``ade20k``: the SceneParsing layout: ``<name>.png`` holding 1..150 (``train id + 1``; 0 is "other").
- ``coco-stuff``: the stuffthingmaps' ids (COCO category id - 1, 0..181; the 11 ids no class uses never occur).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from PIL import Image

from .base import DatasetError
from .palettes import CITYSCAPES_ID_TO_TRAINID, COCO_STUFF_RAW_IDS, VOC_PALETTE

FORMAT_CLASSES: Dict[str, int] = {"cityscapes": 19, "voc": 21, "ade20k": 150, "coco-stuff": 171}
VOC_RESULTS = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"


def _lut(values: Dict[int, int]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    for train_id, value in values.items():
        lut[train_id] = value
    return lut


def cityscapes_trainid_to_id() -> np.ndarray:
    """Lookup table train id (0-18) -> Cityscapes label id (the first id of each train id)."""
    inverse: Dict[int, int] = {}
    for label_id, train_id in sorted(CITYSCAPES_ID_TO_TRAINID.items()):
        if 0 <= train_id < 255:
            inverse.setdefault(train_id, label_id)
    return _lut(inverse)


@dataclass(frozen=True)
class SubmissionWriter:
    """Write masks (train ids) in a server's format under ``out``.

    Args:
        format: a key of :data:`FORMAT_CLASSES`.
        out: the output folder.
        num_classes: the model's class count (checked against the format).
    """

    format: str
    out: Path
    num_classes: int

    def __post_init__(self) -> None:
        if self.format not in FORMAT_CLASSES:
            raise DatasetError(f"unknown --format {self.format!r}; choose from {sorted(FORMAT_CLASSES)} (or leave it "
                               f"out for train-id PNGs)")
        want = FORMAT_CLASSES[self.format]
        if self.num_classes != want:
            raise DatasetError(f"--format {self.format} needs a model with {want} classes ({self.format}'s train ids); "
                               f"this model has {self.num_classes}")

    @property
    def mask_dir(self) -> Path:
        if self.format == "voc":
            return self.out / VOC_RESULTS
        return self.out / "results" if self.format == "cityscapes" else self.out

    @property
    def overlay_dir(self) -> Path:
        """Overlays never sit in the masks' folder tree (the official scripts would count them as predictions)."""
        return self.out / "overlays"

    def mask_path(self, stem: str) -> Path:
        return self.mask_dir / f"{stem}.png"

    def overlay_path(self, stem: str) -> Path:
        return self.overlay_dir / f"{stem}_overlay.png"

    def encode(self, mask: np.ndarray) -> np.ndarray:
        """Train ids ``(H, W)`` -> the server's ids (uint8)."""
        ids = np.asarray(mask).astype(np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= self.num_classes:
            raise DatasetError(f"a prediction holds ids outside 0..{self.num_classes - 1}")
        if self.format == "cityscapes":
            return cityscapes_trainid_to_id()[ids]
        if self.format == "ade20k":
            return (ids + 1).astype(np.uint8)
        if self.format == "coco-stuff":
            return np.asarray(COCO_STUFF_RAW_IDS, dtype=np.uint8)[ids]
        return ids.astype(np.uint8)

    def write(self, mask: np.ndarray, stem: str, overlay: Optional[Image.Image] = None) -> Path:
        """Write one prediction (and its overlay, in :attr:`overlay_dir`); return the mask's path."""
        path = self.mask_path(stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(self.encode(mask), mode="L")
        if self.format == "voc":
            image = image.convert("P")
            flat = [c for rgb in VOC_PALETTE for c in rgb]
            image.putpalette(flat + [0] * (768 - len(flat)))
        tmp = path.with_name(path.stem + ".partial.png")
        image.save(tmp)
        tmp.replace(path)
        if overlay is not None:
            self.overlay_dir.mkdir(parents=True, exist_ok=True)
            overlay.save(self.overlay_path(stem))
        return path
