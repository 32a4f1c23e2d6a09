"""SBD (Hariharan et al. 2011, ``benchmark.tgz``) -> VOC's ``SegmentationClassAug`` + ``train_aug.txt``.

SBD's ``dataset/cls/<id>.mat`` hold a MATLAB struct ``GTcls`` whose ``Segmentation`` field is an
``(H, W)`` array of VOC class ids 0-20 (no boundary label). The augmented training set of the
paper is ``VOC train + SBD train + SBD val - VOC val`` (10,582 ids; mmseg's ``voc_aug.py``).
Masks: VOC's own ``SegmentationClass`` PNG where VOC has one (finer, with the 255 boundary, as
mmseg's VOC-aug setting reads them), SBD's mask otherwise; all written as VOC palette PNGs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

import numpy as np
from PIL import Image

from ..base import DatasetError, read_split_list
from ..palettes import VOC_PALETTE
from .jobs import convert_into_place


def read_sbd_mask(path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``.mat`` file as an ``(H, W)`` uint8 array."""
    try:
        from scipy.io import loadmat  # type: ignore[import-untyped]
    except ImportError as exc:
        raise DatasetError(f"{path}: reading SBD's .mat masks needs scipy: pip install 'deeplab[data]'") from exc
    try:
        gtcls = loadmat(str(path))["GTcls"]
        seg = np.asarray(gtcls[0]["Segmentation"][0])
    except (KeyError, IndexError, ValueError, OSError) as exc:
        raise DatasetError(f"{path}: not an SBD cls file (no GTcls.Segmentation: {exc}); re-extract benchmark.tgz") from exc
    if seg.ndim != 2 or seg.max(initial=0) > 20:
        raise DatasetError(f"{path}: GTcls.Segmentation has shape {seg.shape} and max {seg.max(initial=0)}; "
                           f"expected an (H, W) array of VOC ids 0-20")
    return seg.astype(np.uint8)


def _palette_png(mask: np.ndarray, path: Path) -> None:
    image = Image.fromarray(mask, mode="L").convert("P")
    flat = [c for rgb in VOC_PALETTE for c in rgb]
    image.putpalette(flat + [0] * (768 - len(flat)))
    image.save(path)


def _convert_one(job: Tuple[str, str, str]) -> None:
    kind, src, dst = job
    if kind == "copy":
        shutil.copyfile(src, dst)
    else:
        _palette_png(read_sbd_mask(Path(src)), Path(dst))


def train_aug_ids(voc_train: Sequence[str], voc_val: Sequence[str], sbd_train: Sequence[str],
                  sbd_val: Sequence[str]) -> List[str]:
    """``VOC train + SBD train + SBD val - VOC val``, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def convert_sbd(voc: Path, sbd_dataset: Path, *, workers: int = 2, progress: bool = True) -> Tuple[int, Path]:
    """Write ``voc/SegmentationClassAug`` and ``voc/ImageSets/Segmentation/train_aug.txt``.

    Args:
        voc: the ``VOCdevkit/VOC2012`` folder.
        sbd_dataset: SBD's ``benchmark_RELEASE/dataset`` folder (``cls/``, ``train.txt``, ``val.txt``).

    Returns:
        (number of train_aug ids, the list file).
    """

    lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_split_list(lists / "train.txt"), read_split_list(lists / "val.txt")
    sbd_train, sbd_val = read_split_list(sbd_dataset / "train.txt"), read_split_list(sbd_dataset / "val.txt")
    ids = train_aug_ids(voc_train, voc_val, sbd_train, sbd_val)
    missing = [i for i in ids if not (voc / "JPEGImages" / f"{i}.jpg").is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} train_aug images are not in {voc / 'JPEGImages'} (e.g. {missing[0]}.jpg): "
                           f"SBD's ids are VOC2012 images - is {voc} the full VOCtrainval_11-May-2012.tar?")
    out = voc / "SegmentationClassAug"
    partial = voc / "SegmentationClassAug.partial"
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted run starts this step again
    partial.mkdir(parents=True)
    jobs: List[Tuple[str, str, str]] = []
    for i in sorted(set(ids) | set(voc_val)):
        voc_mask = voc / "SegmentationClass" / f"{i}.png"
        if voc_mask.is_file():
            jobs.append(("copy", str(voc_mask), str(partial / f"{i}.png")))
        else:
            mat = sbd_dataset / "cls" / f"{i}.mat"
            if not mat.is_file():
                raise DatasetError(f"{mat} is missing: neither VOC nor SBD has a mask for {i}; re-extract benchmark.tgz")
            jobs.append(("mat", str(mat), str(partial / f"{i}.png")))
    convert_into_place(_convert_one, jobs, partial, out, desc="SBD .mat -> SegmentationClassAug", workers=workers, progress=progress,
                       chunksize=32)
    list_file = lists / "train_aug.txt"
    write_list(list_file, ids)
    return len(ids), list_file


def write_list(path: Path, ids: Iterable[str]) -> None:
    """One id a line, written atomically."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    os.replace(tmp, path)
