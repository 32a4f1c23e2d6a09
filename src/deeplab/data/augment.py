"""Extra augmentation from a serialized albumentations pipeline (``--augment FILE.yaml``).

The paper's recipe (:class:`~deeplab.data.transforms.TrainTransform`: scale, crop, flip)
stays the default and still runs last; an albumentations pipeline saved with
``A.save(pipeline, "aug.yaml", data_format="yaml")`` is applied before it, jointly to the
image and the mask. Needs the ``[augment]`` extra (``pip install 'deeplab[augment]'``).

Exact resume: albumentations draws from its own generators. Each call first draws one seed
from the sample's ``torch.Generator`` (the one the dataset derives from ``(seed, epoch,
index)``) and reseeds the pipeline with it (``set_random_seed``), so a sample is augmented
the same way whatever the worker, the rank or the resume point.

Safety: a pipeline that changes the mask's values (a mask interpolated bilinearly invents
labels between two classes) or gives mask and image different sizes raises a
:class:`~deeplab.data.base.DatasetError` naming the file and the fix. Pad with
``fill_mask: 255`` so padding is ignored rather than labelled background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .base import DatasetError
from .palettes import IGNORE_INDEX

__all__ = ["AlbumentationsTransform", "load_pipeline"]


def load_pipeline(path: str) -> Any:
    """The albumentations ``Compose`` saved in ``path`` (YAML or JSON by extension).

    Raises:
        DatasetError: albumentations missing, file missing, or not a saved pipeline.
    """
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"--augment {file}: no such file; save a pipeline with "
                           f"A.save(pipeline, '{file.name}', data_format='yaml')")
    try:
        import albumentations as A
    except ImportError as exc:
        raise DatasetError(f"--augment {file} needs albumentations: pip install 'deeplab[augment]'") from exc
    fmt = "json" if file.suffix.lower() == ".json" else "yaml"
    try:
        return A.load(str(file), data_format=fmt)
    except Exception as exc:  # albumentations raises many kinds for a bad file
        raise DatasetError(f"--augment {file} is not a serialized albumentations pipeline ({exc}); write it with "
                           f"A.save(pipeline, path, data_format='{fmt}')") from exc


class AlbumentationsTransform:
    """``transform(image, mask, generator=None)``: albumentations pipeline, then ``then``.

    Args:
        path: the serialized pipeline (``A.save`` YAML/JSON).
        then: the transform applied after it (normally the paper's ``TrainTransform``).
        ignore_index: the ignore label (allowed to appear, e.g. from padding).
    """

    def __init__(self, path: str, *, then: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.path = str(path)
        self.pipeline = load_pipeline(self.path)
        self.then = then
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return f"AlbumentationsTransform({self.path!r}, then={self.then!r})"

    def __getstate__(self) -> dict:
        # DataLoader workers (spawn) pickle the transform: reload the pipeline from its file there
        state = dict(self.__dict__)
        state["pipeline"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pipeline = load_pipeline(self.path)

    def augment(self, image: Any, mask: Any, generator: Optional[torch.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Only the albumentations part: ``(image array, mask uint8 array)``."""
        arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        lbl = np.asarray(mask).astype(np.uint8)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=arr, mask=lbl)
        new_img, new_mask = np.asarray(out["image"]), np.asarray(out["mask"])
        if new_mask.shape[:2] != new_img.shape[:2] or new_mask.ndim != 2:
            raise DatasetError(
                f"--augment {self.path} made the mask {new_mask.shape} but the image {new_img.shape}: a transform "
                f"changed their sizes differently; use transforms that take both (spatial transforms apply to "
                f"'mask' too), not ones that resize only the image")
        before = set(np.unique(lbl).tolist()) | {self.ignore_index}
        invented = sorted(set(np.unique(new_mask).tolist()) - before)
        if invented:
            raise DatasetError(
                f"--augment {self.path} changed the mask's values (new labels {invented[:10]}): a transform "
                f"interpolated the mask; set mask_interpolation: 0 (nearest) on spatial transforms and "
                f"fill_mask: {self.ignore_index} on padding ones")
        return new_img, new_mask

    def __call__(self, image: Any, mask: Any, generator: Optional[torch.Generator] = None) -> Any:
        new_img, new_mask = self.augment(image, mask, generator)
        if self.then is None:
            return new_img, new_mask
        return self.then(new_img, new_mask, generator=generator)
