"""Evaluation loop: a confusion matrix over a whole split, single- or multi-process.

Distributed evaluation must count every pixel exactly once. ``DistributedSampler`` pads
the index list to a multiple of the world size by repeating samples (or drops samples
with ``drop_last``), which silently changes mIoU; :class:`ShardSampler` splits indices
without padding, shards may differ in length by one, and the per-rank matrices are summed
with one ``all_reduce``. The result equals the single-process matrix exactly (integer
counts; each image is predicted the same way on any rank).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import warnings
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Sized,
    Tuple,
    Union,
)

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, Sampler
from tqdm import tqdm

from deeplab._utils import unwrap_model
from deeplab.config import InferenceConfig
from deeplab.eval.inference import predict_mask
from deeplab.eval.metrics import BoundaryFScore, ConfusionMatrix, Meter, TrimapMeter, image_miou

__all__ = [
    "EvalResult",
    "ImageScore",
    "ImageScores",
    "KeepPredictions",
    "ShardSampler",
    "WorstImage",
    "evaluate",
    "evaluate_detailed",
    "shard_indices",
]


@dataclass
class ImageScore:
    """One image's scores: ``index`` in the dataset, ``iou`` (mean IoU over the classes in
    its ground truth or prediction; ``None`` for an image without non-void pixels),
    ``pixels`` (non-void), ``boundary_f`` (mean over its classes, when measured)."""

    index: int
    iou: Optional[float]
    pixels: int
    boundary_f: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)


@dataclass
class WorstImage:
    """A low-scoring image kept for a triptych: its score, prediction and ground truth
    (``(H, W)`` int numpy arrays on the CPU)."""

    score: ImageScore
    prediction: np.ndarray
    target: np.ndarray


@dataclass
class EvalResult:
    """What :func:`evaluate_detailed` measured in one pass."""

    confusion: ConfusionMatrix
    trimap: Optional[TrimapMeter] = None
    boundary_f: Optional[BoundaryFScore] = None
    per_image: List[ImageScore] = field(default_factory=list)
    worst: List[WorstImage] = field(default_factory=list)

    def sections(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """The extra ``report.json`` sections (``trimap``, ``boundary_f``, ``per_image``)
        of what was measured, for :func:`write_report`'s ``sections``."""
        out: Dict[str, Any] = {}
        if self.trimap is not None:
            out["trimap"] = self.trimap.summary(class_names)
        if self.boundary_f is not None:
            out["boundary_f"] = self.boundary_f.summary(class_names)
        if self.per_image:
            out["per_image"] = [s.to_dict() for s in self.per_image]
        return out


def _sample_order(loader: Iterable[Any]) -> Optional[List[int]]:
    """Dataset indices in the order the loader yields them (``None`` if unknown)."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, Sampler):
        return None
    # A sampler is re-iterable; a shuffling one would give another order than the loop's.
    if isinstance(sampler, torch.utils.data.RandomSampler):
        return None
    return [int(i) for i in sampler]


def _keep_worst(heap: List[Tuple[float, int, WorstImage]], n: int, score: ImageScore,
                pred: torch.Tensor, mask: torch.Tensor) -> None:
    """Keep the ``n`` lowest-IoU images in a max-heap on IoU (heapq is a min-heap: store -iou)."""
    assert score.iou is not None
    key = (-score.iou, -score.index)
    if len(heap) >= n and key <= (heap[0][0], heap[0][1]):
        return  # not worse than the best of the kept ones
    entry = WorstImage(score, pred.detach().cpu().numpy().astype(np.int64), mask.detach().cpu().numpy().astype(np.int64))
    item = (key[0], key[1], entry)
    if len(heap) < n:
        heapq.heappush(heap, item)
    else:
        heapq.heapreplace(heap, item)


def _num_or_none(value: float) -> Optional[float]:
    return None if math.isnan(value) else float(value)


def _nanmean_float(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_indices(num_samples: int, num_replicas: int, rank: int) -> List[int]:
    """Indices of ``range(num_samples)`` for ``rank``: every ``num_replicas``-th from ``rank``.

    The shards are disjoint, cover everything, and are never padded: with 7 samples and
    2 ranks, rank 0 gets ``[0, 2, 4, 6]`` and rank 1 ``[1, 3, 5]``. Interleaving (rather
    than contiguous blocks) balances the work when a dataset is sorted by image size.
    """
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} outside [0, num_replicas={num_replicas})")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return list(range(rank, num_samples, num_replicas))


class ShardSampler(Sampler[int]):
    """Sequential sampler over this rank's :func:`shard_indices`, with no padding.

    Use it for evaluation DataLoaders instead of ``DistributedSampler``.

    Args:
        data: the dataset (anything with ``len``) or its length.
        num_replicas: number of ranks; defaults to the process group's world size (1
            without one).
        rank: this rank; defaults to the process group's rank (0 without one).
    """

    def __init__(
        self,
        data: Union[Sized, int],
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        self.num_samples = int(data) if isinstance(data, int) else len(data)
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if initialised else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        self.indices = shard_indices(self.num_samples, self.num_replicas, self.rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _check_sampler(loader: Iterable[Any]) -> None:
    """Refuse a DistributedSampler that repeats or drops samples (it would skew mIoU)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        n = len(sampler.dataset)  # type: ignore[arg-type]
        if sampler.total_size != n:
            how = "repeats" if sampler.total_size > n else "drops"
            raise ValueError(
                f"the evaluation DataLoader uses a DistributedSampler that {how} "
                f"{abs(sampler.total_size - n)} of {n} samples to split them evenly over "
                f"{sampler.num_replicas} ranks, which changes the confusion matrix; use "
                "deeplab.eval.evaluate.ShardSampler(dataset) instead"
            )


