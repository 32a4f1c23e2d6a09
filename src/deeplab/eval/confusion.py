"""The confusion-matrix meter: mIoU, pixel / class accuracy, FW-IoU from one dataset-wide matrix.

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

__all__ = ["ConfusionMatrix", "collective_device", "image_miou", "nanmean", "num_or_none", "pct"]

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
        return nanmean(self.iou)

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
        return nanmean(self.class_accuracy)

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
    def names_for(self, class_names: Optional[Sequence[str]]) -> List[str]:
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
        names = self.names_for(class_names)
        iou, acc = self.iou, self.class_accuracy
        _, gt, pred = self._stats()
        per_class = {
            name: {
                "iou": num_or_none(iou[i]),
                "accuracy": num_or_none(acc[i]),
                "gt_pixels": int(gt[i]),
                "pred_pixels": int(pred[i]),
            }
            for i, name in enumerate(names)
        }
        return {
            "mIoU": num_or_none(self.miou),
            "pixel_accuracy": num_or_none(self.pixel_accuracy),
            "mean_class_accuracy": num_or_none(self.mean_class_accuracy),
            "fw_iou": num_or_none(self.fw_iou),
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
        names = self.names_for(class_names)
        iou, acc = self.iou, self.class_accuracy
        _, gt, _ = self._stats()
        width = max(12, max(len(n) for n in names))
        lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}  {'GT pixels':>12}"]
        lines.append("-" * len(lines[0]))
        for i, name in enumerate(names):
            lines.append(
                f"{name:<{width}}  {pct(iou[i]):>6}  {pct(acc[i]):>6}  {int(gt[i]):>12d}"
            )
        lines.append("-" * len(lines[0]))
        n_valid = int((~torch.isnan(iou)).sum())
        lines.append(
            f"mIoU {pct(self.miou)} (over {n_valid}/{self.num_classes} classes)  "
            f"pixel acc {pct(self.pixel_accuracy)}  mean acc {pct(self.mean_class_accuracy)}  "
            f"fwIoU {pct(self.fw_iou)}  pixels {self.total}"
        )
        return "\n".join(lines)

    def normalized(self) -> torch.Tensor:
        """Row-normalised matrix ``(C, C)`` float64 on CPU: each ground-truth row sums to 1.

        Rows of classes absent from the ground truth are all zero.
        """
        m = self.matrix.double().cpu()
        return m / m.sum(dim=1, keepdim=True).clamp(min=1)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={self.total}, mIoU={self.miou:.4f})"
        )


# ---------------------------------------------------------------------- helpers
def nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")


def num_or_none(value: Union[float, torch.Tensor]) -> Optional[float]:
    value = float(value)
    return None if math.isnan(value) else value


def pct(value: Union[float, torch.Tensor]) -> str:
    value = float(value)
    return "-" if math.isnan(value) else f"{100.0 * value:.2f}"


def collective_device() -> torch.device:
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
