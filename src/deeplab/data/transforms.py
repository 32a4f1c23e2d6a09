"""The paper's data pipeline: random scale, pad, random crop, flip, normalise.

Every random draw comes from an explicit ``torch.Generator`` (``generator=`` argument;
torch's global RNG when ``None``), never from ``random`` or ``np.random``, so a training
run can be resumed exactly and DDP ranks augment independently but reproducibly.

Pixel statistics (``mean``, ``std``) are in [0, 1] units: the output is
``(x / 255 - mean) / std``. ImageNet statistics suit torchvision-style backbones;
``(0.5, 0.5, 0.5) / (0.5, 0.5, 0.5)`` gives the [-1, 1] inputs of the TF Xception and
MobileNet checkpoints.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .palettes import IGNORE_INDEX

# Image.Resampling exists from Pillow 9.1 on; 9.0 (our lower bound) has the same values as module constants.
_RESAMPLING = getattr(Image, "Resampling", Image)
_BILINEAR = _RESAMPLING.BILINEAR
_NEAREST = _RESAMPLING.NEAREST

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)
# TF DeepLab's Xception / MobileNetV2 preprocessing: pixels to [-1, 1]
INCEPTION_MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
INCEPTION_STD: Tuple[float, float, float] = (0.5, 0.5, 0.5)

ImageLike = Union[Image.Image, np.ndarray]
MaskLike = Union[Image.Image, np.ndarray]


def _size2(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    return (h, w)


def _as_pil_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image array must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    return Image.fromarray(arr)


def _as_mask_array(mask: MaskLike) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("mask values must be class ids in 0..255 (255 = ignore)")
        arr = arr.astype(np.uint8)
    return arr


def is_multichannel(image: object) -> bool:
    """Whether ``image`` is an ``(H, W, C)`` array that is not plain 8-bit RGB (N channels,
    16-bit or float): such inputs take the N-channel path of the transforms."""
    if isinstance(image, Image.Image):
        return False
    arr = np.asarray(image)
    return arr.ndim == 3 and (arr.shape[2] != 3 or arr.dtype != np.uint8)


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """An ``(H, W, C)`` array in [0, 1] pixel units, float32: uint8 / 255, uint16 / 65535,
    floats as they are (already in the units ``mean``/``std`` are given in)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise ValueError(f"image arrays must be uint8, uint16 or float, got {arr.dtype}")


def _resize_channels(arr: np.ndarray, size: Tuple[int, int], box: Tuple[float, float, float, float]) -> np.ndarray:
    """Bilinear resize of every channel of a float ``(H, W, C)`` array (PIL mode F, same grid as RGB)."""
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c])).resize(size, _BILINEAR, box=box))
              for c in range(arr.shape[2])]
    return np.stack(planes, axis=-1)


