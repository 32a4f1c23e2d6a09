"""Segmentation losses: ``(logits, target) -> scalar``.

Only cross-entropy for now; OHEM, focal and Dice join it here.

Loss normalisation in training: the loss of a step is the mean cross-entropy over all
valid (non-ignore) pixels of the *global* batch - every micro-batch of every process.
Each process divides its pixel-loss sum by ``global_valid_count / world_size`` (the
training step all-reduces the count before the forward pass), so DDP's gradient
averaging yields exactly the gradient of the global mean; a per-process mean would
weight a pixel of a mostly-ignore crop more than a pixel of a full crop.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

__all__ = ["segmentation_loss"]


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    normalizer: Union[float, torch.Tensor, None] = None,
) -> torch.Tensor:
    """Pixel-wise cross-entropy, summed and divided by ``normalizer``.

    Args:
        logits: ``(B, C, H, W)``; computed in float32 whatever the autocast dtype.
        target: ``(B, H, W)`` integer class ids, ``ignore_index`` where unlabelled.
        ignore_index: label contributing neither loss nor gradient.
        normalizer: divisor of the summed loss; default: this batch's valid-pixel count
            (the usual mean). The loop passes ``global_valid / world_size``.

    Returns:
        Scalar loss. A batch with no valid pixel gives 0 with zero gradients, not NaN.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    if normalizer is None:
        normalizer = (target != ignore_index).sum().clamp_min(1)
    return total / normalizer