def _split_batch(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        try:
            return batch["image"], batch["mask"]
        except KeyError:
            raise TypeError(
                f"a dict batch needs 'image' and 'mask' keys, got {sorted(batch)}"
            ) from None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"the loader must yield (image (B,3,H,W), mask (B,H,W)) pairs, got {type(batch).__name__}"
    )


def _set_eval(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    # Remember every module's own flag: a trainer may keep some layers in eval mode on
    # purpose (frozen BatchNorm for OS 8 fine-tuning), which model.train() would undo.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    return modes


class ImageScores:
    """The per-image meter: every image's IoU (and boundary F, read from a
    :class:`~deeplab.eval.boundary.BoundaryFScore` updated before it) and the ``worst`` lowest.

    Args:
        num_classes, ignore_index: as the confusion matrix's.
        order: dataset index of each sample in the loader's order (``None``: 0, 1, ...).
        worst: keep the predictions and masks of this many lowest-IoU images.
        boundary: the boundary meter whose per-image scores go into each :class:`ImageScore`.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, order: Optional[List[int]] = None,
                 worst: int = 0, boundary: Optional[BoundaryFScore] = None) -> None:
        if worst < 0:
            raise ValueError(f"worst must be >= 0, got {worst}")
        self.num_classes, self.ignore_index, self.order, self.worst = num_classes, ignore_index, order, worst
        self.boundary = boundary
        self.scores: List[ImageScore] = []
        self.heap: List[Tuple[float, int, WorstImage]] = []
        self.seen = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        for j in range(int(pred.shape[0])):
            position = self.seen + j
            index = self.order[position] if self.order is not None and position < len(self.order) else position
            image_bf = self.boundary.last_batch[j] if self.boundary is not None else None
            score = ImageScore(
                index=index,
                iou=_num_or_none(image_miou(pred[j], target[j], self.num_classes, self.ignore_index)),
                pixels=int((target[j] != self.ignore_index).sum()),
                boundary_f=_num_or_none(_nanmean_float(image_bf)) if image_bf is not None else None,
            )
            self.scores.append(score)
            if self.worst > 0 and score.iou is not None:
                _keep_worst(self.heap, self.worst, score, pred[j], target[j])
        self.seen += int(pred.shape[0])

    def all_reduce(self) -> "ImageScores":
        """Gather every rank's scores and kept images on every rank."""
        if dist.is_available() and dist.is_initialized():
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.scores, self.heap))
            self.scores = [s for part, _ in gathered for s in part]
            self.heap = [h for _, part in gathered for h in part]
        return self

    def worst_images(self) -> List[WorstImage]:
        """The ``worst`` lowest-IoU images, worst first."""
        return [entry for _, _, entry in sorted(self.heap, key=lambda h: (-h[0], -h[1]))][:self.worst]

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        return {"per_image": [s.to_dict() for s in sorted(self.scores, key=lambda s: s.index)]}


