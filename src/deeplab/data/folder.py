"""Your own data: a folder of images and a folder of masks with the same file stems.

Layout::

    root/
        images/<name>.{jpg,jpeg,png,bmp,tif,tiff,webp}
        masks/<name>.png          index PNG (class ids, 255 = ignore) or colour PNG
        classes.txt               one class per line, id = line number (from 0):
                                      background
                                      road 128 64 128
                                      car #00008e
                                      __ignore__ 255 255 255   (optional: the ignore colour)
        splits/{train,val}.txt    optional: one image name (stem) per line
    or, instead of splits/:  images/{train,val}/...  and  masks/{train,val}/...

Instead of ``classes.txt`` there may be ``classes.yaml`` / ``classes.json``: a list of
names, or of ``{name: ..., color: [R, G, B] or "#rrggbb"}`` (``__ignore__`` entries give
the ignore colour), or a mapping ``{classes: [...], ignore_color: [R, G, B]}``. A class
list can also be passed directly (``classes=[...]``).

Masks are read as class ids when they are single-channel or palette PNGs (mode L/P/1/I;16)
and as colours when they are RGB/RGBA; ``mask_format`` forces one reading.

Label map: index masks whose values are not the class ids (the classic: binary masks saved
as 0/255, where 255 would read as "ignore") are remapped by ``label_map={255: 1}``
(``--label-map 255:1`` on the command line), or by a line ``label_map: 255:1`` in
classes.txt (a ``label_map`` key in classes.yaml/json). Values not in the map stay as they are.

N-channel images (RGB-D, multispectral): ``images/<name>.npy`` holding an ``(H, W, C)``
array (uint8, uint16 or float in [0, 1]) or an N-channel TIFF (read with ``tifffile`` when
installed); train them with ``ModelConfig(in_channels=C)``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .base import (
    ARRAY_EXTENSIONS,
    IMAGE_EXTENSIONS,
    DatasetError,
    DatasetNotFoundError,
    PathLike,
    SegmentationDataset,
    Transform,
    colour_mask_to_ids,
    index_mask_array,
    load_image_array,
    read_split_list,
)
from .palettes import RGB, default_palette

IGNORE_NAME = "__ignore__"
MASK_FORMATS = ("auto", "index", "color")
FOLDER_IMAGE_EXTENSIONS: Tuple[str, ...] = IMAGE_EXTENSIONS + (".webp",) + ARRAY_EXTENSIONS
LABEL_MAP_KEY = "label_map"


def parse_label_map(value: Union[str, Dict[Any, Any], None], where: str = "label_map") -> Optional[Dict[int, int]]:
    """``"255:1,128:2"`` (or a mapping) -> ``{255: 1, 128: 2}``; ``None``/``""`` -> ``None``.

    Raises:
        DatasetError: a malformed entry or a value outside 0..255.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    pairs: List[Tuple[Any, Any]]
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = []
        for part in str(value).replace(";", ",").split(","):
            if part.strip():
                src, sep, dst = part.partition(":")
                if not sep:
                    raise DatasetError(f"bad label_map entry {part.strip()!r} in {where}: write 'from:to', "
                                       f"e.g. '255:1' (binary 0/255 masks) or '255:1,128:2'.")
                pairs.append((src, dst))
    out: Dict[int, int] = {}
    for src, dst in pairs:
        try:
            a, b = int(str(src).strip()), int(str(dst).strip())
        except ValueError:
            raise DatasetError(f"bad label_map entry {src}:{dst} in {where}: both sides must be integers.") from None
        if not (0 <= a <= 255 and 0 <= b <= 255):
            raise DatasetError(f"label_map entry {a}:{b} in {where}: values must be in 0..255 (255 = ignore).")
        out[a] = b
    return out


def file_label_map(root: Path) -> Optional[Dict[int, int]]:
    """The ``label_map`` of the folder dataset's class file, if it has one."""
    for name in ("classes.txt", "classes.yaml", "classes.yml", "classes.json"):
        path = root / name
        if not path.is_file():
            continue
        if path.suffix == ".txt":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip().startswith(LABEL_MAP_KEY + ":"):
                    return parse_label_map(line.strip()[len(LABEL_MAP_KEY) + 1:], str(path))
            return None
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
            else:
                import yaml

                data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:  # load_class_list reports parse errors with the file
            return None
        return parse_label_map(data.get(LABEL_MAP_KEY), str(path)) if isinstance(data, dict) else None
    return None
ClassSpec = Union[str, Dict[str, Any], Tuple[str, Sequence[int]]]

_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


