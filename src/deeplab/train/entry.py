"""The Python entry point of training: data, model and recipe in, a trained run out.

>>> from deeplab.config import ModelConfig, TrainConfig
>>> from deeplab.train import DataSpec, run
>>> result = run(ModelConfig(backbone="mobilenet_v2", num_classes=21),               # doctest: +SKIP
...              TrainConfig(max_steps=100, run_dir="runs/mine"),
...              DataSpec("folder", root="my_data", train_split="train", val_split="val"))

``deeplab train`` parses its flags into these three objects and calls :func:`run`; ``deeplab
demo`` calls it with the demo's recipe. Under ``torchrun`` the same call trains with DDP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Subset

from deeplab import distributed as dist_utils
from deeplab._utils import ConfigError, load_state_dict_strict, print_config
from deeplab.checkpoint import load_checkpoint, strip_state_dict_prefixes
from deeplab.config import ModelConfig, TrainConfig
from deeplab.data import EvalTransform, TrainTransform, build_dataset
from deeplab.data.augment import AlbumentationsTransform
from deeplab.data.base import SegmentationDataset
from deeplab.data.check import check_dataset, read_class_weights
from deeplab.eval.evaluate import ShardSampler, evaluate
from deeplab.models import build_model_from_config
from deeplab.train.loop import TrainResult, train
from deeplab.train.resume import CheckpointMeta
from deeplab.zoo import backbone_weights

ClassWeights = Union[None, str, Sequence[Union[float, str]]]


@dataclass(frozen=True)
class DataSpec:
    """What a run trains and evaluates on.

    Attributes:
        dataset: a name of :data:`deeplab.data.DATASETS` ("voc", "cityscapes", "folder", ...).
        root: the dataset's folder (see the dataset's class for the layout).
        train_split: the training split (paper: VOC ``train_aug``).
        val_split: the split evaluated every ``eval_every`` steps; ``None`` or ``"none"`` skips it.
        eval_limit: evaluate only the first N validation images.
        label_map: folder datasets: mask values remapped first, e.g. ``"255:1"``.
    """

    dataset: str = "voc"
    root: Optional[str] = None
    train_split: str = "train"
    val_split: Optional[str] = "val"
    eval_limit: Optional[int] = None
    label_map: Optional[str] = None

    @property
    def evaluates(self) -> bool:
        return self.val_split is not None and str(self.val_split).lower() != "none"

    def open(self, split: Optional[str], transform: Any = None) -> SegmentationDataset:
        """One split of the dataset, with ``transform``."""
        if not self.root:
            raise ConfigError("--data-root is required: the folder holding the dataset (see README 'Datasets')")
        kwargs: Dict[str, Any] = {}
        if self.label_map:
            if self.dataset != "folder":
                raise ConfigError(f"--label-map applies to the folder dataset, not {self.dataset!r}")
            kwargs["label_map"] = self.label_map
        return build_dataset(self.dataset, self.root, split, transform, **kwargs)

    def info(self) -> Dict[str, Any]:
        """What the checkpoints record as the run's ``"dataset"``."""
        return {"dataset": self.dataset, "root": str(self.root), "train_split": self.train_split,
                "val_split": self.val_split, **({"label_map": self.label_map} if self.label_map else {})}


def resolve_class_weights(value: ClassWeights, train_set: Any, *, progress: bool = True) -> Optional[Tuple[float, ...]]:
    """``--class-weights``: ``None``, ``"auto"`` (median frequency of ``train_set``'s masks), a
    file (``deeplab data check`` writes ``class_weights.txt``) or ``"w0,w1,..."``; a preset may give
    a list."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and isinstance(value[0], str):
            return resolve_class_weights(value[0], train_set, progress=progress)
        return tuple(float(v) for v in value)
    text = str(value).strip()
    if text.lower() == "auto":
        report = check_dataset(train_set, progress=progress, name="train")
        return tuple(report["class_weights"])
    if Path(text).is_file():
        return read_class_weights(text)
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--class-weights {text!r}: not 'auto', an existing file or numbers w0,w1,...") from None


def init_from(model: torch.nn.Module, path: str) -> None:
    """Load a deeplab checkpoint's weights into a freshly built model (strict keys and shapes)."""
    ckpt = load_checkpoint(path)
    theirs = ckpt.get("config") or {}
    load_state_dict_strict(
        model,
        strip_state_dict_prefixes(ckpt["model"]),
        source=(f"--init-from {path}: its weights do not fit this model ({theirs.get('arch')} / "
                f"{theirs.get('backbone')}, {theirs.get('num_classes')} classes in the file)"),
        fix="use the same arch, backbone and class count (output stride may differ)",
        error=ConfigError,
    )


def make_eval_fn(val_set: Any, *, num_classes: int, device: torch.device, world_size: int,
                 num_workers: int) -> Callable[[torch.nn.Module], Dict[str, Any]]:
    """``eval_fn(model)`` for :func:`deeplab.train.train`: mIoU of ``val_set`` (sharded over the ranks)."""
    sampler = ShardSampler(val_set) if world_size > 1 else None
    loader = DataLoader(val_set, batch_size=1, shuffle=False, sampler=sampler, num_workers=min(num_workers, 2))

    def eval_fn(model: torch.nn.Module) -> Dict[str, Any]:
        cm = evaluate(model, loader, num_classes=num_classes, device=device, progress=False)
        return {"mIoU": cm.miou, "pixel_accuracy": cm.pixel_accuracy, "iou": [float(v) for v in cm.iou]}

    return eval_fn