class KeepPredictions:
    """A meter that keeps every prediction (CPU ``(H, W)`` tensors, in loader order) for the overlays."""

    def __init__(self) -> None:
        self.predictions: List[torch.Tensor] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.predictions.extend(p.cpu() for p in pred)

    def all_reduce(self) -> "KeepPredictions":
        return self

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        return {"images": len(self.predictions)}


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    meters: Optional[Sequence[Meter]] = None,
    inference: InferenceConfig = InferenceConfig(),
    *,
    num_classes: Optional[int] = None,
    ignore_index: int = 255,
    device: Union[str, torch.device] = "cpu",
    distributed: Optional[bool] = None,
    progress: bool = True,
) -> ConfusionMatrix:
    """Run ``model`` over every sample of ``loader`` once and update every meter: the one
    evaluation loop (``deeplab eval``, training's validation, the demo).

    The model is put in eval mode for the loop and every submodule's previous mode is
    restored afterwards. Predictions come from :func:`deeplab.eval.inference.predict_mask`
    with the given :class:`~deeplab.config.InferenceConfig`; pixels labelled ``ignore_index`` are not counted.

    Distributed use (``torch.distributed`` initialised, more than one process): build the
    loader with :class:`ShardSampler` so each rank evaluates its own shard, call
    ``evaluate`` on *every* rank; every meter is all-reduced and every rank returns the
    full-dataset figures. A ``DistributedSampler`` that would pad or drop samples is
    refused. To evaluate on one rank only while a process group exists, pass
    ``distributed=False`` (otherwise the collective would wait for the other ranks forever).

    Args:
        model: maps ``(B, 3, H, W)`` to logits ``(B, C, H, W)``; already on ``device``. A
            DDP wrapper is unwrapped (its forward may synchronise buffers, which would
            hang with shards of unequal length).
        loader: yields ``(image, mask)`` (extra items ignored) or ``{"image", "mask"}``
            batches: ``image`` ``(B, 3, H, W)`` float normalised, ``mask`` ``(B, H, W)``
            integer class ids. Use batch size 1 for images of different sizes.
        meters: what to measure (:class:`~deeplab.eval.metrics.Meter`); a
            :class:`~deeplab.eval.metrics.ConfusionMatrix` among them is the one returned,
            else one of ``num_classes`` is added first.
        inference: how to predict (mode, scales, flip, windows, output stride, padding),
            see :func:`deeplab.eval.inference.predict_probs`.
        num_classes: ``C`` (needed when ``meters`` holds no confusion matrix).
        ignore_index: mask label excluded from the metric (of the confusion matrix added).
        device: where images, masks and the confusion matrix go.
        distributed: sum over ranks; ``None`` = whenever a multi-process group exists.
        progress: show a tqdm bar (rank 0 only) with the running (local) mIoU.

    Returns:
        The accumulated :class:`~deeplab.eval.metrics.ConfusionMatrix`; the other meters are
        updated in place.

    Raises:
        ValueError: model and ``device`` disagree, a DistributedSampler that pads/drops,
            masks whose size differs from their images, or labels outside the classes.
    """
    device = torch.device(device)
    meters = list(meters or [])
    cm = next((m for m in meters if isinstance(m, ConfusionMatrix)), None)
    if cm is None:
        if num_classes is None:
            raise ValueError("evaluate needs num_classes or a ConfusionMatrix among the meters")
        cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
        meters.insert(0, cm)
    net = _checked_model(model, device)
    _check_sampler(loader)
    if distributed is None:
        distributed = _dist_active()
    rank = dist.get_rank() if distributed else 0
    seen = 0
    bar = tqdm(loader, total=len(loader) if isinstance(loader, Sized) else None, desc="eval", unit="batch",
               disable=not progress or rank != 0, dynamic_ncols=True)
    modes = _set_eval(model)
    try:
        for batch in bar:
            image, mask = _batch_on(batch, device)
            pred = predict_mask(net, image, inference, num_classes=cm.num_classes)
            for meter in meters:
                meter.update(pred, mask)
            seen += int(image.shape[0])
            if not bar.disable:
                miou = cm.miou
                bar.set_postfix(mIoU=f"{100 * miou:.2f}" if not math.isnan(miou) else "-")
    finally:
        bar.close()
        for module, was_training in modes:
            module.training = was_training
    if distributed:
        for meter in meters:
            meter.all_reduce()
        _check_coverage(loader, seen, device)
    return cm


