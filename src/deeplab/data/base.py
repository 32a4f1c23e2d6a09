"""What every segmentation dataset shares: file loading, validation, seeding, errors.

A dataset here is a list of ``(image_path, mask_path)`` pairs plus a way to decode a mask
file into class ids (``_decode_mask``). Everything that can go wrong with a user's files is
reported as a :class:`DatasetError` naming the file and the fix, at the moment the file is
read (and for all files at once by :meth:`SegmentationDataset.validate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .._utils import DeeplabError
from .palettes import IGNORE_INDEX, RGB

PathLike = Union[str, Path]
Sample = Tuple[Path, Path]
# transform(image, mask) or transform(image, mask, generator=g) -> anything
Transform = Callable[..., Any]

# The one image-suffix list (datasets, predict inputs, calibration folders).
IMAGE_SUFFIXES: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
IMAGE_EXTENSIONS = IMAGE_SUFFIXES


class DatasetError(DeeplabError, ValueError):
    """A dataset's files do not match the expected layout or content.

    The message names the offending file or directory and says how to fix it.
    """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A file or directory the dataset needs is missing (also a ``FileNotFoundError``)."""


def load_image(path: Path) -> Image.Image:
    """Read an image file fully into an RGB ``PIL.Image``.

    Decoding happens here (not lazily) so that a truncated or corrupt file fails with its
    name instead of deep inside a transform.

    Args:
        path: image file.

    Returns:
        The image in mode ``RGB``.

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetError: the file is not an image or is truncated/corrupt.
    """
    if not path.is_file():
        raise DatasetNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            # palette/grey/CMYK/16-bit images all become 8-bit RGB, the model's input
            return img.convert("RGB")
    except UnidentifiedImageError as e:
        raise DatasetError(
            f"cannot read image {path}: it is not an image file Pillow can decode. "
            f"Remove it (or its line in the split list) or replace it with a JPEG/PNG."
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"cannot read image {path}: the file is truncated or corrupt ({e}). "
            f"Re-download or re-export it, or remove it from the dataset."
        ) from e


ARRAY_EXTENSIONS: Tuple[str, ...] = (".npy",)
TIFF_EXTENSIONS: Tuple[str, ...] = (".tif", ".tiff")


def load_image_array(path: Path) -> Union[Image.Image, np.ndarray]:
    """An image for an N-channel model: ``.npy`` ``(H, W, C)`` (or ``(H, W)``) arrays, TIFFs
    with other than 3 channels (read with ``tifffile`` when installed, else Pillow), and
    every other file as :func:`load_image` (RGB ``PIL.Image``).

    Returns:
        A ``PIL.Image`` (RGB) or an ``(H, W, C)`` array (uint8, uint16 or float).

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetError: unreadable, or not 2-D/3-D.
    """
    suffix = path.suffix.lower()
    if suffix not in ARRAY_EXTENSIONS + TIFF_EXTENSIONS:
        return load_image(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"image file not found: {path}")
    try:
        if suffix in ARRAY_EXTENSIONS:
            arr = np.load(path, allow_pickle=False)
        else:
            try:
                import tifffile
            except ImportError:
                with Image.open(path) as img:  # Pillow reads 1-4 channel TIFFs
                    img.load()
                    arr = np.asarray(img)
            else:
                arr = tifffile.imread(path)
    except (OSError, ValueError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read image {path}: {e}. Re-export it as a .npy array (H, W, C) or a TIFF.") from e
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise DatasetError(f"image {path} has shape {arr.shape}; N-channel images must be (H, W, C) arrays")
    if arr.shape[0] <= 16 and arr.shape[2] > 16:
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) as many tools write it
    if arr.shape[2] == 3 and arr.dtype == np.uint8:
        return Image.fromarray(arr)
    return arr