def _normalize_float(arr: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(H, W, C)`` float [0, 1] -> ``(C, H, W)`` float32 ``(x - mean) / std``."""
    if mean.numel() != arr.shape[2]:
        raise ValueError(f"image has {arr.shape[2]} channels but the normalisation has {mean.numel()} "
                         f"means/stds; set ModelConfig in_channels / input_mean / input_std to match")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)
    return (x - mean) / std


def _normalize(rgb: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 ``(x / 255 - mean) / std``."""
    # PIL-backed arrays are read-only; torch wants a writable buffer
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(mean).div_(std)


def scale_choices(scale_range: Tuple[float, float], scale_step: float) -> List[float]:
    """The discrete scales ``lo, lo + step, ..., hi`` (the TF reference's ``scale_factor_step``).

    Args:
        scale_range: ``(lo, hi)``.
        scale_step: step > 0.

    Returns:
        The scales, ``hi`` included when it lies on the grid.
    """
    lo, hi = float(scale_range[0]), float(scale_range[1])
    n = int(round((hi - lo) / scale_step))
    # computed from integers so 0.5 + 6 * 0.25 is exactly 2.0, not 1.9999999
    return [round(lo + k * scale_step, 10) for k in range(n + 1) if lo + k * scale_step <= hi + 1e-9]


class TrainTransform:
    """Training augmentation of the paper (DeepLab TF ``input_preprocess``).

    Random scale (discrete steps by default) -> pad to the crop with the mean pixel (image)
    and ``ignore_index`` (mask) at the bottom/right -> random crop -> random left-right
    flip -> normalised tensors. The image is resized bilinearly, the mask with nearest
    neighbour, so mask values are never interpolated.

    Args:
        crop_size: output ``(H, W)`` or one int for a square crop (paper: 513).
        scale_range: ``(min, max)`` random scale factor (paper: 0.5-2.0).
        scale_step: step of the discrete scales (paper/TF: 0.25); 0 for a continuous
            uniform scale.
        mean: per-channel mean in [0, 1] pixel units.
        std: per-channel std in [0, 1] pixel units.
        flip: random left-right flip with probability 0.5.
        ignore_index: mask value of padded pixels.

    Call: ``transform(image, mask, generator=None) -> (image, mask)`` with ``image`` a PIL
    RGB image or ``(H, W, 3)`` uint8 array and ``mask`` an ``(H, W)`` array of class ids;
    returns ``image`` float32 ``(3, crop_h, crop_w)`` and ``mask`` int64
    ``(crop_h, crop_w)``. Padded image pixels are exactly 0 (the mean pixel, normalised).
    """

    def __init__(self, crop_size: Union[int, Sequence[int]] = 513,
                 scale_range: Tuple[float, float] = (0.5, 2.0), scale_step: float = 0.25,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 flip: bool = True, ignore_index: int = IGNORE_INDEX) -> None:
        self.crop_size = _size2(crop_size)
        if min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
        if scale_step < 0:
            raise ValueError(f"scale_step must be >= 0, got {scale_step}")
        self.scale_range = (lo, hi)
        self.scale_step = float(scale_step)
        self.scales: Optional[List[float]] = (
            scale_choices(self.scale_range, self.scale_step) if scale_step > 0 else None)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)
        self.flip = flip
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"scale_step={self.scale_step}, mean={self.mean}, std={self.std}, "
                f"flip={self.flip}, ignore_index={self.ignore_index})")

    def sample_scale(self, generator: Optional[torch.Generator] = None) -> float:
        """One random scale factor (from :attr:`scales` when discrete)."""
        if self.scales is not None:
            return self.scales[int(torch.randint(len(self.scales), (1,), generator=generator))]
        lo, hi = self.scale_range
        return lo + (hi - lo) * float(torch.rand(1, generator=generator))

    def __call__(self, image: ImageLike, mask: MaskLike,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        multi = is_multichannel(image)
        arr = to_unit_float(np.asarray(image)) if multi else None
        img = None if multi else _as_pil_rgb(image)
        lbl = _as_mask_array(mask)
        h, w = arr.shape[:2] if arr is not None else (img.size[1], img.size[0])  # type: ignore[union-attr]
        if lbl.shape != (h, w):
            raise ValueError(f"mask shape {lbl.shape} does not match image size {(h, w)} (H, W)")

        # 1. random scale. Draw order (scale, crop y, crop x, flip) is fixed: it is part of
        # what makes a seed reproduce a sample.
        scale = self.sample_scale(generator)
        nw, nh = (w, h) if scale == 1.0 else (max(1, int(round(w * scale))),
                                               max(1, int(round(h * scale))))

        # 2-3. pad at bottom/right to at least the crop, then crop at a random offset.
        ch, cw = self.crop_size
        ph, pw = max(nh, ch), max(nw, cw)
        y0 = int(torch.randint(ph - ch + 1, (1,), generator=generator))
        x0 = int(torch.randint(pw - cw + 1, (1,), generator=generator))
        y1, x1 = min(y0 + ch, nh), min(x0 + cw, nw)
        if arr is not None:  # N channels / 16-bit / float: the same grid, channel by channel
            if scale == 1.0:
                crop, crop_lbl = arr[y0:y1, x0:x1], lbl[y0:y1, x0:x1]
            else:
                sx, sy = w / nw, h / nh
                box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
                size = (x1 - x0, y1 - y0)
                crop = _resize_channels(arr, size, box)
                crop_lbl = np.asarray(Image.fromarray(lbl).resize(size, _NEAREST, box=box))
            normalized = _normalize_float(crop, self._mean, self._std)
        elif scale == 1.0:
            rgb = np.asarray(img)[y0:y1, x0:x1]
            crop_lbl = lbl[y0:y1, x0:x1]
        else:
            # Resize only the source region that lands in the crop (PIL's box argument):
            # the same sampling grid as resizing the whole image and cropping, without
            # resizing pixels that are thrown away (4x the image at scale 2).
            sx, sy = w / nw, h / nh
            box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            size = (x1 - x0, y1 - y0)
            assert img is not None  # the RGB path
            rgb = np.asarray(img.resize(size, _BILINEAR, box=box))
            crop_lbl = np.asarray(Image.fromarray(lbl).resize(size, _NEAREST, box=box))
        # the crop goes into a canvas that already holds the padding values, which is the
        # same as padding first
        if arr is None:
            normalized = _normalize(rgb, self._mean, self._std)
        out_img = torch.zeros(normalized.shape[0], ch, cw)  # 0 == the mean pixel after normalisation
        out_img[:, : y1 - y0, : x1 - x0] = normalized
        out_mask = torch.full((ch, cw), self.ignore_index, dtype=torch.int64)
        out_mask[: y1 - y0, : x1 - x0] = torch.from_numpy(crop_lbl.astype(np.int64))

        # 4. random left-right flip, image and mask together
        if self.flip and float(torch.rand(1, generator=generator)) < 0.5:
            out_img = out_img.flip(-1)
            out_mask = out_mask.flip(-1)
        return out_img.contiguous(), out_mask.contiguous()


class EvalTransform:
    """Evaluation preprocessing: no resize, no crop, just normalised tensors.

    Args:
        mean: per-channel mean in [0, 1] pixel units.
        std: per-channel std in [0, 1] pixel units.

    Call: ``transform(image, mask, generator=None) -> (image, mask)``: ``image`` float32
    ``(3, H, W)``, ``mask`` int64 ``(H, W)``. ``generator`` is accepted and unused, so
    datasets can call both transforms alike.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __repr__(self) -> str:
        return f"EvalTransform(mean={self.mean}, std={self.std})"

    def __call__(self, image: ImageLike, mask: Optional[MaskLike] = None,
                 generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if is_multichannel(image):
            x = _normalize_float(to_unit_float(np.asarray(image)), self._mean, self._std)
        else:
            x = _normalize(np.asarray(_as_pil_rgb(image)), self._mean, self._std)
        if mask is None:
            return x, None
        lbl = _as_mask_array(mask)
        if lbl.shape != x.shape[1:]:
            raise ValueError(f"mask shape {lbl.shape} does not match image size "
                             f"{tuple(x.shape[1:])} (H, W)")
        return x, torch.from_numpy(lbl.astype(np.int64))


def normalize_image(image: ImageLike, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """A PIL image or ``(H, W, 3)`` uint8 array -> normalised float32 ``(3, H, W)``."""
    return EvalTransform(mean, std)(image)[0]


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Undo the normalisation, for visualisation.

    Args:
        x: ``(3, H, W)`` or ``(B, 3, H, W)`` normalised images.
        mean: the mean used to normalise.
        std: the std used to normalise.

    Returns:
        Same shape, float in [0, 1] (clamped).
    """
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x * s + m).clamp_(0.0, 1.0)


