"""The label doctor: read every mask of a dataset once and report what is wrong with it.

:func:`check_dataset` scans a :class:`~deeplab.data.base.SegmentationDataset` (workers and a
progress bar) and returns a JSON-able report: pixels and images per class, the ignore share,
the image sizes, median-frequency class weights, and the *problems*, each with its files and
the fix. Problem kinds (``severity`` ``"error"`` unless said otherwise):

- ``unreadable``: an image or mask that cannot be decoded;
- ``binary_0_255``: masks holding only 0 and 255 - the foreground reads as "ignore";
  fix with ``--label-map 255:1``;
- ``rgb_mask``: colour masks the dataset cannot map (no class colours, or colours not in
  the palette; the colours found are listed);
- ``out_of_range``: label values outside ``[0, num_classes)`` and not 255;
- ``size_mismatch``: a mask whose size differs from its image's;
- ``empty_mask``: a mask with no pixels;
- ``all_ignore`` (warning): every pixel is 255;
- ``duplicate_stem``: two samples with the same name;
- ``missing_class`` (warning): a class never seen in the split.

Median-frequency balancing (Eigen & Fergus 2015): ``freq_c = pixels_c / (pixels of the
images containing c)``, ``w_c = median_c(freq) / freq_c``; classes never seen get weight 0.
:func:`write_class_weights` writes them in the format ``--class-weights FILE`` reads.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .base import DatasetError, SegmentationDataset, image_size_of, open_mask

__all__ = [
    "PROBLEM_FIXES",
    "SampleScan",
    "check_dataset",
    "median_frequency_weights",
    "read_class_weights",
    "scan_sample",
    "write_class_weights",
]

# kind -> (severity, what it means, how to fix it)
PROBLEM_FIXES: Dict[str, Tuple[str, str, str]] = {
    "unreadable": ("error", "files that cannot be decoded",
                   "re-export them (masks as PNG of class ids), or remove them from the split"),
    "binary_0_255": ("error", "masks hold only 0 and 255: the foreground (255) is read as 'ignore'",
                     "pass --label-map 255:1 (or add 'label_map: 255:1' to classes.txt), or re-save the "
                     "masks with foreground = 1"),
    "rgb_mask": ("error", "colour (RGB) masks that cannot be mapped to class ids",
                 "give every class its colour in classes.txt ('name R G B'), or save masks as index PNGs"),
    "out_of_range": ("error", "label values outside the classes (and not 255 = ignore)",
                     "add the missing classes to the class list, or map the values with --label-map"),
    "size_mismatch": ("error", "masks whose size differs from their image's",
                      "re-export the mask at the image's size (an EXIF rotation transposes them)"),
    "empty_mask": ("error", "masks with no pixels", "re-export them"),
    "duplicate_stem": ("error", "samples that share a file name (masks are matched by name)",
                       "rename one of each pair"),
    "all_ignore": ("warning", "masks whose every pixel is 255 (ignore): they teach nothing",
                   "check them; remove them or label them"),
    "missing_class": ("warning", "classes that no mask of this split contains",
                      "check the class list and the label values; a class never seen cannot be learned"),
}
MAX_FILES_SHOWN = 20


@dataclass
class SampleScan:
    """What one sample's files say.

    Attributes:
        index: sample index.
        counts: pixels per label value (``{value: count}``), after decoding.
        image_size: ``(W, H)`` of the image, or ``None`` if unreadable.
        problems: ``(kind, detail)`` pairs.
    """

    index: int
    counts: Dict[int, int] = field(default_factory=dict)
    image_size: Optional[Tuple[int, int]] = None
    problems: List[Tuple[str, str]] = field(default_factory=list)


def _colours(mask: Image.Image, limit: int = 8) -> str:
    rgb = np.asarray(mask.convert("RGB")).reshape(-1, 3)
    uniq, counts = np.unique(rgb, axis=0, return_counts=True)
    order = np.argsort(-counts)[:limit]
    more = f" and {len(uniq) - limit} more" if len(uniq) > limit else ""
    return ", ".join(f"({int(r)}, {int(g)}, {int(b)})" for r, g, b in uniq[order]) + more


def scan_sample(dataset: SegmentationDataset, index: int) -> SampleScan:
    """Read sample ``index``'s mask (and image header) once and list its problems."""
    scan = SampleScan(index)
    img_path, mask_path = dataset.get_path(index)
    try:
        with Image.open(img_path) as img:
            scan.image_size = img.size
    except Exception:
        try:
            scan.image_size = image_size_of(dataset.load_image(index))
        except (DatasetError, OSError) as e:
            scan.problems.append(("unreadable", f"{img_path}: {e}"))
    try:
        mask = open_mask(mask_path)
    except (DatasetError, OSError) as e:
        scan.problems.append(("unreadable", f"{mask_path}: {e}"))
        return scan
    try:
        ids = dataset.decode_mask_file(index)
    except DatasetError as e:
        if mask.mode in ("RGB", "RGBA"):
            scan.problems.append(("rgb_mask", f"{mask_path}: colours {_colours(mask)}"))
        else:
            scan.problems.append(("unreadable", f"{mask_path}: {e}"))
        return scan
    ids = np.asarray(ids)
    if ids.size == 0:
        scan.problems.append(("empty_mask", str(mask_path)))
        return scan
    values, counts = np.unique(ids, return_counts=True)
    scan.counts = {int(v): int(c) for v, c in zip(values, counts)}
    ignore = dataset.ignore_index
    bad = [v for v in scan.counts if not (0 <= v < dataset.num_classes or v == ignore)]
    if bad:
        scan.problems.append(("out_of_range", f"{mask_path}: values {bad[:10]}"))
    if set(scan.counts) == {ignore}:
        scan.problems.append(("all_ignore", str(mask_path)))
    if scan.image_size is not None and tuple(ids.shape[::-1]) != tuple(scan.image_size):
        w, h = scan.image_size
        scan.problems.append(("size_mismatch", f"{mask_path}: mask {ids.shape[1]}x{ids.shape[0]}, image {w}x{h}"))
    return scan


