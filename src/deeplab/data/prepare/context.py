"""PASCAL-Context ``trainval_merged.json`` -> the 59-class masks (the Detail API's semantics).

The JSON (PASCAL in Detail) lists ``images`` (``image_id`` 2008000002 for ``2008_000002``,
``file_name``, ``height``, ``width``, ``phase`` train/val) and ``annos_segmentation`` (``image_id``,
``category_id``, ``segmentation``: a COCO run-length encoding). ``Detail.getMask(img)`` paints
each of the image's annotations, in file order, with its ``category_id`` over a zero mask; the
59-class setting then maps the 59 categories below (plus 0) to 1-59 in sorted-id order and every
other id to 0 (mmseg's ``tools/dataset_converters/pascal_context.py``). Our loader reads 0 as
ignore and ``k`` as class ``k - 1``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from ..base import DatasetError
from .jobs import convert_into_place
from .sbd import write_list

# Detail category ids of the 59 classes, with 0 (background) first (mmseg's _mapping).
CONTEXT59_IDS: Tuple[int, ...] = (
    0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454, 295,
    296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347,
    220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115,
)


def context_lut() -> np.ndarray:
    """Lookup table Detail category id -> 0-59 (sorted-id order of :data:`CONTEXT59_IDS`, others 0)."""
    lut = np.zeros(max(CONTEXT59_IDS) + 1, dtype=np.uint8)
    for index, cat in enumerate(sorted(CONTEXT59_IDS)):
        lut[cat] = index
    return lut


def rle_counts(counts: Any) -> List[int]:
    """Run lengths of a COCO RLE: a list of ints, or the compressed string of ``maskApi.c``."""
    if isinstance(counts, list):
        return [int(c) for c in counts]
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: List[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def decode_rle(rle: Dict[str, Any]) -> np.ndarray:
    """A COCO RLE ``{"size": [h, w], "counts": ...}`` -> ``(h, w)`` bool mask (column-major runs)."""
    h, w = (int(v) for v in rle["size"])
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for run in rle_counts(rle["counts"]):
        if value:
            flat[pos:pos + run] = True
        pos += run
        value = not value
    if pos != h * w:
        raise DatasetError(f"an RLE of size {h}x{w} covers {pos} pixels, not {h * w}")
    return flat.reshape((w, h)).T


def context_mask(image: Dict[str, Any], annotations: Sequence[Dict[str, Any]]) -> np.ndarray:
    """The 59-class mask (0-59) of one image: ``Detail.getMask`` then the 59-class lookup."""
    mask = np.zeros((int(image["height"]), int(image["width"])), dtype=np.int64)
    for ann in annotations:
        mask[decode_rle(ann["segmentation"])] = int(ann["category_id"])
    lut = context_lut()
    inside = mask < len(lut)
    return np.where(inside, lut[np.minimum(mask, len(lut) - 1)], 0).astype(np.uint8)


def _write_one(job: Tuple[Dict[str, Any], List[Dict[str, Any]], str]) -> None:
    image, anns, dst = job
    Image.fromarray(context_mask(image, anns), mode="L").save(dst)


def image_name(image: Dict[str, Any]) -> str:
    return Path(str(image["file_name"])).stem


def convert_context(json_path: Path, voc2010: Path, *, workers: int = 2, progress: bool = True) -> Dict[str, int]:
    """Write ``voc2010/SegmentationClassContext/*.png`` and ``ImageSets/SegmentationContext/{train,val}.txt``.

    Returns:
        ``{"train": n, "val": m}``.
    """

    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
        images, annotations = data["images"], data["annos_segmentation"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{json_path}: not the PASCAL-Context trainval_merged.json ({exc}); download it again") from exc
    per_image: Dict[int, List[Dict[str, Any]]] = {}
    for ann in annotations:
        per_image.setdefault(int(ann["image_id"]), []).append(ann)
    out = voc2010 / "SegmentationClassContext"
    partial = voc2010 / "SegmentationClassContext.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    splits: Dict[str, List[str]] = {"train": [], "val": []}
    jobs = []
    for image in images:
        phase = str(image.get("phase", ""))
        if phase not in splits:
            continue
        name = image_name(image)
        splits[phase].append(name)
        jobs.append((image, per_image.get(int(image["image_id"]), []), str(partial / f"{name}.png")))
    convert_into_place(_write_one, jobs, partial, out, desc="Context json -> 59-class masks", workers=workers, progress=progress,
                       chunksize=16)
    lists = voc2010 / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        write_list(lists / f"{split}.txt", sorted(names))
    return {k: len(v) for k, v in splits.items()}
