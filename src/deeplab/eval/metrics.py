"""Segmentation metrics as meters: numbers only (rendering lives in :mod:`deeplab.eval.report`).

Every meter follows one protocol (:class:`Meter`): ``update(pred, target)`` with ``(B, H, W)``
class-id tensors, ``all_reduce()`` to sum over the ranks of a process group, and
``summary(class_names)`` for the report. :func:`deeplab.eval.evaluate.evaluate` drives any list
of them in one pass.

* :mod:`deeplab.eval.confusion` - :class:`ConfusionMatrix` (mIoU and friends from one
  dataset-wide matrix, as the TF reference's streaming ``mean_iou``; never a mean of
  per-image scores, which over-weights small images and absent classes).
* :mod:`deeplab.eval.boundary` - :class:`TrimapMeter` (paper Fig. 5) and
  :class:`BoundaryFScore` (Csurka et al. 2013), with their morphology.
* :class:`ImageScores` (:mod:`deeplab.eval.evaluate`) - per-image IoU and the worst images.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Sequence, runtime_checkable

import torch

from deeplab.eval.boundary import (
    TRIMAP_SOURCES,
    BoundaryFScore,
    TrimapMeter,
    binary_boundary,
    boundary_f1,
    chebyshev_distance,
    label_boundary,
    trimap_bands,
)
from deeplab.eval.confusion import ConfusionMatrix, image_miou

__all__ = [
    "TRIMAP_SOURCES",
    "BoundaryFScore",
    "ConfusionMatrix",
    "Meter",
    "TrimapMeter",
    "binary_boundary",
    "boundary_f1",
    "chebyshev_distance",
    "image_miou",
    "label_boundary",
    "trimap_bands",
]


@runtime_checkable
class Meter(Protocol):
    """What :func:`deeplab.eval.evaluate.evaluate` drives: one update / all-reduce / summary protocol."""

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> Any:
        """Add predictions ``(B, H, W)`` against their ground truth ``(B, H, W)``."""

    def all_reduce(self) -> Any:
        """Sum over the ranks of the process group (a collective: every rank calls it)."""

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """JSON-able figures for the report."""
