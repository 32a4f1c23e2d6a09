"""Segmentation losses: ``(logits (B, C, H, W), target (B, H, W)) -> scalar``.

Every loss here honours ``ignore_index`` (those pixels get neither loss nor gradient),
takes optional per-class ``weight`` and computes in float32 whatever the autocast dtype
(bf16 logits are upcast first), so all are finite under ``torch.autocast``.

=========  ===============================================================================
name       definition (``n`` = valid pixels, ``w_y`` = weight of the pixel's class, 1 if none)
=========  ===============================================================================
``ce``     ``sum_i w_{y_i} * CE_i / n`` (note: divided by the pixel count, not by ``sum w``,
           so the weights scale the loss as written and the global-batch normalisation of
           the loop stays exact).
``focal``  ``sum_i w_{y_i} * (1 - p_i)^gamma * CE_i / n`` (Lin et al. 2017, ``p_i`` the
           softmax probability of the target class; ``gamma = 0`` is ``ce``).
``ohem``   mmseg's ``OHEMPixelSampler``: with ``p_i`` the target-class probability, keep the
           valid pixels with ``p_i < max(thresh, p_(k))`` where ``p_(k)`` is the
           ``k = min_kept * B``-th smallest probability (so at least ``min_kept`` pixels per
           image survive); the loss is the weighted CE mean over the kept pixels.
``topk``   TF DeepLab's ``top_k_percent_pixels`` (``utils/train_utils.py``): the
           ``int(percent * B*H*W)`` largest pixel losses (ignored pixels count in ``B*H*W``
           with loss 0, as in TF), summed and divided by how many of them are non-zero.
``dice``   soft multiclass Dice: ``1 - mean_c w_c (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)``
           over the valid pixels of the batch, ``w`` normalised to mean 1.
``lovasz`` Lovász-softmax (Berman et al. 2018), classes present in the target, flat over the
           batch or averaged per image (``per_image=True``); weights average the per-class
           terms.
=========  ===============================================================================

Normalisation in training (see also :mod:`deeplab.train.loop`): the loop passes
``normalizer = global_valid_count / world_size``, the batch's valid pixels summed over every
micro-batch and every rank. ``ce`` and ``focal`` are pixel sums and are divided by it, so
DDP's gradient averaging yields exactly the gradient of the global-batch mean (a per-process
mean would weight a pixel of a mostly-ignore crop more than a pixel of a full crop).
``ohem``, ``topk``, ``dice`` and ``lovasz`` are not sums over pixels: each is computed on
one micro-batch **on one rank** (OHEM's ``min_kept`` and TF's ``k`` are per micro-batch per
rank, Dice's and Lovász's sums run over the micro-batch of that rank) and multiplied by
``valid_in_micro_batch / normalizer``, so the step's loss is the valid-pixel weighted mean
of the micro-batch losses; with one process and no accumulation it is the plain value.

:func:`build_criterion` turns a spec such as ``"ce"`` or ``"ce:1,dice:0.5"`` into a
:class:`Criterion` (a weighted sum); :func:`segmentation_loss` is the plain CE the loop
used before, kept for callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from deeplab._utils import ConfigError

__all__ = [
    "LOSSES",
    "Criterion",
    "build_criterion",
    "cross_entropy_loss",
    "dice_loss",
    "focal_loss",
    "lovasz_softmax_loss",
    "ohem_loss",
    "parse_loss_spec",
    "segmentation_loss",
    "topk_loss",
]

Normalizer = Union[float, torch.Tensor, None]


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    normalizer: Normalizer = None,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pixel-wise cross-entropy, summed and divided by ``normalizer``.

    Args:
        logits: ``(B, C, H, W)``; computed in float32 whatever the autocast dtype.
        target: ``(B, H, W)`` integer class ids, ``ignore_index`` where unlabelled.
        ignore_index: label contributing neither loss nor gradient.
        normalizer: divisor of the summed loss; default: this batch's valid-pixel count
            (the usual mean). The loop passes ``global_valid / world_size``.
        weight: optional ``(C,)`` class weights multiplying each pixel's loss.

    Returns:
        Scalar loss. A batch with no valid pixel gives 0 with zero gradients, not NaN.
    """
    w = None if weight is None else weight.to(device=logits.device, dtype=torch.float32)
    total = F.cross_entropy(logits.float(), target, weight=w, ignore_index=ignore_index, reduction="sum")
    if normalizer is None:
        normalizer = (target != ignore_index).sum().clamp_min(1)
    return total / normalizer


