"""Pictures: index PNGs, overlays with a legend, the confusion-matrix heatmap.

Everything here turns numbers into PIL images; nothing here computes a metric or runs a
model. :func:`to_rgb_array` is the one reader of user images (PIL, arrays, paths), shared
by the drawing code and :class:`deeplab.segmenter.Segmenter`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from deeplab.data.base import load_image
from deeplab.data.palettes import RGB, colorize

__all__ = ["ImageInput", "colormap", "index_png", "overlay_mask", "render_confusion", "to_rgb_array"]

ImageInput = Union[Image.Image, np.ndarray, str, "os.PathLike[str]"]


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """A PIL image, an array or an image path -> ``(H, W, 3)`` uint8 RGB.

    Arrays may be ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA, ``uint8`` (0-255)
    or floating point in [0, 1].

    Raises:
        ValueError: an array of another shape, or float values outside [0, 1].
        deeplab.data.DatasetError: a path that is not a readable image (names the file).
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(Path(image))
    if isinstance(image, Image.Image):
        # np.array (not asarray): a writable copy, which torch.from_numpy needs.
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(
            f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}; "
            "channels go last (HWC), as PIL and OpenCV give them"
        )
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.array(array, order="C")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0):
            raise ValueError("float image arrays must hold values in [0, 1]; pass uint8 for 0-255 pixels")
        return np.ascontiguousarray(np.round(array * 255.0).astype(np.uint8))
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"integer image arrays must hold 0-255 pixels, got {array.min()}..{array.max()}")
        return np.ascontiguousarray(array.astype(np.uint8))
    raise ValueError(f"unsupported image dtype {array.dtype}; pass uint8 RGB")


def index_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A class-id mask as a palette ("P" mode) PNG image: pixel values are the class ids and
    viewers show the class colours (the VOC ``SegmentationClass`` format)."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").convert("P")
    flat: List[int] = []
    for color in list(palette)[:256]:
        flat.extend(int(v) for v in color[:3])
    flat.extend([0] * (768 - len(flat)))
    image.putpalette(flat)
    return image


def _font(size: int) -> Any:
    """Pillow's default font at ``size`` px (scalable since Pillow 10.1, else its one bitmap size)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def overlay_mask(
    image: ImageInput,
    mask: np.ndarray,
    palette: Sequence[Sequence[int]],
    classes: Optional[Sequence[str]] = None,
    *,
    alpha: float = 0.5,
    legend: bool = True,
) -> Image.Image:
    """Blend the colour mask over the image; optionally add a legend of the classes present.

    Args:
        image: the input image (anything :func:`to_rgb_array` takes), same size as ``mask``.
        mask: ``(H, W)`` class ids.
        palette: one RGB colour per class.
        classes: class names (for the legend); default ``class_<id>``.
        alpha: weight of the mask colour (0 = image only, 1 = mask only).
        legend: append a panel on the right listing each class present, largest first, with
            its colour and share of the pixels.

    Returns:
        An RGB ``PIL.Image``; ``W + legend width`` wide.
    """
    rgb = to_rgb_array(image)
    mask = np.asarray(mask)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = colorize(mask, cast(Sequence[RGB], palette))
    blended = (rgb.astype(np.float32) * (1.0 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
    picture = Image.fromarray(blended)
    if not legend:
        return picture
    ids, counts = np.unique(mask, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    h, w = mask.shape
    size = int(min(max(round(h / 30), 11), 20))
    font = _font(size)
    row, pad, swatch = size + 6, 8, size
    labels = []
    for index in order:
        cid = int(ids[index])
        name = classes[cid] if classes is not None and 0 <= cid < len(classes) else f"class_{cid}"
        labels.append((cid, f"{name} {100.0 * counts[index] / mask.size:.1f}%"))
    probe = ImageDraw.Draw(picture)
    text_w = max((probe.textlength(text, font=font) for _, text in labels), default=0)
    panel_w = int(pad * 3 + swatch + text_w)
    canvas = Image.new("RGB", (w + panel_w, max(h, pad * 2 + row * len(labels))), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (cid, text) in enumerate(labels):
        y = pad + i * row
        color = tuple(int(v) for v in palette[cid][:3]) if 0 <= cid < len(palette) else (0, 0, 0)
        draw.rectangle([w + pad, y, w + pad + swatch, y + swatch], fill=color, outline=(0, 0, 0))
        draw.text((w + pad * 2 + swatch, y + swatch / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas



# ---------------------------------------------------------------------- confusion matrix
# Anchor colours of matplotlib's viridis at 0, 0.25, 0.5, 0.75, 1 (perceptually uniform and
# readable in greyscale); linear interpolation between them is close enough for a heatmap.
_VIRIDIS: Tuple[Tuple[int, int, int], ...] = (
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
)
_ABSENT_ROW = (200, 200, 200)
_MAX_LABELLED_CLASSES = 40


def colormap(value: float) -> Tuple[int, int, int]:
    """Map ``value`` in [0, 1] to an RGB triple (clamped)."""
    v = min(max(float(value), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(v), len(_VIRIDIS) - 2)
    t = v - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(int(round(a[k] + (b[k] - a[k]) * t)) for k in range(3))  # type: ignore[return-value]


def _text_size(draw: Any, text: str, font: Any) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _vertical_text(text: str, font: Any, fill: Any = "black") -> Image.Image:
    """``text`` rendered bottom-to-top on a white image (for column and axis labels)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # The bbox of text drawn at (0, 0) may start right of / below the origin and ends at
    # (right, bottom): size the scratch image by the far edges so no glyph is clipped.
    _, _, right, bottom = probe.textbbox((0, 0), text, font=font)
    scratch = Image.new("RGB", (int(right) + 2, int(bottom) + 2), "white")
    ImageDraw.Draw(scratch).text((0, 0), text, fill=fill, font=font)
    return scratch.rotate(90, expand=True)


