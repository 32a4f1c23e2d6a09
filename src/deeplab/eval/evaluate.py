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
import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
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

from deeplab._utils import atomic_write, jsonable, unwrap_model
from deeplab.config import InferenceConfig
from deeplab.eval.inference import predict_mask
from deeplab.eval.metrics import BoundaryFScore, ConfusionMatrix, TrimapMeter, image_miou

__all__ = [
    "EvalResult",
    "ImageScore",
    "ShardSampler",
    "WorstImage",
    "evaluate",
    "evaluate_detailed",
    "shard_indices",
    "write_report",
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


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_classes: int,
    ignore_index: int = 255,
    device: Union[str, torch.device] = "cpu",
    inference: InferenceConfig = InferenceConfig(),
    distributed: Optional[bool] = None,
    progress: bool = True,
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over every sample of ``loader``.

    The model is put in eval mode for the loop and every submodule's previous mode is
    restored afterwards. Predictions come from :func:`deeplab.eval.inference.predict_mask`
    with the given :class:`~deeplab.config.InferenceConfig`; pixels labelled ``ignore_index`` are not counted.

    Distributed use (``torch.distributed`` initialised, more than one process): build the
    loader with :class:`ShardSampler` so each rank evaluates its own shard, call
    ``evaluate`` on *every* rank; the matrices are summed with ``all_reduce`` and every
    rank returns the full-dataset matrix. A ``DistributedSampler`` that would pad or drop
    samples is refused. To evaluate on one rank only while a process group exists, pass
    ``distributed=False`` (otherwise the collective would wait for the other ranks forever).

    Args:
        model: maps ``(B, 3, H, W)`` to logits ``(B, C, H, W)``; already on ``device``. A
            DDP wrapper is unwrapped (its forward may synchronise buffers, which would
            hang with shards of unequal length).
        loader: yields ``(image, mask)`` (extra items ignored) or ``{"image", "mask"}``
            batches: ``image`` ``(B, 3, H, W)`` float normalised, ``mask`` ``(B, H, W)``
            integer class ids. Use batch size 1 for images of different sizes.
        num_classes: ``C``.
        ignore_index: mask label excluded from the metric.
        device: where images, masks and the confusion matrix go.
        inference: how to predict (mode, scales, flip, windows, output stride, padding),
            see :func:`deeplab.eval.inference.predict_probs`.
        distributed: sum over ranks; ``None`` = whenever a multi-process group exists.
        progress: show a tqdm bar (rank 0 only) with the running (local) mIoU.

    Returns:
        The accumulated :class:`~deeplab.eval.metrics.ConfusionMatrix` on ``device``.

    Raises:
        ValueError: model and ``device`` disagree, a DistributedSampler that pads/drops,
            masks whose size differs from their images, or labels outside the classes.
    """
    return _evaluate(
        model, loader, num_classes=num_classes, ignore_index=ignore_index, device=device,
        inference=inference, distributed=distributed, progress=progress, stacklevel=3,
    ).confusion



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
    """:func:`evaluate` plus the boundary metrics and per-image scores, in the same one pass.

    Every option off gives exactly :func:`evaluate`'s confusion matrix (it calls this).

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
    return _evaluate(
        model, loader, num_classes=num_classes, ignore_index=ignore_index, device=device,
        inference=inference, distributed=distributed, progress=progress, trimap_widths=trimap_widths,
        trimap_source=trimap_source, boundary_tolerance=boundary_tolerance, per_image=per_image,
        worst=worst, stacklevel=3,
    )


def _evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_classes: int,
    ignore_index: int,
    device: Union[str, torch.device],
    inference: InferenceConfig,
    distributed: Optional[bool],
    progress: bool,
    trimap_widths: Optional[Sequence[int]] = None,
    trimap_source: str = "void",
    boundary_tolerance: Optional[int] = None,
    per_image: bool = False,
    worst: int = 0,
    stacklevel: int = 2,
) -> EvalResult:
    """The one evaluation loop behind :func:`evaluate` and :func:`evaluate_detailed`."""
    device = torch.device(device)
    net = unwrap_model(model)
    param = next(net.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(
            f"the model is on {param.device} but device={str(device)!r}; call "
            f"model.to({str(device)!r}) first or pass device={str(param.device)!r}"
        )
    _check_sampler(loader)
    if distributed is None:
        distributed = _dist_active()
    rank = dist.get_rank() if distributed else 0

    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    trimap = (TrimapMeter(trimap_widths, num_classes, source=trimap_source, ignore_index=ignore_index, device=device)
              if trimap_widths else None)
    bf = BoundaryFScore(num_classes, boundary_tolerance, ignore_index=ignore_index) if boundary_tolerance is not None else None
    want_images = per_image or worst > 0
    order = _sample_order(loader) if want_images else None
    scores: List[ImageScore] = []
    worst_heap: List[Tuple[float, int, WorstImage]] = []
    seen = 0
    bar = tqdm(
        loader,
        total=len(loader) if isinstance(loader, Sized) else None,
        desc="eval",
        unit="batch",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    modes = _set_eval(model)
    try:
        for batch in bar:
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
            pred = predict_mask(net, image, inference, num_classes=num_classes)
            cm.update(pred, mask)
            if trimap is not None:
                trimap.update(pred, mask)
            for j in range(int(image.shape[0])):
                image_bf = bf.update(pred[j], mask[j]) if bf is not None else None
                if not want_images:
                    continue
                position = seen + j
                index = order[position] if order is not None and position < len(order) else position
                score = ImageScore(
                    index=index,
                    iou=_num_or_none(image_miou(pred[j], mask[j], num_classes, ignore_index)),
                    pixels=int((mask[j] != ignore_index).sum()),
                    boundary_f=_num_or_none(_nanmean_float(image_bf)) if image_bf is not None else None,
                )
                scores.append(score)
                if worst > 0 and score.iou is not None:
                    _keep_worst(worst_heap, worst, score, pred[j], mask[j])
            seen += int(image.shape[0])
            if not bar.disable:
                miou = cm.miou
                bar.set_postfix(mIoU=f"{100 * miou:.2f}" if not math.isnan(miou) else "-")
    finally:
        bar.close()
        for module, was_training in modes:
            module.training = was_training

    if distributed:
        cm.all_reduce()
        if trimap is not None:
            trimap.all_reduce()
        if bf is not None:
            bf.all_reduce()
        if want_images:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (scores, worst_heap))
            scores = [s for part, _ in gathered for s in part]
            worst_heap = [h for _, part in gathered for h in part]
        count = torch.tensor([seen], dtype=torch.int64, device=device)
        dist.all_reduce(count)
        seen = int(count.item())
    dataset = getattr(loader, "dataset", None)
    if distributed and isinstance(dataset, Sized) and seen != len(dataset):
        warnings.warn(
            f"distributed evaluation saw {seen} samples in total for a dataset of "
            f"{len(dataset)}: the ranks' samplers do not partition the dataset (use "
            "ShardSampler), so pixels were counted more or fewer times than once",
            stacklevel=stacklevel,
        )
    scores.sort(key=lambda s: s.index)
    worst_list = [entry for _, _, entry in sorted(worst_heap, key=lambda h: (-h[0], -h[1]))][:worst] if worst > 0 else []
    return EvalResult(confusion=cm, trimap=trimap, boundary_f=bf, per_image=scores if per_image or worst > 0 else [],
                      worst=worst_list)


def write_report(
    cm: ConfusionMatrix,
    class_names: Optional[Sequence[str]],
    out_dir: Union[str, Path],
    extra: Optional[Dict[str, Any]] = None,
    sections: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``report.json`` and ``confusion.png`` into ``out_dir``; call on rank 0.

    ``report.json`` holds ``{"config": extra, "metrics": cm.summary(class_names),
    "class_names": [...], "confusion_matrix": [[int]] (rows = ground truth),
    "created": ISO time}``; the raw matrix lets any metric be recomputed later. The JSON
    is written to a temporary file and renamed, so an existing report is never left
    half-written.

    Args:
        cm: the evaluated confusion matrix.
        class_names: ``C`` names, or ``None`` for ``class_0 ..``.
        out_dir: directory (created if missing).
        extra: what produced the numbers (checkpoint, inference options, dataset...);
            dataclasses, paths and tuples are converted to JSON.
        sections: further top-level entries (e.g. :meth:`EvalResult.sections`: ``trimap``,
            ``boundary_f``, ``per_image``), written after ``confusion_matrix``.

    Returns:
        Path of ``report.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = cm.summary(class_names)
    report = {
        "config": jsonable(extra or {}),
        "metrics": summary,
        "class_names": list(summary["per_class"]),
        "confusion_matrix": cm.matrix.cpu().tolist(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in (sections or {}).items():
        if key in report:
            raise ValueError(f"report section {key!r} would overwrite a standard report.json key")
        report[key] = jsonable(value)
    path = out / "report.json"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, allow_nan=False)
        fh.write("\n")
    cm.save_confusion_png(out / "confusion.png", class_names)  # drawn by deeplab.viz
    return path