cross_entropy_loss = segmentation_loss


def _pixel_terms(logits: torch.Tensor, target: torch.Tensor, ignore_index: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_softmax (B, C, H, W) float32, valid (B, H, W) bool, safe target (B, H, W))``."""
    logp = F.log_softmax(logits.float(), dim=1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    return logp, valid, safe


def _class_weight(weight: Optional[torch.Tensor], safe: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-pixel weight ``w_{y_i}`` (ones without class weights)."""
    if weight is None:
        return torch.ones_like(like)
    return weight.to(device=like.device, dtype=torch.float32)[safe]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
               normalizer: Normalizer = None, weight: Optional[torch.Tensor] = None,
               gamma: float = 2.0) -> torch.Tensor:
    """Focal loss ``sum w_y (1 - p)^gamma (-log p) / normalizer`` over valid pixels.

    Args:
        logits, target, ignore_index, normalizer, weight: as :func:`segmentation_loss`.
        gamma: focusing exponent (0 gives cross-entropy).
    """
    logp, valid, safe = _pixel_terms(logits, target, ignore_index)
    logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    p_t = logp_t.exp()
    pixel = -((1.0 - p_t).clamp_min(0.0) ** gamma) * logp_t * _class_weight(weight, safe, logp_t)
    total = torch.where(valid, pixel, torch.zeros_like(pixel)).sum()
    if normalizer is None:
        normalizer = valid.sum().clamp_min(1)
    return total / normalizer


def ohem_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
              weight: Optional[torch.Tensor] = None, thresh: float = 0.7,
              min_kept: int = 100000) -> torch.Tensor:
    """Online hard example mining with mmseg's ``OHEMPixelSampler`` rule (probability mode).

    Keeps valid pixels whose target-class softmax probability is below
    ``max(thresh, p_sorted[min(min_kept * B, n_valid - 1)])``, then averages their
    (class-weighted) cross-entropy over the kept pixels. The selection is under no_grad.

    Args:
        logits, target, ignore_index, weight: as :func:`segmentation_loss`.
        thresh: probability threshold (mmseg default 0.7).
        min_kept: pixels kept at least, per image of the batch (mmseg default 100000).

    Returns:
        Scalar; 0 (with zero gradients) when no pixel is valid.
    """
    logp, valid, safe = _pixel_terms(logits, target, ignore_index)
    logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        keep = torch.zeros_like(valid)
        prob = logp_t.exp()[valid]
        if prob.numel() > 0:
            sorted_prob, _ = prob.sort()
            batch_kept = int(min_kept) * target.shape[0]
            min_threshold = float(sorted_prob[min(batch_kept, sorted_prob.numel() - 1)])
            threshold = max(min_threshold, float(thresh))
            keep[valid] = prob < threshold
    pixel = -logp_t * _class_weight(weight, safe, logp_t)
    total = torch.where(keep, pixel, torch.zeros_like(pixel)).sum()
    return total / keep.sum().clamp_min(1)


def topk_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
              weight: Optional[torch.Tensor] = None, percent: float = 0.25) -> torch.Tensor:
    """TF DeepLab's ``top_k_percent_pixels`` hard-pixel cross-entropy.

    Args:
        logits, target, ignore_index, weight: as :func:`segmentation_loss`.
        percent: fraction in ``(0, 1]`` of all ``B*H*W`` pixels whose losses are kept.
    """
    logp, valid, safe = _pixel_terms(logits, target, ignore_index)
    logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    pixel = torch.where(valid, -logp_t * _class_weight(weight, safe, logp_t), torch.zeros_like(logp_t)).flatten()
    k = max(1, int(float(percent) * pixel.numel()))
    top, _ = pixel.topk(k)
    present = (top != 0).sum().clamp_min(1)
    return top.sum() / present