def _checked_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The unwrapped model, refused when its parameters are on another device type."""
    net = unwrap_model(model)
    param = next(net.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(
            f"the model is on {param.device} but device={str(device)!r}; call "
            f"model.to({str(device)!r}) first or pass device={str(param.device)!r}"
        )
    return net


def _batch_on(batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(image (B, C, H, W), mask (B, H, W))`` of a batch, on ``device``, shapes checked."""
    image, mask = _split_batch(batch)
    image = image.to(device, non_blocking=True)
    mask = torch.as_tensor(mask).to(device, non_blocking=True)
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3 or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)}; "
            "evaluation needs (B, H, W) masks at the image size (resize the image, "
            "never the mask, in the validation transform)"
        )
    return image, mask


def _check_coverage(loader: Iterable[Any], seen: int, device: torch.device) -> None:
    """Warn when the ranks' samplers did not see every sample exactly once."""
    count = torch.tensor([seen], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    total = int(count.item())
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, Sized) and total != len(dataset):
        warnings.warn(
            f"distributed evaluation saw {total} samples in total for a dataset of "
            f"{len(dataset)}: the ranks' samplers do not partition the dataset (use "
            "ShardSampler), so pixels were counted more or fewer times than once",
            stacklevel=3,
        )


def evaluate_detailed(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_classes: int,
    ignore_index: int = 255,
    device: Union[str, torch.device] = "cpu",
    inference: InferenceConfig = InferenceConfig(),
    distributed: Optional[bool] = None,
    progress: bool = True,
    trimap_widths: Optional[Sequence[int]] = None,
    trimap_source: str = "void",
    boundary_tolerance: Optional[int] = None,
    per_image: bool = False,
    worst: int = 0,
) -> EvalResult:
    """:func:`evaluate` with the boundary meters and per-image scores, in the same one pass.

    Every option off gives exactly :func:`evaluate`'s confusion matrix.

    Args:
        model, loader, num_classes, ignore_index, device, inference, distributed, progress:
            as for :func:`evaluate`.
        trimap_widths: widths in pixels: one confusion matrix per width over the trimap band
            (:class:`~deeplab.eval.metrics.TrimapMeter`).
        trimap_source: ``"void"`` (the paper: dilate the void annotation) or ``"boundary"``
            (dilate the ground truth's class edges, for datasets without a void border).
        boundary_tolerance: pixels; also accumulate the boundary F-score at this tolerance.
        per_image: record every image's IoU (mean over the classes it contains).
        worst: keep the predictions and masks of this many lowest-IoU images.

    Returns:
        An :class:`EvalResult`; under ``torch.distributed`` every rank gets the full result.
    """
    if worst < 0:
        raise ValueError(f"worst must be >= 0, got {worst}")
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    meters: List[Meter] = [cm]
    trimap = (TrimapMeter(trimap_widths, num_classes, source=trimap_source, ignore_index=ignore_index, device=device)
              if trimap_widths else None)
    bf = BoundaryFScore(num_classes, boundary_tolerance, ignore_index=ignore_index) if boundary_tolerance is not None else None
    images = (ImageScores(num_classes, ignore_index=ignore_index, order=_sample_order(loader), worst=worst, boundary=bf)
              if per_image or worst > 0 else None)
    meters += [m for m in (trimap, bf, images) if m is not None]  # bf before images: they read its scores
    evaluate(model, loader, meters, inference, device=device, distributed=distributed, progress=progress)
    scores = sorted(images.scores, key=lambda s: s.index) if images is not None else []
    return EvalResult(confusion=cm, trimap=trimap, boundary_f=bf, per_image=scores,
                      worst=images.worst_images() if images is not None and worst > 0 else [])
