"""Boundary meters: the trimap (paper Fig. 5) and the boundary F-score (Csurka et al. 2013).

Both work on one mask at a time, (H, W) integer tensors, on any device; the morphology is
max-pooling, so it is exact (integer-valued) and needs neither scipy nor OpenCV.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from deeplab.eval.confusion import ConfusionMatrix, collective_device, nanmean, num_or_none, pct

__all__ = [
    "TRIMAP_SOURCES",
    "BoundaryFScore",
    "TrimapMeter",
    "binary_boundary",
    "boundary_f1",
    "chebyshev_distance",
    "label_boundary",
    "trimap_bands",
]


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
            names = cm.names_for(class_names)
            empty = cm.total == 0
            rows.append({
                "width": w,
                "mIoU": None if empty else num_or_none(cm.miou),
                "pixel_accuracy": None if empty else num_or_none(cm.pixel_accuracy),
                "pixels": cm.total,
                "empty": empty,
                "per_class_iou": {n: num_or_none(v) for n, v in zip(names, cm.iou)},
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
            value = "empty" if cm.total == 0 else pct(cm.miou)
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
        self.last_batch: List[torch.Tensor] = []  # per-class F1 of each image of the last update

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add ``(B, H, W)`` (or ``(H, W)``) predictions; returns the last image's per-class F1
        (every image's: :attr:`last_batch`)."""
        if target.dim() == 2:
            pred, target = pred[None], target[None]
        scores = torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        self.last_batch = []
        for p, t in zip(pred, target):
            scores = boundary_f1(p.cpu(), t.cpu(), self.num_classes, self.tolerance, ignore_index=self.ignore_index)
            scored = ~torch.isnan(scores)
            self.sums[scored] += scores[scored]
            self.counts[scored] += 1
            self.last_batch.append(scores)
        return scores

    def all_reduce(self) -> "BoundaryFScore":
        """Sum over the ranks when a process group exists (gloo: CPU tensors)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.sums, self.counts):
                moved = t.to(collective_device())
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
        return nanmean(self.per_class)

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """``{"tolerance_px", "mean", "per_class": {name: value or None}, "images_per_class"}``."""
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(self.num_classes)]
        return {
            "tolerance_px": self.tolerance,
            "distance": "Euclidean",
            "mean": num_or_none(self.mean),
            "per_class": {n: num_or_none(v) for n, v in zip(names, self.per_class)},
            "images_per_class": {n: int(c) for n, c in zip(names, self.counts)},
        }