def to_uint8_image(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """A normalised ``(3, H, W)`` tensor -> ``(H, W, 3)`` uint8 array (for saving/plotting)."""
    img = denormalize(x.detach().cpu().float(), mean, std)
    return (img.mul(255.0).round_().byte().permute(1, 2, 0).numpy())


def pad_collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                ignore_index: int = IGNORE_INDEX) -> Tuple[torch.Tensor, torch.Tensor]:
    """Collate images of different sizes by padding bottom/right to the largest.

    Images are padded with 0 (the mean pixel after normalisation), masks with
    ``ignore_index``, so padding affects neither the loss nor the metrics. This is also
    how the reference evaluates whole images (padded to 513x513).

    Args:
        batch: ``(image (3, H_i, W_i), mask (H_i, W_i))`` pairs.
        ignore_index: mask padding value.

    Returns:
        ``images (B, 3, H, W)`` and ``masks (B, H, W)`` with ``H, W`` the maxima.
    """
    hs = [img.shape[-2] for img, _ in batch]
    ws = [img.shape[-1] for img, _ in batch]
    H, W = max(hs), max(ws)
    images = batch[0][0].new_zeros((len(batch), batch[0][0].shape[0], H, W))
    masks = torch.full((len(batch), H, W), ignore_index, dtype=torch.int64)
    for i, (img, mask) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks
