"""Tiny on-disk datasets in each real layout, for the data tests (20x30 images)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from deeplab.data.palettes import voc_colormap

H, W = 20, 30


def rgb_array(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_image(path: Path, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rgb_array(seed, h, w)
    Image.fromarray(arr).save(path)
    return arr


def save_mask(path: Path, arr: np.ndarray, mode: str = "P") -> None:
    """An index mask: palette PNG (VOC style) or plain grey PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8))  # mode L
    if mode == "P":
        img.putpalette([v for c in voc_colormap(256) for v in c])  # L -> P, same indices
    img.save(path)


def label_array(values: Sequence[int], h: int = H, w: int = W) -> np.ndarray:
    """Vertical stripes cycling through ``values``."""
    cols = np.array([values[(x * len(values)) // w] for x in range(w)], dtype=np.int64)
    return np.tile(cols, (h, 1))


def make_voc(root: Path, splits: Dict[str, Iterable[str]], labels: Sequence[int] = (0, 1, 15, 255),
             aug: Optional[Dict[str, Iterable[str]]] = None,
             aug_labels: Sequence[int] = (0, 7, 255), aug_list_at_root: bool = False) -> Path:
    """``root/VOCdevkit/VOC2012`` with JPEGImages, SegmentationClass, split lists.

    ``aug`` adds ``SegmentationClassAug`` masks (with ``aug_labels``, so tests can tell
    which masks were read) and its lists.
    """
    voc = root / "VOCdevkit" / "VOC2012"
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True, exist_ok=True)
    for k, (split, ids) in enumerate(splits.items()):
        ids = list(ids)
        (seg / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for j, i in enumerate(ids):
            save_image(voc / "JPEGImages" / f"{i}.jpg", seed=10 * k + j)
            save_mask(voc / "SegmentationClass" / f"{i}.png", label_array(labels))
    for split, ids in (aug or {}).items():
        ids = list(ids)
        where = root if aug_list_at_root else seg
        where.mkdir(parents=True, exist_ok=True)
        (where / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for j, i in enumerate(ids):
            if not (voc / "JPEGImages" / f"{i}.jpg").exists():
                save_image(voc / "JPEGImages" / f"{i}.jpg", seed=100 + j)
            save_mask(voc / "SegmentationClassAug" / f"{i}.png", label_array(aug_labels), mode="L")
    return root


def make_cityscapes(root: Path, split: str = "train",
                    cities: Dict[str, int] = {"aachen": 2, "bonn": 1},
                    label_ids: Sequence[int] = (0, 7, 8, 26, 33, 9)) -> Path:
    for c, (city, n) in enumerate(cities.items()):
        for k in range(n):
            stem = f"{city}_{k:06d}_000019"
            save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=c * 10 + k)
            save_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                      label_array(label_ids), mode="L")
    return root


def make_ade(root: Path, n_train: int = 2, n_val: int = 1,
             values: Sequence[int] = (0, 1, 2, 150)) -> Path:
    base = root / "ADEChallengeData2016"
    for sub, prefix, n in (("training", "train", n_train), ("validation", "val", n_val)):
        for k in range(n):
            stem = f"ADE_{prefix}_{k + 1:08d}"
            save_image(base / "images" / sub / f"{stem}.jpg", seed=k)
            save_mask(base / "annotations" / sub / f"{stem}.png", label_array(values), mode="L")
    return base


FOLDER_CLASSES = [("background", (0, 0, 0)), ("road", (128, 64, 128)), ("car", (0, 0, 142))]


def make_folder(root: Path, names: Sequence[str] = ("a", "b", "c"), colour: bool = False,
                classes_txt: Optional[str] = None, labels: Sequence[int] = (0, 1, 2, 255),
                ext: str = ".jpg") -> Path:
    """``root/images/<name><ext>``, ``root/masks/<name>.png`` and ``root/classes.txt``.

    ``colour=True`` writes RGB masks painted with ``FOLDER_CLASSES`` colours (255 is
    painted white, the ignore colour declared in classes.txt).
    """
    if classes_txt is None:
        classes_txt = "".join(f"{n} {c[0]} {c[1]} {c[2]}\n" for n, c in FOLDER_CLASSES)
        classes_txt += "__ignore__ 255 255 255\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes_txt)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[255] = (255, 255, 255)
    for i, (_, c) in enumerate(FOLDER_CLASSES):
        lut[i] = c
    for k, name in enumerate(names):
        save_image(root / "images" / f"{name}{ext}", seed=k)
        arr = label_array(labels)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        if colour:
            Image.fromarray(lut[arr]).save(root / "masks" / f"{name}.png")
        else:
            save_mask(root / "masks" / f"{name}.png", arr, mode="L")
    return root