def render_confusion(
    norm: torch.Tensor, names: Sequence[str], counts: torch.Tensor
) -> Tuple[Image.Image, Dict[str, int]]:
    """Draw the row-normalised confusion matrix ``norm`` ``(C, C)`` as a heatmap.

    ``names`` label the axes (indices instead when there are more than 40 classes);
    ``counts`` is the raw matrix, whose empty ground-truth rows are drawn grey. Returns the
    image and its layout (for tests and callers).

    Layout keys: ``x0``, ``y0`` (top-left of cell (0, 0)) and ``cell`` (cell side in px).
    """
    n = norm.shape[0]
    # ~800 px of matrix whatever C is, but never cells smaller than 2 px or larger than 48.
    cell = max(2, min(48, 800 // n))
    labelled = n <= _MAX_LABELLED_CLASSES
    font = _font(max(10, min(14, cell - 4)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # Too many classes for names: label every ``step``-th class by its index instead.
    step = 1 if labelled else 10 * max(1, math.ceil(n / 200))
    axis_labels = {i: (names[i] if labelled else str(i)) for i in range(0, n, step)}
    label_w = int(max(probe.textbbox((0, 0), s, font=font)[2] + 2 for s in axis_labels.values()))
    title_font = _font(14)
    title_h = int(probe.textbbox((0, 0), "Ag", font=title_font)[3] + 2)

    margin = 10
    x0 = margin + title_h + 6 + label_w + 6
    y0 = margin + title_h + 6 + label_w + 6
    side = n * cell
    bar_w, bar_gap, tick_w = 16, 16, 40
    width = x0 + side + bar_gap + bar_w + tick_w + margin
    height = y0 + side + margin + title_h + 6

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    gt_present = counts.sum(dim=1).cpu() > 0
    annotate = cell >= 28
    cell_font = _font(max(8, cell // 3))
    for r in range(n):
        for c in range(n):
            value = float(norm[r, c])
            colour = colormap(value) if bool(gt_present[r]) else _ABSENT_ROW
            box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1)
            draw.rectangle(box, fill=colour)
            if annotate and bool(gt_present[r]) and value >= 0.005:
                text = f"{100 * value:.0f}"
                tw, th = _text_size(draw, text, cell_font)
                ink = (0, 0, 0) if value > 0.6 else (255, 255, 255)
                draw.text(
                    (box[0] + (cell - tw) // 2, box[1] + (cell - th) // 2 - 1),
                    text,
                    fill=ink,
                    font=cell_font,
                )

    for i, name in axis_labels.items():
        tw, th = _text_size(draw, name, font)
        # Row labels right-aligned left of the matrix, column labels rotated above it.
        draw.text((x0 - 6 - tw, y0 + i * cell + (cell - th) // 2 - 1), name, fill="black", font=font)
        rotated = _vertical_text(name, font)
        image.paste(rotated, (x0 + i * cell + (cell - rotated.width) // 2, y0 - 6 - rotated.height))

    # Axis titles: "prediction" above the columns, "ground truth" left of the rows.
    tw, th = _text_size(draw, "prediction", title_font)
    draw.text((x0 + (side - tw) // 2, margin), "prediction", fill="black", font=title_font)
    rotated = _vertical_text("ground truth", title_font)
    image.paste(rotated, (margin, y0 + (side - rotated.height) // 2))
    note = "rows: ground truth, normalised per row"
    draw.text((x0, y0 + side + margin // 2), note, fill=(80, 80, 80), font=_font(11))

    # Colour bar, 1 at the top.
    bx = x0 + side + bar_gap
    for y in range(side):
        draw.line([(bx, y0 + y), (bx + bar_w - 1, y0 + y)], fill=colormap(1.0 - y / max(side - 1, 1)))
    draw.rectangle((bx, y0, bx + bar_w - 1, y0 + side - 1), outline="black")
    tick_font = _font(11)
    for value in (0.0, 0.5, 1.0):
        y = y0 + int(round((1.0 - value) * (side - 1)))
        draw.line([(bx + bar_w, y), (bx + bar_w + 3, y)], fill="black")
        _, th = _text_size(draw, "0", tick_font)
        draw.text((bx + bar_w + 5, y - th // 2 - 1), f"{value:.1f}", fill="black", font=tick_font)

    return image, {"x0": x0, "y0": y0, "cell": cell}


# ---------------------------------------------------------------------- Evaluation charts
# Trimap curves, run comparisons and worst-image triptychs. matplotlib is imported inside each
# function (Agg backend), never when the package is imported.

__all__ += ["plot_compare", "plot_trimap", "render_triptych"]

TrimapCurve = Tuple[Sequence[int], Sequence[Optional[float]]]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Union[str, "os.PathLike[str]"]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    _pyplot().close(fig)
    return out


def _plot_curves(ax: Any, curves: Dict[str, TrimapCurve]) -> None:
    for label, (widths, values) in curves.items():
        # An empty band has no mIoU: the point is left out, never drawn as 0.
        pts = [(w, 100.0 * v) for w, v in zip(widths, values) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("trimap width (px)")
    ax.set_ylabel("mIoU in band (%)")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize=8)


def plot_trimap(
    curves: Dict[str, TrimapCurve],
    path: Union[str, "os.PathLike[str]"],
    *,
    title: str = "mIoU inside the trimap band (paper Fig. 5)",
) -> Path:
    """mIoU vs trimap width, one line per run; widths with an empty band are skipped.

    Args:
        curves: label -> (widths, mIoU in [0, 1] or ``None`` for an empty band).
        path: the PNG to write (parents created).
        title: the figure title.

    Returns:
        The written path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    _plot_curves(ax, curves)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_compare(
    labels: Sequence[str],
    class_names: Sequence[str],
    deltas: Sequence[Sequence[Optional[float]]],
    path: Union[str, "os.PathLike[str]"],
    *,
    trimap: Optional[Dict[str, TrimapCurve]] = None,
) -> Path:
    """Per-class IoU deltas against the first run (bars) and, when given, the trimap curves.

    Args:
        labels: run labels; ``labels[0]`` is the baseline.
        class_names: the classes on the x axis.
        deltas: for every run after the baseline, one IoU delta (fraction) per class, ``None``
            where either run has no IoU for the class (drawn as no bar).
        path: the PNG to write.
        trimap: label -> (widths, mIoU) curves for a second panel.

    Returns:
        The written path.
    """
    plt = _pyplot()
    panels = 2 if trimap else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(6.0, 0.45 * len(class_names) + 2) + 5 * (panels - 1), 4.2),
                             squeeze=False)
    ax = axes[0][0]
    n = max(1, len(deltas))
    width = 0.8 / n
    for k, row in enumerate(deltas):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(class_names))]
        ys = [100.0 * v if v is not None else 0.0 for v in row]
        ax.bar(xs, ys, width=width, label=f"{labels[k + 1]} - {labels[0]}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(class_names)))
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU delta (points)")
    ax.set_title("per-class IoU vs " + labels[0], fontsize=10)
    if deltas:
        ax.legend(fontsize=8)
    if trimap:
        _plot_curves(axes[0][1], trimap)
        axes[0][1].set_title("mIoU in the trimap band", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def render_triptych(
    image: ImageInput,
    truth: np.ndarray,
    prediction: np.ndarray,
    palette: Sequence[Sequence[int]],
    classes: Sequence[str],
    *,
    title: str = "",
    ignore_index: int = 255,
) -> Image.Image:
    """``image | ground truth | prediction`` side by side, a title line and a legend.

    Ground-truth void (``ignore_index``) is drawn white.

    Args:
        image: the input image (anything :func:`to_rgb_array` takes).
        truth: ``(H, W)`` ground-truth ids.
        prediction: ``(H, W)`` predicted ids.
        palette: one RGB colour per class.
        classes: class names.
        title: a line above the panels (e.g. the image's name and IoU).
        ignore_index: the void label.

    Returns:
        An RGB ``PIL.Image``.
    """
    rgb = to_rgb_array(image)
    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if rgb.shape[:2] != truth.shape or truth.shape != prediction.shape:
        raise ValueError(f"image {rgb.shape[:2]}, ground truth {truth.shape} and prediction {prediction.shape} differ")
    pal = cast(Sequence[RGB], palette)
    gt_rgb = colorize(np.where(truth == ignore_index, 0, truth), pal)
    gt_rgb[truth == ignore_index] = 255
    panels = [rgb, gt_rgb, colorize(prediction, pal)]
    h, w = truth.shape
    font = _font(14)
    top, legend_h = 40, 24
    canvas = Image.new("RGB", (3 * w, h + top + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    for i, (panel, name) in enumerate(zip(panels, ("image", "ground truth (white = void)", "prediction"))):
        canvas.paste(Image.fromarray(np.ascontiguousarray(panel)), (i * w, top))
        draw.text((i * w + 4, 20), name, fill="black", font=font)
    ids = np.unique(np.concatenate([truth.ravel(), prediction.ravel()]))
    present = sorted({int(c) for c in ids if 0 <= c < len(classes)})
    x = 4
    for c in present:
        color = tuple(int(v) for v in palette[c][:3]) if c < len(palette) else (0, 0, 0)
        draw.rectangle([x, h + top + 5, x + 12, h + top + 17], fill=color, outline="black")
        draw.text((x + 16, h + top + 4), classes[c], fill="black", font=font)
        x += 28 + int(draw.textlength(classes[c], font=font))
    return canvas


# ---------------------------------------------------------------------- Training and data charts
# Curves of runs and class-frequency bars; matplotlib through _pyplot() (Agg, imported lazily).

__all__ += ["plot_class_frequency", "plot_curves", "read_metrics"]


def read_metrics(path: Union[str, "os.PathLike[str]"]) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a run directory or the file); unreadable lines skipped.

    A resumed run appends to the same file; a later record for the same ``(kind, step)``
    replaces the earlier one, so the curve has one point per step.
    """
    import json

    file = Path(path)
    if file.is_dir():
        file = file / "metrics.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {file}: pass a run directory written by `deeplab train`")
    latest: Dict[Tuple[str, Any], Dict[str, Any]] = {}
    order: List[Tuple[str, Any]] = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a killed run
        if not isinstance(record, dict) or record.get("kind") not in ("train", "eval"):
            continue
        key = (str(record["kind"]), record.get("step"))
        if key not in latest:
            order.append(key)
        latest[key] = record
    return sorted((latest[k] for k in order), key=lambda r: (r.get("step") or 0))


def plot_curves(runs: Dict[str, List[Dict[str, Any]]], path: Union[str, "os.PathLike[str]"], *,
                metric: str = "mIoU", title: Optional[str] = None) -> Path:
    """``curves.png``: training loss, learning rate and ``metric`` against step, one line per run.

    Args:
        runs: label -> records of :func:`read_metrics`.
        path: the PNG to write.
        metric: the evaluation metric of the third panel.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, records in runs.items():
        train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
        evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get(metric), (int, float))]
        if train:
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
            axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], label=label)
        if evals:
            scale = 100.0 if metric.lower().endswith("iou") or metric.endswith("accuracy") else 1.0
            axes[2].plot([r["step"] for r in evals], [scale * float(r[metric]) for r in evals], marker="o",
                         label=label)
    axes[0].set_title("training loss")
    axes[1].set_title("learning rate")
    axes[2].set_title(f"{metric} (%)" if metric.lower().endswith("iou") else metric)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_class_frequency(classes: Sequence[str], pixels: Sequence[int], images: Sequence[int],
                         path: Union[str, "os.PathLike[str]"], *, title: Optional[str] = None) -> Path:
    """``class_frequency.png``: pixels and images per class, log scale, side by side.

    Args:
        classes: class names.
        pixels: labelled pixels per class.
        images: images containing each class.
        path: the PNG to write.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()

    n = len(classes)
    height = max(2.5, 0.22 * n + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    y = np.arange(n)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for ax, values, what in ((axes[0], pixels, "pixels"), (axes[1], images, "images")):
        # log axes cannot show 0: absent classes get no bar and a red 0 at the axis
        shown = [v if v > 0 else np.nan for v in values]
        ax.barh(y, shown, color="#3b6fb6")
        ax.set_xscale("log")
        positive = [v for v in values if v > 0]
        if positive:
            ax.set_xlim(max(min(positive) / 2, 0.5), max(positive) * 1.5)
        if what == "images":
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{what} per class (log)")
        ax.grid(axis="x", alpha=0.3)
        for yi, v in zip(y, values):
            if v == 0:
                ax.text(0.01, yi, "0", va="center", fontsize=7, color="#b00", transform=ax.get_yaxis_transform())
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(list(classes), fontsize=7 if n > 30 else 9)
    axes[0].invert_yaxis()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)
