"""Segmentation metrics from a dataset-wide confusion matrix.

Every metric is computed from one confusion matrix accumulated over the whole evaluation
set (the TF reference's streaming ``tf.metrics.mean_iou`` does the same), never as a mean
of per-image scores: per-image averaging over-weights small images and classes that
happen to be absent from an image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from deeplab.viz import render_confusion

__all__ = [
    "TRIMAP_SOURCES",
    "BoundaryFScore",
    "ConfusionMatrix",
    "TrimapMeter",
    "binary_boundary",
    "boundary_f1",
    "chebyshev_distance",
    "image_miou",
    "label_boundary",
    "trimap_bands",
]

PathLike = Union[str, Path]


class ConfusionMatrix:
    """Pixel confusion matrix over ``num_classes`` classes with an ignore label.

    ``matrix[t, p]`` counts the pixels whose ground truth is ``t`` and whose prediction
    is ``p`` (rows = ground truth, columns = prediction), as ``int64`` so that counts over
    large datasets (Cityscapes: ~1e9 pixels) stay exact.

    Pixels whose ground truth equals ``ignore_index`` are dropped entirely, whatever was
    predicted there (the TF reference gives them weight 0).

    Metric definitions (``TP_c = matrix[c, c]``, ``GT_c`` = row sum, ``PRED_c`` = column
    sum, ``union_c = GT_c + PRED_c - TP_c``):

    * ``iou[c] = TP_c / union_c``; NaN when ``union_c == 0``, i.e. class ``c`` appears
      neither in the ground truth nor in the predictions of any evaluated pixel.
    * ``miou`` is the mean of ``iou`` over the classes with ``union_c > 0``. A class that
      is absent from the ground truth but was predicted somewhere (a pure false positive)
      counts with IoU 0; a class absent from both is left out of the mean instead of
      counting as 0 or 1. This is exactly ``tf.metrics.mean_iou`` as used by the DeepLab
      reference's ``eval.py`` (it divides the IoU sum by the number of classes whose
      denominator is non-zero) and equals ``nanmean`` over the per-class table used by
      most PyTorch toolboxes. Over a full benchmark split every class is present in the
      ground truth, so the choice only matters for small subsets.
    * ``pixel_accuracy = sum_c TP_c / sum_c GT_c``.
    * ``class_accuracy[c] = TP_c / GT_c`` (recall); NaN when ``GT_c == 0``.
      ``mean_class_accuracy`` is its mean over classes with ``GT_c > 0``.
    * ``fw_iou = sum_c (GT_c / sum GT) * iou[c]`` over classes with ``GT_c > 0``.

    With no counted pixel at all every scalar metric is NaN (the TF reference returns 0,
    which is indistinguishable from a useless model).

    Args:
        num_classes: number of classes ``C``; valid labels are ``0 .. C-1``.
        ignore_index: ground-truth label that is excluded from every count.
        device: where the matrix lives. Put it on the GPU when updating from GPU
            predictions (and for NCCL's ``all_reduce``); defaults to CPU.

    Example:
        >>> cm = ConfusionMatrix(21)
        >>> cm.update(logits.argmax(1), masks)   # (B, H, W) each
        >>> cm.miou, cm.summary(VOC_CLASSES)
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class id for num_classes={num_classes}; "
                "pick a label outside [0, num_classes), e.g. 255"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(
            num_classes, num_classes, dtype=torch.int64, device=torch.device(device or "cpu")
        )

    # ------------------------------------------------------------------ accumulation
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predictions.

        Args:
            pred: predicted class ids, integer tensor of any shape, e.g. ``(B, H, W)``.
            target: ground-truth ids of the same shape; ``ignore_index`` pixels are skipped.

        Raises:
            ValueError: shapes differ, or a label outside ``[0, num_classes)`` that is not
                ``ignore_index`` occurs in ``target`` (or in ``pred`` at a counted pixel).
            TypeError: floating-point inputs (pass ``logits.argmax(1)``, not logits).
        """
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(
                    f"{name} must hold integer class ids, got dtype {t.dtype}; "
                    "for logits/probabilities pass .argmax(dim=1)"
                )
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; "
                "predictions must be resized to the mask size before update()"
            )
        device = self.matrix.device
        pred = pred.reshape(-1).to(device=device, dtype=torch.int64)
        target = target.reshape(-1).to(device=device, dtype=torch.int64)

        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        bad = (target < 0) | (target >= n)
        if bool(bad.any()):
            values = torch.unique(target[bad])[:10].tolist()
            raise ValueError(
                f"ground truth contains label(s) {values} outside [0, {n}) that are not "
                f"ignore_index={self.ignore_index}; the masks do not match num_classes={n} "
                "(wrong dataset/class list, or masks saved with a palette/RGB instead of ids)"
            )
        bad = (pred < 0) | (pred >= n)
        if bool(bad.any()):
            values = torch.unique(pred[bad])[:10].tolist()
            raise ValueError(
                f"predictions contain class id(s) {values} outside [0, {n}); the model has "
                f"a different number of classes than num_classes={n}"
            )
        # One bincount over flattened (row, col) pairs is the fastest exact way to fill
        # the matrix on both CPU and GPU.
        counts = torch.bincount(target * n + pred, minlength=n * n)
        self.matrix += counts.reshape(n, n)

    def reset(self) -> None:
        """Zero all counts (start a new evaluation)."""
        self.matrix.zero_()

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over all ranks in place when ``torch.distributed`` is initialised.

        A no-op in a single process. With NCCL the matrix must be on this rank's GPU
        (``device=`` at construction). Every rank must call it (it is a collective).

        Returns:
            ``self``, for chaining.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix, op=torch.distributed.ReduceOp.SUM)
        return self

    # ------------------------------------------------------------------ metrics
    def _stats(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.matrix.double()
        return m.diagonal(), m.sum(dim=1), m.sum(dim=0)

    @property
    def total(self) -> int:
        """Number of counted (non-ignored) pixels."""
        return int(self.matrix.sum())

    @property
    def iou(self) -> torch.Tensor:
        """Per-class IoU, ``(C,)`` float64 on CPU; NaN where the class has an empty union."""
        tp, gt, pred = self._stats()
        union = gt + pred - tp
        iou = tp / union.clamp(min=1)
        iou[union == 0] = float("nan")
        return iou.cpu()

    @property
    def miou(self) -> float:
        """Mean IoU over classes with a non-empty union (see the class docstring)."""
        return _nanmean(self.iou)

    @property
    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels; NaN if nothing was counted."""
        tp, gt, _ = self._stats()
        total = float(gt.sum())
        return float(tp.sum()) / total if total > 0 else float("nan")

    @property
    def class_accuracy(self) -> torch.Tensor:
        """Per-class recall ``TP / GT``, ``(C,)`` float64 on CPU; NaN for classes absent from GT."""
        tp, gt, _ = self._stats()
        acc = tp / gt.clamp(min=1)
        acc[gt == 0] = float("nan")
        return acc.cpu()

    @property
    def mean_class_accuracy(self) -> float:
        """Mean of :attr:`class_accuracy` over classes present in the ground truth."""
        return _nanmean(self.class_accuracy)

    @property
    def fw_iou(self) -> float:
        """Frequency-weighted IoU: per-class IoU weighted by ground-truth pixel share."""
        _, gt, _ = self._stats()
        total = float(gt.sum())
        if total == 0:
            return float("nan")
        freq = (gt / total).cpu()
        iou = self.iou
        present = freq > 0  # a class with GT > 0 always has a finite IoU
        return float((freq[present] * iou[present]).sum())

    # ------------------------------------------------------------------ reporting
    def _names(self, class_names: Optional[Sequence[str]]) -> List[str]:
        if class_names is None:
            return [f"class_{i}" for i in range(self.num_classes)]
        names = [str(c) for c in class_names]
        if len(names) != self.num_classes:
            raise ValueError(
                f"got {len(names)} class names for a {self.num_classes}-class confusion matrix"
            )
        if len(set(names)) != len(names):
            dupes = sorted({c for c in names if names.count(c) > 1})
            raise ValueError(f"class names must be unique; duplicated: {dupes}")
        return names

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """JSON-able metrics; fractions in [0, 1], NaN written as ``None``.

        Args:
            class_names: ``C`` unique names; defaults to ``class_0 .. class_{C-1}``.

        Returns:
            ``{"mIoU", "pixel_accuracy", "mean_class_accuracy", "fw_iou", "pixels",
            "num_classes", "ignore_index", "classes_in_miou", "per_class": {name: {"iou",
            "accuracy", "gt_pixels", "pred_pixels"}}}`` with ``per_class`` in class order.
        """
        names = self._names(class_names)
        iou, acc = self.iou, self.class_accuracy
        _, gt, pred = self._stats()
        per_class = {
            name: {
                "iou": _num(iou[i]),
                "accuracy": _num(acc[i]),
                "gt_pixels": int(gt[i]),
                "pred_pixels": int(pred[i]),
            }
            for i, name in enumerate(names)
        }
        return {
            "mIoU": _num(self.miou),
            "pixel_accuracy": _num(self.pixel_accuracy),
            "mean_class_accuracy": _num(self.mean_class_accuracy),
            "fw_iou": _num(self.fw_iou),
            "pixels": self.total,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "classes_in_miou": int((~torch.isnan(iou)).sum()),
            "per_class": per_class,
        }

    def format_table(self, class_names: Optional[Sequence[str]] = None) -> str:
        """Human-readable per-class table plus the summary metrics, in percent.

        Classes with an empty union (not part of the mIoU) show ``-``.
        """
        names = self._names(class_names)
        iou, acc = self.iou, self.class_accuracy
        _, gt, _ = self._stats()
        width = max(12, max(len(n) for n in names))
        lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}  {'GT pixels':>12}"]
        lines.append("-" * len(lines[0]))
        for i, name in enumerate(names):
            lines.append(
                f"{name:<{width}}  {_pct(iou[i]):>6}  {_pct(acc[i]):>6}  {int(gt[i]):>12d}"
            )
        lines.append("-" * len(lines[0]))
        n_valid = int((~torch.isnan(iou)).sum())
        lines.append(
            f"mIoU {_pct(self.miou)} (over {n_valid}/{self.num_classes} classes)  "
            f"pixel acc {_pct(self.pixel_accuracy)}  mean acc {_pct(self.mean_class_accuracy)}  "
            f"fwIoU {_pct(self.fw_iou)}  pixels {self.total}"
        )
        return "\n".join(lines)

    def normalized(self) -> torch.Tensor:
        """Row-normalised matrix ``(C, C)`` float64 on CPU: each ground-truth row sums to 1.

        Rows of classes absent from the ground truth are all zero.
        """
        m = self.matrix.double().cpu()
        return m / m.sum(dim=1, keepdim=True).clamp(min=1)

    def save_confusion_png(
        self, path: PathLike, class_names: Optional[Sequence[str]] = None
    ) -> Path:
        """Render the row-normalised confusion matrix as a heatmap PNG (PIL only).

        Rows are ground truth, columns predictions, colour = share of the row's pixels
        (0 dark blue .. 1 yellow, viridis-like) with a colour bar. Class names label the
        axes when there are at most 40 classes; cells are annotated with percentages when
        they are large enough to read. Rows of classes absent from the ground truth are
        drawn grey.

        Args:
            path: output file; parent directories are created.
            class_names: ``C`` names for the axes (default ``class_i``).

        Returns:
            The written path.
        """
        image, _ = render_confusion(self.normalized(), self._names(class_names), self.matrix)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        return path

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={self.total}, mIoU={self.miou:.4f})"
        )