def parse_color(value: Any, where: str) -> RGB:
    """``[R, G, B]``, ``(R, G, B)``, ``"#rrggbb"`` or ``"R G B"`` -> ``(R, G, B)`` ints."""
    if isinstance(value, str):
        m = _HEX.match(value.strip())
        if m:
            h = m.group(1)
            return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
        value = value.replace(",", " ").split()
    try:
        rgb = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise DatasetError(f"bad colour {value!r} in {where}: write it as 'R G B' (0-255 each) "
                           f"or '#rrggbb'.")
    return rgb


def _parse_txt(path: Path) -> List[Tuple[str, Optional[RGB]]]:
    entries: List[Tuple[str, Optional[RGB]]] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith(LABEL_MAP_KEY + ":"):
            continue
        tokens = line.split()
        where = f"{path} line {lineno}"
        # names may contain spaces ("potted plant 128 128 0"): the colour is at the end
        if len(tokens) >= 4 and all(t.lstrip("-").isdigit() for t in tokens[-3:]):
            entries.append((" ".join(tokens[:-3]), parse_color(tokens[-3:], where)))
        elif len(tokens) >= 2 and tokens[-1].startswith("#"):
            entries.append((" ".join(tokens[:-1]), parse_color(tokens[-1], where)))
        else:
            entries.append((line, None))
    return entries


def _parse_structured(data: Any, where: str) -> Tuple[List[Tuple[str, Optional[RGB]]], Optional[RGB]]:
    ignore: Optional[RGB] = None
    if isinstance(data, dict):
        if "ignore_color" in data and data["ignore_color"] is not None:
            ignore = parse_color(data["ignore_color"], where)
        data = data.get("classes")
    if not isinstance(data, list):
        raise DatasetError(f"{where} must hold a list of classes (names, or {{name, color}} "
                           f"entries), or a mapping with a 'classes' list.")
    entries: List[Tuple[str, Optional[RGB]]] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            entries.append((item, None))
        elif isinstance(item, dict) and "name" in item:
            color = item.get("color", item.get("colour"))
            entries.append((str(item["name"]),
                            None if color is None else parse_color(color, f"{where} entry {i}")))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            entries.append((item[0], parse_color(item[1], f"{where} entry {i}")))
        else:
            raise DatasetError(f"class entry {i} in {where} is {item!r}; write a name or "
                               f"{{name: ..., color: [R, G, B]}}.")
    return entries, ignore


def load_class_list(root: Path, classes: Optional[Sequence[ClassSpec]] = None
                    ) -> Tuple[List[str], Optional[List[RGB]], Optional[RGB], str]:
    """Read the class list of a folder dataset.

    Args:
        root: dataset root (searched for ``classes.txt``, ``classes.yaml``/``.yml``,
            ``classes.json`` in that order).
        classes: a list given directly; wins over files.

    Returns:
        ``(names, colours or None, ignore colour or None, where it came from)``.

    Raises:
        DatasetError: no class list, or a malformed one.
    """
    if classes is not None:
        entries, ignore = _parse_structured(list(classes), "the classes argument")
        source = "the classes argument"
    else:
        found = [root / n for n in ("classes.txt", "classes.yaml", "classes.yml", "classes.json")
                 if (root / n).is_file()]
        if not found:
            raise DatasetNotFoundError(
                f"no class list for the folder dataset at {root}: create {root / 'classes.txt'} "
                f"with one class name per line (line 1 = id 0, e.g. 'background'), optionally "
                f"followed by its mask colour 'R G B', or pass classes=[...].")
        path = found[0]
        source = str(path)
        if path.suffix == ".txt":
            entries, ignore = _parse_txt(path), None
        else:
            try:
                if path.suffix == ".json":
                    data = json.loads(path.read_text(encoding="utf-8"))
                else:
                    import yaml

                    data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except Exception as e:  # any parse error: say which file
                raise DatasetError(f"cannot parse class list {path}: {e}") from e
            entries, ignore = _parse_structured(data, str(path))

    names: List[str] = []
    colors: List[Optional[RGB]] = []
    for name, color in entries:
        if name == IGNORE_NAME:
            # labelme's labels.txt starts with __ignore__; with a colour it is the ignore colour
            if color is not None:
                ignore = color
            continue
        names.append(name)
        colors.append(color)
    if not names:
        raise DatasetError(f"the class list in {source} is empty.")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"class name(s) {dupes} appear twice in {source}; each line is one "
                           f"class id, so names must be unique.")
    given = [c for c in colors if c is not None]
    if given and len(given) != len(colors):
        bare = [n for n, c in zip(names, colors) if c is None]
        raise DatasetError(f"in {source}, some classes have a colour and {bare} do not: give "
                           f"every class a colour (needed to read colour masks) or none.")
    palette: Optional[List[RGB]] = [c for c in colors if c is not None] if given else None
    if palette is not None:
        seen: Dict[RGB, str] = {}
        for n, c in zip(names, palette):
            if c in seen:
                raise DatasetError(f"classes '{seen[c]}' and '{n}' share the colour {c} in "
                                   f"{source}; colour masks could not tell them apart.")
            seen[c] = n
        if ignore is not None and ignore in seen:
            raise DatasetError(f"the ignore colour {ignore} is also the colour of class "
                               f"'{seen[ignore]}' in {source}.")
    return names, palette, ignore, source


