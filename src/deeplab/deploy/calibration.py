"""Calibration images: the inputs int8 calibrates on and the held-out ones its parity is measured on.

:func:`calibration_set` reads them from a folder of images or from a dataset and preprocesses them
exactly as inference sees them: normalised with the model's mean/std, at most ``max_side`` on the
longer side, padded with 0 (the mean pixel) at the bottom/right to ``OS*k+1``. A dataset source
keeps its masks, so the parity can report the true mIoU delta as well as the pseudo-label one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from deeplab._utils import DeeplabError
from deeplab.data.base import IMAGE_SUFFIXES  # the one suffix list

__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "CalibrationError",
    "CalibrationSet",
    "calibration_set",
    "prepare_image",
]

PathLike = Union[str, "os.PathLike[str]"]

# Images read by default: 32 calibrate, a fifth (8) are held out for the parity gate. A source with
# fewer gives what it has (the CLI says so).
DEFAULT_CALIBRATION_IMAGES = 40


class CalibrationError(DeeplabError, ValueError):
    """The calibration data cannot be used; the message names the source, the cause and the fix."""


@dataclass
class CalibrationSet:
    """Preprocessed images for calibration and for the parity check.

    Attributes:
        arrays: ``(1, 3, H, W)`` float32 normalised inputs, one per image (sizes may differ).
        names: the image file of each array.
        source: where they came from (a folder, or ``dataset:root``), for the metadata.
        held_out: how many of the last arrays are kept out of calibration for parity.
        sizes: per array, the ``(h, w)`` of the image inside its padding.
        masks: per array, its ``(h, w)`` class-id mask (a dataset source) or ``None``.
        requested: how many images were asked for (more than ``arrays`` when the source is small).
    """

    arrays: List[np.ndarray]
    names: List[str]
    source: str
    held_out: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)
    sizes: List[Optional[Tuple[int, int]]] = field(default_factory=list)
    masks: List[Optional[np.ndarray]] = field(default_factory=list)
    requested: Optional[int] = None

    @property
    def calibration(self) -> List[np.ndarray]:
        """The arrays used for calibration (all but the held-out ones)."""
        return self.arrays[: len(self.arrays) - self.held_out]

    @property
    def parity(self) -> List[np.ndarray]:
        """The held-out arrays (all arrays when nothing is held out: the parity is then not held-out)."""
        return self.arrays[len(self.arrays) - self.held_out:] if self.held_out else list(self.arrays)

    def _parity_slice(self, items: Sequence[Any]) -> List[Any]:
        if not items:
            return [None] * len(self.parity)
        return list(items[len(items) - self.held_out:]) if self.held_out else list(items)

    @property
    def parity_sizes(self) -> List[Optional[Tuple[int, int]]]:
        """``(h, w)`` inside the padding of each :attr:`parity` array."""
        return self._parity_slice(self.sizes)

    @property
    def parity_masks(self) -> List[Optional[np.ndarray]]:
        """The ground-truth mask of each :attr:`parity` array (``None`` where there is none)."""
        return self._parity_slice(self.masks)

    def describe(self) -> Dict[str, Any]:
        """JSON for the export metadata: source, image names, which were held out."""
        split = len(self.arrays) - self.held_out
        info = {"source": self.source, "images": len(self.arrays) - self.held_out, "names": self.names[:split],
                "held_out": self.names[split:], **self.extra}
        if self.requested is not None and self.requested > len(self.arrays):
            info["requested"] = self.requested
        return info


def prepare_image(
    rgb: np.ndarray,
    normalization: Mapping[str, Sequence[float]],
    *,
    output_stride: int = 16,
    max_side: Optional[int] = 513,
) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image as a ``(1, 3, H', W')`` float32 model input.

    Resized (bilinear, aspect kept) so the longer side is at most ``max_side``, normalised,
    padded with 0 at the bottom/right to ``OS*k+1`` in each dimension as whole-image
    inference does.
    """
    from PIL import Image

    h, w = rgb.shape[:2]
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, getattr(Image, "Resampling", Image).BILINEAR))
        h, w = rgb.shape[:2]
    mean = np.asarray(normalization["mean"], dtype=np.float32) * 255.0
    std = np.asarray(normalization["std"], dtype=np.float32) * 255.0
    x = (rgb.astype(np.float32) - mean) / std
    ph = output_stride * -(-(h - 1) // output_stride) + 1
    pw = output_stride * -(-(w - 1) // output_stride) + 1
    out = np.zeros((1, 3, ph, pw), dtype=np.float32)
    out[0, :, :h, :w] = x.transpose(2, 0, 1)
    return out


def _resized_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``mask`` at ``size`` = ``(h, w)`` (nearest), as :func:`prepare_image` resized its image."""
    from PIL import Image

    if mask.shape[:2] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), getattr(Image, "Resampling", Image).NEAREST))


def _scaled_size(h: int, w: int, max_side: Optional[int]) -> Tuple[int, int]:
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    return h, w


def _folder_images(folder: Path) -> List[Path]:
    if not folder.exists():
        raise CalibrationError(f"calibration folder {folder} does not exist; pass --calib-data DIR with images in it")
    if not folder.is_dir():
        raise CalibrationError(f"--calib-data {folder} is a file, not a folder; pass the folder that holds the images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(
            f"calibration folder {folder} has no image files ({', '.join(IMAGE_SUFFIXES)}); "
            "point --calib-data at a folder of photos like the ones the model will see"
        )
    return files


def calibration_set(
    *,
    folder: Optional[PathLike] = None,
    dataset: Optional[str] = None,
    data_root: Optional[PathLike] = None,
    split: Optional[str] = None,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    held_out: Optional[int] = None,
    normalization: Mapping[str, Sequence[float]],
    output_stride: int = 16,
    max_side: Optional[int] = 513,
) -> CalibrationSet:
    """Calibration images from a folder (``folder``) or a dataset (``dataset`` + ``data_root``).

    The first ``count`` images (sorted by name; the dataset's order) are read; the last
    ``held_out`` of them are kept out of calibration for the parity check.

    Args:
        folder: a folder of images (searched recursively).
        dataset, data_root, split: a dataset by name (``"folder"``, ``"voc"``, ...), as ``deeplab eval``.
        count: images to read in all (calibration + held out).
        held_out: of those, how many only check parity (0: parity on the calibration images);
            default a fifth of ``count`` (at least 1 when ``count >= 2``): 32 calibrate and 8 are
            held out of the default 40.
        normalization: the model's ``{"mean", "std"}``.
        output_stride: for the ``OS*k+1`` padding.
        max_side: longest side after resizing (``None``: native size).

    Raises:
        CalibrationError: neither or both sources given, no images, too few for ``held_out``,
            an unreadable image.
    """
    if (folder is None) == (dataset is None):
        raise CalibrationError("int8 needs calibration images: pass --calib-data DIR or --dataset NAME --data-root ROOT (one of them)")
    if count < 1:
        raise CalibrationError(f"--calib-images must be at least 1, got {count}")
    explicit = held_out is not None
    if held_out is None:
        held_out = max(1, count // 5) if count >= 2 else 0
    if held_out < 0 or (held_out and count <= held_out):
        raise CalibrationError(
            f"{count} calibration image(s) leave none to calibrate once {held_out} are held out for parity; "
            f"pass --calib-images {held_out + 1} or more"
        )
    from deeplab.data.base import DatasetError, load_image

    names: List[str] = []
    images: List[np.ndarray] = []
    masks: List[Optional[np.ndarray]] = []
    if folder is not None:
        source = str(folder)
        for path in _folder_images(Path(folder))[:count]:
            try:
                images.append(np.asarray(load_image(path)))
            except (DatasetError, OSError) as exc:
                raise CalibrationError(f"calibration image {path} cannot be read ({exc}); remove it from {folder}") from exc
            names.append(path.name)
            masks.append(None)
    else:
        from deeplab.data import build_dataset

        if data_root is None:
            raise CalibrationError(f"--dataset {dataset} needs --data-root ROOT (the folder that holds it)")
        source = f"{dataset}:{data_root}" + (f":{split}" if split else "")
        ds = build_dataset(str(dataset), str(data_root), split)
        if len(ds) == 0:
            raise CalibrationError(f"dataset {source} has no images; check --data-root and --split")
        for index in range(min(count, len(ds))):
            images.append(np.asarray(ds.load_image(index)))
            names.append(Path(ds.samples[index][0]).name)
            try:  # ground truth, where the dataset has it, for the true mIoU delta
                masks.append(np.asarray(ds.load_mask(index)))
            except (DatasetError, OSError, FileNotFoundError, TypeError, IndexError):
                masks.append(None)
    if not explicit and len(images) < count:  # a small folder: hold out what can be held out
        held_out = max(1, len(images) // 5) if len(images) >= 2 else 0
    if held_out and len(images) <= held_out:
        raise CalibrationError(
            f"{source} has {len(images)} image(s): too few to calibrate with {held_out} held out for parity; "
            "add images or pass held_out=0"
        )
    arrays = [prepare_image(rgb, normalization, output_stride=output_stride, max_side=max_side) for rgb in images]
    sizes: List[Optional[Tuple[int, int]]] = [_scaled_size(rgb.shape[0], rgb.shape[1], max_side) for rgb in images]
    masks = [None if m is None or m.shape[:2] != rgb.shape[:2] else _resized_mask(m, size)  # type: ignore[arg-type]
             for m, rgb, size in zip(masks, images, sizes)]
    return CalibrationSet(arrays=arrays, names=names, source=source, held_out=held_out,
                          extra={"max_side": max_side, "output_stride": output_stride},
                          sizes=sizes, masks=masks, requested=count)