_WORKER_DATASET: Optional[SegmentationDataset] = None


def _init_worker(dataset: SegmentationDataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _scan_in_worker(index: int) -> SampleScan:
    assert _WORKER_DATASET is not None
    return scan_sample(_WORKER_DATASET, index)


def _scans(dataset: SegmentationDataset, workers: int, progress: bool) -> Iterator[SampleScan]:
    n = len(dataset)
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"checking {dataset.split} masks", unit="mask")
    try:
        # starting spawn workers costs seconds (they import torch): worth it for big splits only
        if workers > 0 and n >= 64:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (dataset,)) as pool:
                for scan in pool.imap_unordered(_scan_in_worker, range(n), chunksize=max(1, n // (workers * 8))):
                    if bar is not None:
                        bar.update(1)
                    yield scan
        else:
            for i in range(n):
                scan = scan_sample(dataset, i)
                if bar is not None:
                    bar.update(1)
                yield scan
    finally:
        if bar is not None:
            bar.close()


def median_frequency_weights(class_pixels: Sequence[int], image_pixels: Sequence[int]) -> List[float]:
    """Median-frequency balancing weights (0 for classes never seen).

    Args:
        class_pixels: pixels of each class.
        image_pixels: total labelled pixels of the images containing each class.
    """
    freq = np.array([p / t if t > 0 and p > 0 else 0.0 for p, t in zip(class_pixels, image_pixels)])
    seen = freq > 0
    if not seen.any():
        return [0.0] * len(freq)
    median = float(np.median(freq[seen]))
    return [round(median / f, 6) if f > 0 else 0.0 for f in freq]


def check_dataset(dataset: SegmentationDataset, *, workers: int = 0, progress: bool = True,
                  name: str = "") -> Dict[str, Any]:
    """Scan every mask of ``dataset`` once and build the report.

    Args:
        dataset: the split to check (its transform is not used).
        workers: worker processes (0: in this process).
        progress: tqdm bar.
        name: the dataset name, for the report.

    Returns:
        The report (JSON-able): ``samples``, ``classes``, ``class_pixels``, ``class_images``,
        ``ignore_pixels``, ``total_pixels``, ``ignore_share``, ``image_sizes``, ``problems``
        (``[{"kind", "severity", "what", "fix", "count", "files"}]``), ``errors``,
        ``warnings`` and ``class_weights`` (median-frequency).
    """
    num_classes = dataset.num_classes
    ignore = dataset.ignore_index
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    class_images = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)  # labelled pixels of images containing c
    ignore_pixels = 0
    total = 0
    sizes: Counter = Counter()
    found: Dict[str, List[str]] = {}
    binary_files: List[str] = []
    other_values = False  # any mask with a class other than 0 (besides ignore)
    for scan in sorted(_scans(dataset, workers, progress), key=lambda s: s.index):
        for kind, detail in scan.problems:
            found.setdefault(kind, []).append(detail)
        if scan.image_size is not None:
            sizes[f"{scan.image_size[0]}x{scan.image_size[1]}"] += 1
        if not scan.counts:
            continue
        labelled = sum(c for v, c in scan.counts.items() if v != ignore)
        total += sum(scan.counts.values())
        ignore_pixels += scan.counts.get(ignore, 0)
        for v, c in scan.counts.items():
            if 0 <= v < num_classes:
                class_pixels[v] += c
                class_images[v] += 1
                image_pixels[v] += labelled
        if set(scan.counts) == {0, ignore}:
            binary_files.append(str(dataset.get_path(scan.index)[1]))
        elif any(0 < v < num_classes for v in scan.counts):
            other_values = True
    # 0/255 binary masks: 255 is more than VOC's thin boundary and no mask holds another class
    if binary_files and not other_values and ignore_pixels > 0.02 * max(total, 1):
        found["binary_0_255"] = binary_files
    names = dataset.names
    dupes = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if dupes:
        found["duplicate_stem"] = [str(dataset.get_path(i)[0]) for i, n in enumerate(names) if n in dupes]
    missing = [c for c, k in zip(dataset.classes, class_pixels) if k == 0]
    if missing:
        found["missing_class"] = missing
    problems = []
    for kind in PROBLEM_FIXES:
        if kind in found:
            severity, what, fix = PROBLEM_FIXES[kind]
            files = found[kind]
            problems.append({"kind": kind, "severity": severity, "what": what, "fix": fix, "count": len(files),
                             "files": files[:MAX_FILES_SHOWN]})
    return {
        "dataset": name or type(dataset).__name__,
        "root": str(dataset.root),
        "split": dataset.split,
        "samples": len(dataset),
        "classes": list(dataset.classes),
        "class_pixels": [int(v) for v in class_pixels],
        "class_images": [int(v) for v in class_images],
        "ignore_pixels": int(ignore_pixels),
        "total_pixels": int(total),
        "ignore_share": float(ignore_pixels / total) if total else 0.0,
        "image_sizes": dict(sizes.most_common()),
        "problems": problems,
        "errors": sum(1 for p in problems if p["severity"] == "error"),
        "warnings": sum(1 for p in problems if p["severity"] == "warning"),
        "class_weights": median_frequency_weights(class_pixels.tolist(), image_pixels.tolist()),
    }


def write_class_weights(weights: Sequence[float], path: Union[str, Path], classes: Sequence[str] = ()) -> Path:
    """Write ``weights`` as ``--class-weights FILE`` reads them: one number per line, ``# name`` after it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(classes) or [""] * len(weights)
    lines = ["# median-frequency class weights, one per class id (deeplab data check)"]
    lines += [f"{w:.6g}  # {n}" if n else f"{w:.6g}" for w, n in zip(weights, names)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def read_class_weights(path: Union[str, Path]) -> Tuple[float, ...]:
    """Class weights from a file: numbers separated by commas, spaces or lines (``#`` comments),
    a JSON list, or a ``data_report.json`` (its ``class_weights``).

    Raises:
        DatasetError: unreadable file or a non-number in it.
    """
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"class weights file {file} does not exist; write one with `deeplab data check` "
                           f"or pass the weights as w0,w1,...")
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise DatasetError(f"class weights file {file} is not valid JSON: {e}") from e
        values = data.get("class_weights") if isinstance(data, dict) else data
        if not isinstance(values, list):
            raise DatasetError(f"{file} holds no list of class weights")
        return tuple(float(v) for v in values)
    numbers: List[float] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            try:
                numbers.append(float(token))
            except ValueError:
                raise DatasetError(f"{file} line {lineno}: {token!r} is not a number; one weight per class "
                                   f"id, e.g. '0.4' or '0.4, 2.1, 1.0'") from None
    if not numbers:
        raise DatasetError(f"class weights file {file} holds no numbers")
    return tuple(numbers)