def image_size_of(image: Union[Image.Image, np.ndarray]) -> Tuple[int, int]:
    """``(W, H)`` of a PIL image or an ``(H, W, C)`` array."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[1]), int(image.shape[0])


def open_mask(path: Path) -> Image.Image:
    """Read a mask file fully (any mode); errors name the file like :func:`load_image`."""
    if not path.is_file():
        raise DatasetNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except UnidentifiedImageError as e:
        raise DatasetError(
            f"cannot read mask {path}: it is not an image file Pillow can decode. "
            f"Masks must be PNG files of class ids (mode L or P)."
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"cannot read mask {path}: the file is truncated or corrupt ({e}). "
            f"Re-download or re-export it."
        ) from e


def index_mask_array(mask: Image.Image, path: Path) -> np.ndarray:
    """Class ids of an *index* mask (mode ``L``, ``P``, ``1``, ``I;16``, ``I``).

    8-bit masks come back as ``uint8`` (cheap to check and map), 16/32-bit ones as int64.

    Palette PNGs (mode ``P``) are read as their indices, not their colours: that is how VOC
    and most annotation tools store class ids.

    Raises:
        DatasetError: the mask is a colour image (RGB/RGBA) or another mode with no ids.
    """
    if mask.mode in ("L", "P"):
        return np.asarray(mask)
    if mask.mode == "1":
        return np.asarray(mask).astype(np.uint8)
    if mask.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(mask).astype(np.int64)
    raise DatasetError(
        f"mask {path} is a {mask.mode} image, but class-id masks are expected (a PNG of mode "
        f"L or P whose pixel values are class ids, 255 = ignore). If your masks are colour "
        f"images, use the 'folder' dataset with the class colours in classes.txt, or convert "
        f"them to index PNGs."
    )


def colour_mask_to_ids(rgb: np.ndarray, palette: Sequence[RGB], path: Path,
                       ignore_colors: Sequence[RGB] = (), ignore_index: int = IGNORE_INDEX,
                       classes: Optional[Sequence[str]] = None) -> np.ndarray:
    """Map an ``(H, W, 3)`` colour mask to class ids through a palette.

    Args:
        rgb: ``(H, W, 3)`` uint8 colour mask.
        palette: colour of each class id.
        path: the mask file, for error messages.
        ignore_colors: colours that mean "ignore" (become ``ignore_index``).
        ignore_index: id given to ``ignore_colors``.
        classes: class names, for error messages.

    Returns:
        ``(H, W)`` int64 class ids.

    Raises:
        DatasetError: a colour in the mask is neither a class colour nor an ignore colour.
    """
    # pack RGB into one int so the lookup is a single vectorised search
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys: Dict[int, int] = {}
    for color in ignore_colors:
        keys[(color[0] << 16) | (color[1] << 8) | color[2]] = ignore_index
    for i, color in enumerate(palette):
        # first class wins on duplicate colours, like every palette lookup
        keys.setdefault((color[0] << 16) | (color[1] << 8) | color[2], i)
    uniq, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(u) for u in uniq if int(u) not in keys]
    if unknown:
        shown = ", ".join(f"({u >> 16}, {(u >> 8) & 255}, {u & 255})" for u in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        names = list(classes) if classes is not None else [str(i) for i in range(len(palette))]
        known = ", ".join(f"{n}={tuple(c)}" for n, c in zip(names, palette))
        raise DatasetError(
            f"colour mask {path} contains colour(s) {shown}{more} that belong to no class. "
            f"Known class colours: {known}. Fix: add the colour to the class list "
            f"(classes.txt 'name R G B'), declare it as the ignore colour, or repaint those "
            f"pixels (anti-aliased edges from a drawing program also cause this: save masks "
            f"without smoothing)."
        )
    lut = np.array([keys[int(u)] for u in uniq], dtype=np.int64)
    return lut[inverse.reshape(codes.shape)]


class SegmentationDataset(Dataset):
    """Base class: ``(image, mask)`` pairs of one split, decoded and validated on access.

    Subclasses fill ``samples`` and may override :meth:`_decode_mask` (how a mask file
    becomes class ids).

    ``dataset[i]`` returns ``transform(image, mask[, generator=g])`` if a transform is set,
    else the raw pair: ``image`` a ``PIL.Image`` in RGB of size ``(W, H)``, ``mask`` an
    ``(H, W)`` ``np.uint8`` array of class ids in ``[0, num_classes)`` or 255 (ignore).

    Reproducible augmentation: with ``seed`` set, sample ``i`` in epoch ``e`` is augmented
    with a ``torch.Generator`` seeded from ``(seed, e, i)`` (call :meth:`set_epoch` each
    epoch), so the same sample gets the same crop whatever the worker, rank or resume
    point. A sampler may instead yield ``(index, sample_seed)`` pairs, which seed the
    generator directly (this also works with persistent workers). Without either, the
    transform draws from torch's global RNG (seeded per DataLoader worker by torch).

    Attributes:
        root: dataset root directory.
        split: split name.
        classes: class names, index = class id.
        palette: one RGB tuple per class.
        ignore_index: label value that the loss and metrics ignore (255).
        samples: ``(image_path, mask_path)`` per item.
        transform: callable applied to ``(image, mask)``, or ``None``.
        seed: base seed of per-sample generators, or ``None``.
        epoch: epoch mixed into per-sample seeds.
    """

    ignore_index: int = IGNORE_INDEX
    # a sentence appended to "labels out of range" errors, say what usually causes it
    _label_hint: str = "Check that the masks store class ids, not colours or 0/1 scaled to 0/255."

    def __init__(self, root: PathLike, split: str, samples: Sequence[Sample], *,
                 classes: Sequence[str], palette: Sequence[RGB],
                 transform: Optional[Transform] = None, seed: Optional[int] = None) -> None:
        self.root = Path(root)
        self.split = split
        self.samples: List[Sample] = list(samples)
        self.classes: List[str] = list(classes)
        self.palette: List[RGB] = [tuple(int(v) for v in c) for c in palette]  # type: ignore[misc]
        if len(self.palette) != len(self.classes):
            raise DatasetError(
                f"{len(self.classes)} class names but {len(self.palette)} palette colours")
        if not 0 < len(self.classes) <= IGNORE_INDEX:
            raise DatasetError(
                f"{len(self.classes)} classes: between 1 and 255 are supported (255 is the "
                f"ignore label)")
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    # ------------------------------------------------------------------ description
    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def names(self) -> List[str]:
        """Sample names (image file stems), in dataset order, for reports."""
        return [img.stem for img, _ in self.samples]

    def get_path(self, index: int) -> Tuple[Path, Path]:
        """``(image_path, mask_path)`` of sample ``index``."""
        return self.samples[index]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root='{self.root}', split='{self.split}', "
                f"samples={len(self)}, num_classes={self.num_classes})")

    # ------------------------------------------------------------------ loading
    def _decode_mask(self, mask: Image.Image, path: Path) -> np.ndarray:
        """Turn an opened mask file into an ``(H, W)`` int array of class ids (or 255)."""
        return index_mask_array(mask, path)

    def _check_labels(self, ids: np.ndarray, path: Path) -> np.ndarray:
        if ids.dtype == np.uint8:
            # a 256-bin histogram is several times cheaper than comparisons on big masks
            counts = np.bincount(ids.ravel(), minlength=256)
            counts[self.ignore_index] = 0
            bad = np.flatnonzero(counts[self.num_classes:]) + self.num_classes
        else:
            valid = ((ids >= 0) & (ids < self.num_classes)) | (ids == self.ignore_index)
            bad = np.unique(ids[~valid])
        if len(bad):
            shown = ", ".join(str(int(v)) for v in bad[:10])
            more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
            raise DatasetError(
                f"mask {path} has label value(s) {shown}{more} outside the "
                f"{self.num_classes} classes [0, {self.num_classes - 1}] "
                f"({self.ignore_index} = ignore). {self._label_hint}"
            )
        return ids.astype(np.uint8)

    def decode_mask_file(self, index: int) -> np.ndarray:
        """Class ids of sample ``index``'s mask as decoded, before the range check (the label doctor's view)."""
        path = self.samples[index][1]
        return self._decode_mask(open_mask(path), path)

    def load_mask(self, index: int) -> np.ndarray:
        """The validated ``(H, W)`` ``np.uint8`` class-id mask of sample ``index``."""
        path = self.samples[index][1]
        return self._check_labels(self._decode_mask(open_mask(path), path), path)

    def load_image(self, index: int) -> Image.Image:
        """The RGB ``PIL.Image`` of sample ``index``."""
        return load_image(self.samples[index][0])

    def load_pair(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        """Raw ``(image, mask)`` of sample ``index``, checked to have the same size."""
        image = self.load_image(index)
        mask = self.load_mask(index)
        self._check_size(image_size_of(image), mask, index)
        return image, mask

    def _check_size(self, image_size: Tuple[int, int], mask: np.ndarray, index: int) -> None:
        w, h = image_size
        if mask.shape != (h, w):
            img_path, mask_path = self.samples[index]
            hint = ""
            if mask.shape == (w, h):
                # the classic: a phone photo with an EXIF rotation annotated in a tool that
                # applied it, while the raw pixels are stored unrotated
                hint = (" The sizes are transposed: the image probably has an EXIF "
                        "orientation tag; save it with the rotation applied.")
            raise DatasetError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
                f"{img_path} is {w}x{h}: a mask must have exactly its image's size.{hint}"
            )

    # ------------------------------------------------------------------ access
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch mixed into per-sample seeds (call before each epoch)."""
        self.epoch = int(epoch)

    def sample_generator(self, index: int, epoch: Optional[int] = None) -> Optional[torch.Generator]:
        """The generator that augments sample ``index`` (``None`` without a seed)."""
        if self.seed is None:
            return None
        epoch = self.epoch if epoch is None else epoch
        # SeedSequence mixes the three numbers well and touches no global RNG state
        state = np.random.SeedSequence([int(self.seed), int(epoch), int(index)]).generate_state(2)
        return torch.Generator().manual_seed((int(state[0]) << 31) | (int(state[1]) >> 1))

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Any:
        generator: Optional[torch.Generator]
        if isinstance(key, tuple):
            index, sample_seed = int(key[0]), int(key[1])
            generator = torch.Generator().manual_seed(sample_seed)
        else:
            index = int(key)
            generator = None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        if generator is None:
            generator = self.sample_generator(index)
        image, mask = self.load_pair(index)
        if self.transform is None:
            return image, mask
        if generator is None:
            return self.transform(image, mask)
        return self.transform(image, mask, generator=generator)

    # ------------------------------------------------------------------ checking
    def validate(self, limit: Optional[int] = None, decode_images: bool = False,
                 progress: bool = False) -> Dict[str, Any]:
        """Scan masks (and image headers) up front; raise on the first bad file.

        Args:
            limit: check only the first ``limit`` samples.
            decode_images: fully decode every image (catches truncated files; slower).
                Otherwise only image headers are read, for their sizes.
            progress: show a tqdm bar.

        Returns:
            ``{"samples": n, "class_pixels": [count per class], "ignore_pixels": n,
            "missing_classes": [names never seen]}``.

        Raises:
            DatasetError: the first missing, unreadable, mis-sized or mis-labelled file.
        """
        n = len(self) if limit is None else min(limit, len(self))
        counts = np.zeros(256, dtype=np.int64)
        indices = range(n)
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"checking {type(self).__name__} {self.split}")
        for i in indices:
            mask = self.load_mask(i)
            if decode_images:
                size = image_size_of(self.load_image(i))
            else:
                size = _image_size(self.samples[i][0])
            self._check_size(size, mask, i)
            counts += np.bincount(mask.ravel(), minlength=256)
        class_pixels = [int(c) for c in counts[: self.num_classes]]
        return {
            "samples": n,
            "class_pixels": class_pixels,
            "ignore_pixels": int(counts[self.ignore_index]),
            "missing_classes": [c for c, k in zip(self.classes, class_pixels) if k == 0],
        }

    check = validate