# ---------------------------------------------------------------------- helpers
def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")


def _num(value: Union[float, torch.Tensor]) -> Optional[float]:
    value = float(value)
    return None if math.isnan(value) else value


def _pct(value: Union[float, torch.Tensor]) -> str:
    value = float(value)
    return "-" if math.isnan(value) else f"{100.0 * value:.2f}"


# ---------------------------------------------------------------------- boundary metrics
# Trimap (paper Fig. 5) and boundary F-score (Csurka et al. 2013). Both work on one mask at a
# time, (H, W) integer tensors, on any device; the morphology is max-pooling, so it is exact
# (integer-valued) and needs neither scipy nor OpenCV.

TRIMAP_SOURCES = ("void", "boundary")


def _check_mask(target: torch.Tensor, name: str = "target") -> None:
    if not isinstance(target, torch.Tensor) or target.dim() != 2:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"{name} must be one (H, W) mask, got {shape}")


def _dilate3(mask: torch.Tensor) -> torch.Tensor:
    """One dilation by the 3x3 square (8-neighbourhood); ``mask`` bool ``(H, W)``."""
    # max_pool2d pads with -inf, so nothing outside the image is ever "set".
    return F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0.5


def chebyshev_distance(seed: torch.Tensor, max_distance: int) -> torch.Tensor:
    """Chessboard (Chebyshev, L-inf) distance of every pixel to the nearest ``seed`` pixel.

    Computed by ``max_distance`` successive 3x3 dilations, so ``distance <= w`` is exactly the
    dilation of ``seed`` by the ``(2w+1) x (2w+1)`` square.

    Args:
        seed: bool ``(H, W)``.
        max_distance: distances above it are not resolved.

    Returns:
        int64 ``(H, W)``: 0 on the seed, ``d`` for ``d <= max_distance``, ``max_distance + 1``
        for pixels farther away (or everywhere when ``seed`` is empty).
    """
    _check_mask(seed, "seed")
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    seed = seed.bool()
    distance = torch.full(seed.shape, max_distance + 1, dtype=torch.int64, device=seed.device)
    distance[seed] = 0
    reached = seed
    for d in range(1, max_distance + 1):
        if bool(reached.all()):
            break
        grown = _dilate3(reached)
        distance[grown & ~reached] = d
        reached = grown
    return distance