class FolderSegmentation(SegmentationDataset):
    """A custom dataset: ``images/`` and ``masks/`` with matching stems, and a class list.

    Args:
        root: dataset directory (see the module docstring for the layout).
        split: ``None`` or "all" for every image; otherwise a split read from
            ``root/splits/{split}.txt`` or from subfolders ``images/{split}/`` +
            ``masks/{split}/``.
        transform: ``transform(image, mask[, generator=g])``.
        classes: class names (or ``{name, color}`` entries) instead of a class file.
        ignore_color: colour meaning "ignore" in colour masks (overrides the class file).
        mask_format: "auto" (by PNG mode), "index" or "color".
        seed: base seed for reproducible per-sample augmentation.
        label_map: remap index-mask values first, e.g. ``{255: 1}`` or ``"255:1"`` for 0/255
            binary masks; default: the class file's ``label_map``, else none.

    Items are ``(image, mask)``: a ``PIL.Image`` RGB and an ``(H, W)`` uint8 mask of class
    ids in ``[0, num_classes)`` or 255, before ``transform``.

    Attributes:
        class_source: where the class list came from (file path or "the classes argument").
        colors_given: whether the class list defines colours (needed for colour masks).
        ignore_color: RGB of the ignore label in colour masks, or ``None``.
    """

    _label_hint = ("Index masks must hold class ids: the line number of the class in "
                   "classes.txt, counting from 0 (255 = ignore). If your masks use other "
                   "values, add the missing classes to the class list; if they are colour "
                   "images saved as grey, save them as RGB and give the class colours.")

    def __init__(self, root: PathLike, split: Optional[str] = None,
                 transform: Optional[Transform] = None, *,
                 classes: Optional[Sequence[ClassSpec]] = None,
                 ignore_color: Optional[Sequence[int]] = None, mask_format: str = "auto",
                 seed: Optional[int] = None, label_map: Union[str, Dict[int, int], None] = None) -> None:
        root = Path(root).expanduser()
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"unknown mask_format '{mask_format}'; choose from {list(MASK_FORMATS)}")
        if not root.is_dir():
            raise DatasetNotFoundError(f"folder dataset root {root} does not exist.")
        image_root, mask_root = root / "images", root / "masks"
        for d, what in ((image_root, "images"), (mask_root, "masks")):
            if not d.is_dir():
                raise DatasetNotFoundError(
                    f"folder dataset at {root} has no {what}/ directory ({d}). Expected "
                    f"{root}/images/<name>.jpg and {root}/masks/<name>.png.")

        names, palette, file_ignore, source = load_class_list(root, classes)
        self.class_source = source
        self.label_map = parse_label_map(label_map, "the label_map argument") if label_map is not None \
            else file_label_map(root)
        self._lut: Optional[np.ndarray] = None
        if self.label_map:
            self._lut = np.arange(256, dtype=np.uint8)
            for a, b in self.label_map.items():
                self._lut[a] = b
        self.colors_given = palette is not None
        self.ignore_color: Optional[RGB] = (
            parse_color(ignore_color, "ignore_color") if ignore_color is not None else file_ignore)
        self.mask_format = mask_format
        if mask_format == "color" and not self.colors_given:
            raise DatasetError(f"mask_format='color' needs class colours, but {source} gives "
                               f"none: write 'name R G B' lines in classes.txt.")

        split_name = "all" if split in (None, "", "all") else split
        if split_name == "all":
            image_dir, mask_dir, wanted = image_root, mask_root, None
        elif (root / "splits" / f"{split_name}.txt").is_file():
            image_dir, mask_dir = image_root, mask_root
            wanted = read_split_list(root / "splits" / f"{split_name}.txt")
        elif (image_root / split_name).is_dir():
            image_dir, mask_dir, wanted = image_root / split_name, mask_root / split_name, None
            if not mask_dir.is_dir():
                raise DatasetNotFoundError(
                    f"split folder {image_dir} has no matching mask folder {mask_dir}.")
        else:
            have = sorted(p.stem for p in (root / "splits").glob("*.txt")) if (root / "splits").is_dir() else []
            have += sorted(p.name for p in image_root.iterdir() if p.is_dir())
            raise DatasetNotFoundError(
                f"folder dataset at {root} has no split '{split_name}': create "
                f"{root / 'splits' / (split_name + '.txt')} (one image name per line) or put "
                f"the images in {image_root / split_name}/ and masks in "
                f"{mask_root / split_name}/; or use the split 'all' for every image (--split all, --train-split all). "
                f"Splits found: {have or 'none'}.")

        by_stem: Dict[str, Path] = {}
        for p in sorted(image_dir.iterdir()):
            if not p.is_file() or p.name.startswith(".") or \
                    p.suffix.lower() not in FOLDER_IMAGE_EXTENSIONS:
                continue  # README, Thumbs.db, .DS_Store ... are not samples
            if p.stem in by_stem:
                raise DatasetError(f"two images share the name '{p.stem}': {by_stem[p.stem]} "
                                   f"and {p}; masks are matched by name, so rename one.")
            by_stem[p.stem] = p
        if wanted is None:
            stems = sorted(by_stem)
            if not stems:
                raise DatasetError(f"no images in {image_dir} (looked for "
                                   f"{', '.join(FOLDER_IMAGE_EXTENSIONS)}).")
        else:
            stems = wanted
            missing = [s for s in stems if s not in by_stem]
            if missing:
                raise DatasetNotFoundError(
                    f"{len(missing)} name(s) in {root / 'splits' / (split_name + '.txt')} have no "
                    f"image in {image_dir}, e.g. '{missing[0]}'.")
            if not stems:
                raise DatasetError(f"split list {root / 'splits' / (split_name + '.txt')} is empty.")

        samples = []
        for stem in stems:
            img = by_stem[stem]
            mask = mask_dir / f"{stem}.png"
            if not mask.is_file():
                lossy = [m for m in mask_dir.glob(f"{stem}.*") if m.suffix.lower() != ".png"]
                if lossy:
                    raise DatasetError(
                        f"mask for image {img} is {lossy[0]}, but masks must be PNG: lossy or "
                        f"other formats change label values. Save it as {mask}.")
                raise DatasetNotFoundError(
                    f"image {img} has no mask: expected {mask}. Add the mask, or remove the "
                    f"image (or list only annotated images in a split file).")
            samples.append((img, mask))

        super().__init__(root, split_name, samples, classes=names,
                         palette=palette if palette is not None else default_palette(len(names)),
                         transform=transform, seed=seed)

    def _decode_mask(self, mask: Image.Image, path: Path) -> np.ndarray:
        as_color = self.mask_format == "color" or (
            self.mask_format == "auto" and mask.mode in ("RGB", "RGBA"))
        if not as_color:
            if mask.mode in ("RGB", "RGBA"):
                raise DatasetError(
                    f"mask {path} is a colour ({mask.mode}) image, but mask_format='index' "
                    f"reads class ids: use mask_format='auto' with class colours in the "
                    f"class list, or save the mask as an index PNG (pixel value = class id).")
            ids = index_mask_array(mask, path)
            if self._lut is not None:
                if ids.dtype != np.uint8 and ids.size and ids.min() >= 0 and ids.max() <= 255:
                    ids = ids.astype(np.uint8)  # 16-bit masks holding 8-bit values
                if ids.dtype == np.uint8:
                    ids = self._lut[ids]
            return ids
        if not self.colors_given:
            raise DatasetError(
                f"mask {path} is a colour image ({mask.mode}), but the class list "
                f"({self.class_source}) gives no colours: write 'name R G B' per class in "
                f"classes.txt, or save masks as index PNGs (pixel value = class id).")
        rgb = np.asarray(mask.convert("RGB"))
        return colour_mask_to_ids(rgb, self.palette, path,
                                  ignore_colors=[self.ignore_color] if self.ignore_color else [],
                                  ignore_index=self.ignore_index, classes=self.classes)

    def load_image(self, index: int) -> Any:
        """RGB ``PIL.Image``, or an ``(H, W, C)`` array for ``.npy`` / N-channel TIFF images."""
        return load_image_array(self.samples[index][0])

    def validate(self, limit: Optional[int] = None, decode_images: bool = False,
                 progress: bool = False) -> Dict[str, Any]:
        """As :meth:`SegmentationDataset.validate`, warning about likely 0/255 binary masks."""
        report = super().validate(limit=limit, decode_images=decode_images, progress=progress)
        # the classic binary-mask mistake: foreground saved as 255 reads as "ignore"
        if report["ignore_pixels"] > 0 and not any(report["class_pixels"][1:]):
            warnings.warn(
                f"{self.root}: only class 0 ('{self.classes[0]}') appears while "
                f"{report['ignore_pixels']} pixels are 255 (ignore). If your masks are binary "
                f"0/255 images, 255 is read as 'ignore': save the foreground as 1.",
                stacklevel=2)
        return report

    check = validate