def _image_size(path: Path) -> Tuple[int, int]:
    """``(W, H)`` from the image header only (``.npy``: the array header)."""
    if not path.is_file():
        raise DatasetNotFoundError(f"image file not found: {path}")
    if path.suffix.lower() in ARRAY_EXTENSIONS + TIFF_EXTENSIONS:
        if path.suffix.lower() in ARRAY_EXTENSIONS:
            try:
                return image_size_of(np.load(path, mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError) as e:
                raise DatasetError(f"cannot read image {path}: {e}. Re-export it as a .npy array (H, W, C).") from e
        try:
            with Image.open(path) as img:
                return img.size
        except (OSError, UnidentifiedImageError):
            return image_size_of(load_image_array(path))
    try:
        with Image.open(path) as img:
            return img.size
    except UnidentifiedImageError as e:
        raise DatasetError(
            f"cannot read image {path}: it is not an image file Pillow can decode. "
            f"Remove it (or its line in the split list) or replace it with a JPEG/PNG."
        ) from e
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e}. Re-download or re-export it.") from e


def split_images(base: Path, sub: str, *, name: str, hint: str) -> Tuple[Path, List[Path]]:
    """The ``.jpg`` images of ``base/images/<sub>`` and the annotation folder
    ``base/annotations/<sub>`` of the ADE20K-style layout (ADE20K, COCO-Stuff).

    Raises:
        DatasetNotFoundError: either folder is missing (``name`` and ``hint`` say which dataset
            and where to get it).
        DatasetError: no ``.jpg`` images.
    """
    image_dir, mask_dir = base / "images" / sub, base / "annotations" / sub
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DatasetNotFoundError(f"{name} directory {d} does not exist. {hint}")
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise DatasetError(f"no .jpg images in {image_dir}. {hint}")
    return mask_dir, images


def read_split_list(path: Path) -> List[str]:
    """Sample ids of a split file: one per line; blank lines and ``#`` comments skipped.

    Lines of the form ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` (a common
    ``train_aug.txt`` format) give ``x``: the first token without directories and without
    an image extension.
    """
    ids: List[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = Path(line.split()[0]).name
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
            name = Path(name).stem
        ids.append(name)
    return ids