def label_boundary(target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixels where the ground-truth label changes: the seed of the ``"boundary"`` trimap.

    A non-void pixel is on the boundary when one of its 4 neighbours carries another label
    (void included, so an object framed by a void ring is outlined too). The image border is
    not a boundary. Both sides of a class edge are marked, so the band is symmetric.

    Args:
        target: ``(H, W)`` integer labels.
        ignore_index: the void label; void pixels are never boundary pixels.

    Returns:
        bool ``(H, W)``.
    """
    _check_mask(target)
    t = target.long()
    edge = torch.zeros_like(t, dtype=torch.bool)
    vertical = t[1:, :] != t[:-1, :]
    horizontal = t[:, 1:] != t[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge & (t != ignore_index)


def trimap_bands(
    target: torch.Tensor,
    widths: Sequence[int],
    *,
    source: str = "void",
    ignore_index: int = 255,
) -> List[torch.Tensor]:
    """The trimap band of every width: the pixels whose mIoU the paper's Fig. 5 plots.

    ``band(w) = {p : p is not void and chebyshev_distance(p, seed) <= w}``, i.e. the seed
    dilated by the ``(2w+1) x (2w+1)`` square structuring element, minus the void pixels.

    * ``source="void"`` (the paper, PASCAL VOC): the seed is the void (``ignore_index``)
      annotation, which VOC draws as a ~5 px ring along every object boundary. Width 0 is
      the void set itself, so its band is **empty** (void is never counted); width 1 adds
      the pixels touching void, and so on.
    * ``source="boundary"`` (datasets without a void border: Cityscapes, ADE20K, folder):
      the seed is :func:`label_boundary`, the non-void pixels next to another label. Width
      0 is then the 1-2 px wide line of boundary pixels itself.

    Args:
        target: ``(H, W)`` integer labels.
        widths: band widths in pixels, ``>= 0``, in any order.
        source: ``"void"`` or ``"boundary"``.
        ignore_index: the void label.

    Returns:
        One bool ``(H, W)`` mask per width, in the order of ``widths``; a mask may be empty
        (an image without void has an empty ``"void"`` band at every width).
    """
    _check_mask(target)
    if source not in TRIMAP_SOURCES:
        raise ValueError(f"unknown trimap source {source!r}; choose from {list(TRIMAP_SOURCES)}")
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 0:
        raise ValueError(f"trimap widths must be a non-empty list of integers >= 0, got {widths}")
    valid = target != ignore_index
    seed = ~valid if source == "void" else label_boundary(target, ignore_index)
    distance = chebyshev_distance(seed, max(widths))
    return [(distance <= w) & valid for w in widths]


class TrimapMeter:
    """One confusion matrix per trimap width, filled in one pass over the data.

    Args:
        widths: band widths in pixels (``>= 0``, unique), see :func:`trimap_bands`.
        num_classes: ``C``.
        source: ``"void"`` (the paper) or ``"boundary"`` (ground-truth class edges).
        ignore_index: the void label.
        device: where the matrices live.
    """

    element = "square"  # (2w+1) x (2w+1), i.e. Chebyshev distance <= w; see trimap_bands

    def __init__(
        self,
        widths: Sequence[int],
        num_classes: int,
        *,
        source: str = "void",
        ignore_index: int = 255,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 0 or len(set(widths)) != len(widths):
            raise ValueError(f"trimap widths must be unique integers >= 0, got {widths}")
        if source not in TRIMAP_SOURCES:
            raise ValueError(f"unknown trimap source {source!r}; choose from {list(TRIMAP_SOURCES)}")
        self.widths = widths
        self.source = source
        self.ignore_index = ignore_index
        self.matrices = [ConfusionMatrix(num_classes, ignore_index, device=device) for _ in widths]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predictions ``(B, H, W)`` (or one ``(H, W)``) against their ground truth."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if target.dim() == 2:
            pred, target = pred[None], target[None]
        for p, t in zip(pred, target):
            t = t.to(self.matrices[0].matrix.device)
            p = p.to(t.device)
            for band, cm in zip(trimap_bands(t, self.widths, source=self.source, ignore_index=self.ignore_index),
                                self.matrices):
                cm.update(p[band], t[band])

    def all_reduce(self) -> "TrimapMeter":
        """Sum every width's matrix over the ranks (a collective, see :meth:`ConfusionMatrix.all_reduce`)."""
        for cm in self.matrices:
            cm.all_reduce()
        return self

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """JSON-able: ``{"source", "element", "widths": [{"width", "mIoU", "pixel_accuracy",
        "pixels", "empty", "per_class_iou"}]}``; an empty band has ``mIoU None`` and
        ``"empty": True`` (it is not a score of 0)."""
        rows = []
        for w, cm in zip(self.widths, self.matrices):
            names = cm._names(class_names)
            empty = cm.total == 0
            rows.append({
                "width": w,
                "mIoU": None if empty else _num(cm.miou),
                "pixel_accuracy": None if empty else _num(cm.pixel_accuracy),
                "pixels": cm.total,
                "empty": empty,
                "per_class_iou": {n: _num(v) for n, v in zip(names, cm.iou)},
            })
        return {
            "source": self.source,
            "element": f"{self.element} (2w+1)x(2w+1): Chebyshev distance <= w",
            "seed": "void (ignore) pixels" if self.source == "void" else
                    "ground-truth class boundaries (pixels with a 4-neighbour of another label)",
            "widths": rows,
        }

    def format_table(self) -> str:
        """``width  mIoU  pixels`` lines, in percent; ``empty`` for bands without pixels."""
        lines = [f"trimap ({self.source} seed, square element)", f"{'width':>5}  {'mIoU':>6}  {'pixels':>10}"]
        for w, cm in zip(self.widths, self.matrices):
            value = "empty" if cm.total == 0 else _pct(cm.miou)
            lines.append(f"{w:>5}  {value:>6}  {cm.total:>10d}")
        return "\n".join(lines)


def binary_boundary(mask: torch.Tensor) -> torch.Tensor:
    """The inner boundary of a binary mask: set pixels with a 4-neighbour that is not set.

    The image border does not count as a boundary (the neighbour outside is taken to equal
    the pixel), so a class filling the image up to its edge has no boundary there.

    Args:
        mask: bool ``(H, W)``.

    Returns:
        bool ``(H, W)``.
    """
    _check_mask(mask, "mask")
    m = mask.bool()
    inner = m.clone()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _dilate_disk(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``mask`` dilated by the Euclidean disk ``dy^2 + dx^2 <= radius^2``."""
    if radius == 0:
        return mask
    r = torch.arange(-radius, radius + 1, device=mask.device, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius).float()
    # Sums of 0/1 products: exact in float32 for any realistic kernel size.
    hit = F.conv2d(mask[None, None].float(), disk[None, None], padding=radius)[0, 0]
    return hit > 0.5


def boundary_f1(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    tolerance: int,
    *,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Per-class boundary F1 of one image (the BF score of Csurka et al., BMVC 2013).

    For class ``c``: ``B_gt`` / ``B_pred`` are the :func:`binary_boundary` pixels of
    ``target == c`` / ``pred == c`` (predictions on void pixels are dropped first: void is
    not judged). Precision = share of ``B_pred`` within Euclidean distance ``<= tolerance``
    of ``B_gt``, recall = share of ``B_gt`` within ``tolerance`` of ``B_pred``,
    ``F1 = 2PR / (P + R)`` (0 when either is 0).

    Args:
        pred: ``(H, W)`` predicted ids.
        target: ``(H, W)`` ground truth with ``ignore_index`` for void.
        num_classes: ``C``.
        tolerance: the distance in pixels (0 = the boundary pixels must coincide).
        ignore_index: the void label.

    Returns:
        float64 ``(C,)``: NaN for classes with no boundary pixel in either mask (nothing to
        score); 0 when only one of the two has boundary pixels.
    """
    _check_mask(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if tolerance < 0:
        raise ValueError(f"boundary tolerance must be >= 0 pixels, got {tolerance}")
    valid = target != ignore_index
    pred = torch.where(valid, pred.long(), torch.full_like(pred.long(), -1))
    out = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    present = torch.unique(torch.cat([pred[valid], target[valid].long()]))
    for c in present.tolist():
        if not 0 <= c < num_classes:
            continue
        b_gt = binary_boundary(target == c)
        b_pred = binary_boundary(pred == c)
        n_gt, n_pred = int(b_gt.sum()), int(b_pred.sum())
        if n_gt == 0 and n_pred == 0:
            continue
        if n_gt == 0 or n_pred == 0:
            out[c] = 0.0
            continue
        precision = int((b_pred & _dilate_disk(b_gt, tolerance)).sum()) / n_pred
        recall = int((b_gt & _dilate_disk(b_pred, tolerance)).sum()) / n_gt
        out[c] = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return out


class BoundaryFScore:
    """Dataset boundary F-score: per class, the mean of :func:`boundary_f1` over the images
    where the class has boundary pixels (in the ground truth or the prediction); the mean BF
    is the mean of that over the classes scored at least once (Csurka et al. 2013).

    Args:
        num_classes: ``C``.
        tolerance: distance in pixels.
        ignore_index: the void label.
    """

    def __init__(self, num_classes: int, tolerance: int, *, ignore_index: int = 255) -> None:
        if tolerance < 0:
            raise ValueError(f"boundary tolerance must be >= 0 pixels, got {tolerance}")
        self.num_classes = num_classes
        self.tolerance = int(tolerance)
        self.ignore_index = ignore_index
        self.sums = torch.zeros(num_classes, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add ``(B, H, W)`` (or ``(H, W)``) predictions; returns the last image's per-class F1."""
        if target.dim() == 2:
            pred, target = pred[None], target[None]
        scores = torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        for p, t in zip(pred, target):
            scores = boundary_f1(p.cpu(), t.cpu(), self.num_classes, self.tolerance, ignore_index=self.ignore_index)
            scored = ~torch.isnan(scores)
            self.sums[scored] += scores[scored]
            self.counts[scored] += 1
        return scores

    def all_reduce(self) -> "BoundaryFScore":
        """Sum over the ranks when a process group exists (gloo: CPU tensors)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.sums, self.counts):
                moved = t.to(_collective_device())
                torch.distributed.all_reduce(moved)
                t.copy_(moved.cpu())
        return self

    @property
    def per_class(self) -> torch.Tensor:
        """float64 ``(C,)``; NaN for classes never scored."""
        out = self.sums / self.counts.clamp(min=1)
        out[self.counts == 0] = float("nan")
        return out

    @property
    def mean(self) -> float:
        """Mean BF over the classes scored at least once."""
        return _nanmean(self.per_class)

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """``{"tolerance_px", "mean", "per_class": {name: value or None}, "images_per_class"}``."""
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(self.num_classes)]
        return {
            "tolerance_px": self.tolerance,
            "distance": "Euclidean",
            "mean": _num(self.mean),
            "per_class": {n: _num(v) for n, v in zip(names, self.per_class)},
            "images_per_class": {n: int(c) for n, c in zip(names, self.counts)},
        }


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def image_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """One image's IoU: the mean over the classes present in its ground truth or prediction
    (non-void pixels), as :attr:`ConfusionMatrix.miou` on that image alone; NaN if the image
    has no non-void pixel."""
    cm = ConfusionMatrix(num_classes, ignore_index, device=target.device)
    cm.update(pred, target)
    return cm.miou