def _weights_mean_one(weight: Optional[torch.Tensor], num_classes: int, device: torch.device) -> torch.Tensor:
    if weight is None:
        return torch.ones(num_classes, device=device)
    w = weight.to(device=device, dtype=torch.float32)
    return w / w.mean().clamp_min(1e-12)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
              weight: Optional[torch.Tensor] = None, smooth: float = 1.0) -> torch.Tensor:
    """Soft multiclass Dice loss over the valid pixels of the batch.

    ``1 - mean_c w_c * (2 sum_i p_ic g_ic + smooth) / (sum_i p_ic + sum_i g_ic + smooth)``
    with ``p`` the softmax, ``g`` the one-hot target and ``w`` normalised to mean 1.

    Args:
        logits, target, ignore_index, weight: as :func:`segmentation_loss`.
        smooth: additive smoothing (keeps absent classes finite).
    """
    num_classes = logits.shape[1]
    probs = F.softmax(logits.float(), dim=1)
    valid = (target != ignore_index).unsqueeze(1).float()
    safe = torch.where(target != ignore_index, target, torch.zeros_like(target))
    onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float() * valid
    probs = probs * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    w = _weights_mean_one(weight, num_classes, logits.device)
    return 1.0 - (w * dice).mean()


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman, Alg. 1)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def _lovasz_flat(probs: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Lovász-softmax of ``probs (P, C)``, ``labels (P,)`` over the classes present in ``labels``."""
    if labels.numel() == 0:
        return probs.sum() * 0.0
    terms: List[torch.Tensor] = []
    ws: List[torch.Tensor] = []
    for c in range(probs.shape[1]):
        fg = (labels == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = errors.sort(descending=True)
        terms.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
        ws.append(torch.ones((), device=probs.device) if weight is None else weight[c].float().to(probs.device))
    w = torch.stack(ws)
    return (torch.stack(terms) * w).sum() / w.sum().clamp_min(1e-12)


def lovasz_softmax_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
                        weight: Optional[torch.Tensor] = None, per_image: bool = False) -> torch.Tensor:
    """Lovász-softmax loss (Berman et al. 2018), classes present in the target.

    Args:
        logits, target, ignore_index, weight: as :func:`segmentation_loss`; ``weight``
            averages the per-class terms (weighted mean).
        per_image: average the loss of each image instead of one flat loss over the batch.
    """
    probs = F.softmax(logits.float(), dim=1)

    def flat(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])
        t = t.reshape(-1)
        keep = t != ignore_index
        return _lovasz_flat(p[keep], t[keep], weight)

    if per_image:
        return torch.stack([flat(probs[i:i + 1], target[i:i + 1]) for i in range(target.shape[0])]).mean()
    return flat(probs, target)


# --------------------------------------------------------------------------- the criterion

# Losses that are sums over pixels: divided by the loop's global normaliser.
PIXEL_SUM_LOSSES = ("ce", "focal")
LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "ce": segmentation_loss,
    "focal": focal_loss,
    "ohem": ohem_loss,
    "topk": topk_loss,
    "dice": dice_loss,
    "lovasz": lovasz_softmax_loss,
}


def parse_loss_spec(spec: str) -> List[Tuple[str, float]]:
    """``"ce"`` or ``"ce:1,dice:0.5"`` -> ``[("ce", 1.0), ("dice", 0.5)]``.

    Raises:
        ValueError: an unknown loss name (the message lists the choices), a bad or
            non-positive factor, a name given twice, or an empty spec.
    """
    terms: List[Tuple[str, float]] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, factor = part.partition(":")
        name = name.strip().lower()
        if name not in LOSSES:
            raise ConfigError(f"unknown loss {name!r} in {spec!r}; choose from {sorted(LOSSES)} "
                             "(a weighted sum is written 'ce:1,dice:0.5')")
        try:
            value = float(factor) if factor.strip() else 1.0
        except ValueError:
            raise ConfigError(f"loss factor {factor!r} of {name!r} in {spec!r} is not a number") from None
        if not value > 0:
            raise ConfigError(f"loss factor of {name!r} in {spec!r} must be > 0, got {value}")
        if any(n == name for n, _ in terms):
            raise ConfigError(f"loss {name!r} appears twice in {spec!r}")
        terms.append((name, value))
    if not terms:
        raise ConfigError(f"empty loss spec {spec!r}; e.g. 'ce' or 'ce:1,dice:0.5'")
    return terms


@dataclass
class Criterion:
    """A weighted sum of losses: ``criterion(logits, target, normalizer=None) -> scalar``.

    Attributes:
        terms: ``(name, factor)`` pairs.
        ignore_index: the ignore label.
        weight: ``(C,)`` class weights or ``None``.
        options: keyword options per loss name (e.g. ``{"ohem": {"thresh": 0.7}}``).
    """

    terms: List[Tuple[str, float]]
    ignore_index: int = 255
    weight: Optional[torch.Tensor] = None
    options: Optional[Dict[str, Dict[str, float]]] = None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, normalizer: Normalizer = None) -> torch.Tensor:
        """The loss of one micro-batch; ``normalizer`` as in the module docstring."""
        opts = self.options or {}
        total = logits.new_zeros((), dtype=torch.float32)
        valid: Optional[torch.Tensor] = None
        for name, factor in self.terms:
            fn = LOSSES[name]
            kwargs = dict(opts.get(name, {}))
            if name in PIXEL_SUM_LOSSES:
                value = fn(logits, target, ignore_index=self.ignore_index, weight=self.weight,
                           normalizer=normalizer, **kwargs)
            else:
                value = fn(logits, target, ignore_index=self.ignore_index, weight=self.weight, **kwargs)
                if normalizer is not None:
                    if valid is None:
                        valid = (target != self.ignore_index).sum().float()
                    value = value * (valid / normalizer)
            total = total + factor * value
        return total

    def describe(self) -> str:
        """The spec back, e.g. ``"ce:1,dice:0.5"``."""
        return ",".join(f"{n}:{f:g}" for n, f in self.terms)


def build_criterion(
    spec: str = "ce",
    *,
    ignore_index: int = 255,
    class_weights: Optional[Sequence[float]] = None,
    ohem_thresh: float = 0.7,
    ohem_min_kept: int = 100000,
    topk_percent: float = 0.25,
    focal_gamma: float = 2.0,
    dice_smooth: float = 1.0,
    lovasz_per_image: bool = False,
) -> Criterion:
    """The training criterion from a loss spec and the loss options (``TrainConfig`` fields).

    Args:
        spec: ``"ce"``, ``"ohem"``, ... or a weighted sum ``"ce:1,dice:0.5"``.
        ignore_index: the ignore label.
        class_weights: one weight per class, or ``None``.
        ohem_thresh, ohem_min_kept: see :func:`ohem_loss`.
        topk_percent: see :func:`topk_loss`.
        focal_gamma: see :func:`focal_loss`.
        dice_smooth: see :func:`dice_loss`.
        lovasz_per_image: see :func:`lovasz_softmax_loss`.

    Raises:
        ValueError: a bad spec or option.
    """
    terms = parse_loss_spec(spec)
    if not 0 < topk_percent <= 1:
        raise ConfigError(f"topk_percent must be in (0, 1], got {topk_percent}")
    weight = None
    if class_weights is not None:
        weight = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
        if weight.numel() == 0 or bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
            raise ConfigError(f"class weights must be finite and >= 0, got {list(class_weights)}")
    options = {
        "ohem": {"thresh": float(ohem_thresh), "min_kept": int(ohem_min_kept)},
        "topk": {"percent": float(topk_percent)},
        "focal": {"gamma": float(focal_gamma)},
        "dice": {"smooth": float(dice_smooth)},
        "lovasz": {"per_image": bool(lovasz_per_image)},
    }
    return Criterion(terms=terms, ignore_index=int(ignore_index), weight=weight, options=options)  # type: ignore[arg-type]