def _model_config(model_config: Union[ModelConfig, Mapping[str, Any]], dataset: SegmentationDataset,
                  name: str) -> ModelConfig:
    """``model_config`` with the dataset's class count, which it must not contradict."""
    values = model_config.to_dict() if isinstance(model_config, ModelConfig) else dict(model_config)
    given = values.pop("num_classes", None) or dataset.num_classes
    if given != dataset.num_classes:
        raise ConfigError(f"--num-classes {given} but the {name} dataset has {dataset.num_classes} classes")
    return model_config if isinstance(model_config, ModelConfig) else ModelConfig(num_classes=given, **values)


def run(
    model_config: Union[ModelConfig, Mapping[str, Any]],
    train_config: TrainConfig,
    data: DataSpec,
    *,
    pretrained_backbone: Optional[str] = "imagenet",
    init_from_checkpoint: Optional[str] = None,
    class_weights: ClassWeights = None,
    progress: bool = True,
) -> TrainResult:
    """Compose data, model and recipe, train, and print where the results are.

    Args:
        model_config: the model; or its fields as a mapping, where a missing ``num_classes``
            is the dataset's class count.
        train_config: the recipe and run settings; ``train_config.run_dir`` receives
            ``last.pt``, ``best.pt``, ``metrics.jsonl`` and the curves.
        data: the dataset, its splits and label mapping.
        pretrained_backbone: see :func:`deeplab.zoo.backbone_weights`.
        init_from_checkpoint: start from the weights of this deeplab checkpoint (e.g. the OS 16
            run's ``best.pt`` before OS 8 fine-tuning); optimizer and step start fresh.
        class_weights: replaces ``train_config.class_weights`` when given: ``"auto"``, a file
            or numbers (see :func:`resolve_class_weights`).
        progress: tqdm bars on the main process.

    Returns:
        The :class:`~deeplab.train.TrainResult`.

    Raises:
        ConfigError: a setting that does not fit the data or the model (one line, names the fix).
        DatasetError: the dataset's files do not match its layout.
    """
    info = dist_utils.init_distributed(device=train_config.device, timeout_s=train_config.dist_timeout)
    train_set = data.open(data.train_split)
    config = _model_config(model_config, train_set, data.dataset)
    cfg = train_config
    if class_weights is not None:
        weights = resolve_class_weights(class_weights, train_set, progress=info.is_main and progress)
        if weights is not None and len(weights) != config.num_classes:
            raise ConfigError(f"--class-weights gives {len(weights)} weights for {config.num_classes} classes; "
                              "give one per class")
        cfg = dataclasses.replace(cfg, class_weights=weights)
    if info.is_main:  # fetch once, before the other ranks look
        backbone_weights(config.backbone, pretrained_backbone)
    dist_utils.barrier()
    pretrained = backbone_weights(config.backbone, pretrained_backbone, fetch=False)
    # The same seed gives the same initial head on every rank and in every rerun.
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(config, pretrained_backbone=pretrained)
    if init_from_checkpoint:
        init_from(model, init_from_checkpoint)
    norm = model.normalization
    transform: Any = TrainTransform(crop_size=cfg.crop_size, scale_range=cfg.scale_range, scale_step=cfg.scale_step,
                                    mean=norm.mean, std=norm.std, flip=cfg.hflip, ignore_index=cfg.ignore_index)
    if cfg.augment:
        transform = AlbumentationsTransform(cfg.augment, then=transform, ignore_index=cfg.ignore_index)
    eval_fn = None
    if data.evaluates:
        val_set: Union[SegmentationDataset, Subset[Any]] = data.open(data.val_split,
                                                                     EvalTransform(mean=norm.mean, std=norm.std))
        if data.eval_limit is not None:
            val_set = Subset(val_set, range(min(data.eval_limit, len(val_set))))
        eval_fn = make_eval_fn(val_set, num_classes=config.num_classes, device=info.device,
                               world_size=info.world_size, num_workers=cfg.num_workers)
    if info.is_main:
        print_config("model", config.to_dict())
        print_config("recipe", cfg.to_dict())
        print_config("data", {"dataset": data.dataset, "data_root": data.root, "train_split": data.train_split,
                              "train_images": len(train_set), "val_split": data.val_split,
                              "pretrained_backbone": str(pretrained), "world_size": info.world_size,
                              "device": str(info.device)})
    meta = CheckpointMeta(config.to_dict(), train_set.classes, train_set.palette, norm.to_dict(), data.info())
    result = train(model, train_set, cfg, meta=meta, transform=transform, eval_fn=eval_fn, progress=progress and info.is_main)
    if info.is_main:
        best = f"{100 * result.best_metric:.2f}" if result.best_metric is not None else "n/a"
        print(f"{result.reason} at step {result.step}; best mIoU {best}; last: {result.last_checkpoint}; "
              f"best: {result.best_checkpoint}; metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}; "
              f"survived {result.restarts} restart(s)")
    dist_utils.cleanup()
    return result
