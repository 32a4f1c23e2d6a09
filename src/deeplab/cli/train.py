"""``deeplab train``: train DeepLabv3/v3+ with the paper's recipe.

``deeplab train --config configs/voc_resnet101_os16.yaml --data-root DATA --out runs/r101``.
Every flag maps to one field of ``ModelConfig`` / ``TrainConfig`` (``--config`` fills any flag
not typed). The same command runs under ``torchrun --nproc_per_node N`` (DDP + SyncBatchNorm);
``--resume auto`` (default) continues an interrupted run exactly from ``RUN_DIR/last.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch.utils.data import DataLoader, Subset

from deeplab import distributed as dist_utils
from deeplab._utils import load_state_dict_strict
from deeplab.checkpoint import load_checkpoint, strip_state_dict_prefixes
from deeplab.cli.common import CLIError, add_data_args, cli_command, make_dataset, parse_with_preset, print_config
from deeplab.config import ModelConfig, TrainConfig
from deeplab.data import EvalTransform, TrainTransform
from deeplab.data.augment import AlbumentationsTransform
from deeplab.data.base import SegmentationDataset
from deeplab.data.check import check_dataset, read_class_weights
from deeplab.eval.evaluate import ShardSampler, evaluate
from deeplab.models import build_model_from_config
from deeplab.train import TrainResult, train
from deeplab.weights import resolve_pretrained

# Flags whose name differs from their config field.
FLAG_NAMES = {"run_dir": "out", "resume_from": "resume", "hflip": "hflip"}
MODEL_FLAGS = [f.name for f in dataclasses.fields(ModelConfig)]
TRAIN_FLAGS = [f.name for f in dataclasses.fields(TrainConfig)]


def _field_help(cls: type) -> Dict[str, str]:
    """One line of each field's description from the dataclass docstring."""
    doc = cls.__doc__ or ""
    helps: Dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        stripped = line.strip()
        head = stripped.split(":", 1)
        if len(head) == 2 and head[0].replace("_", "").isalnum() and line.startswith(" " * 8) and not line.startswith(" " * 12):
            current = head[0]
            helps[current] = head[1].strip()
        elif current and stripped and line.startswith(" " * 12):
            helps[current] += " " + stripped
    return helps


def _add_dataclass_flags(group: argparse._ArgumentGroup, cls: type, skip: tuple = ()) -> None:
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + FLAG_NAMES.get(f.name, f.name).replace("_", "-")
        hint = hints[f.name]
        kwargs: Dict[str, Any] = dict(dest=f.name, default=f.default, help=helps.get(f.name, "").replace("``", ""))
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Union and type(None) in args:  # Optional[...]
            inner = [a for a in args if a is not type(None)][0]
            if typing.get_origin(inner) is tuple:
                kwargs.update(nargs="*", type=typing.get_args(inner)[0])  # Tuple[int, ...] / Tuple[float, ...]
            else:
                kwargs["type"] = inner
        elif origin is tuple:
            kwargs.update(nargs=len(args), type=args[0])
        else:
            kwargs["type"] = hint
        group.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="flat YAML preset (configs/*.yaml) filling any flag not typed")
    add_data_args(parser, split=None, with_split=False)
    parser.add_argument("--train-split", default="train", help="training split (paper: VOC train_aug)")
    parser.add_argument("--val-split", default="val", help="split evaluated every --eval-every steps; 'none' to skip")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N validation images")
    model = parser.add_argument_group("model (ModelConfig)")
    _add_dataclass_flags(model, ModelConfig, skip=("num_classes",))
    model.add_argument("--num-classes", type=int, default=None, help="default: the dataset's class count")
    model.add_argument("--init-from", default=None,
                       help="start from the weights of this deeplab checkpoint (e.g. the OS 16 run's best.pt "
                            "before OS 8 fine-tuning); optimizer and step start fresh")
    model.add_argument("--pretrained-backbone", default="imagenet",
                       help="'imagenet' (the backbone's public file; `deeplab weights fetch NAME`; for resnet_v1_*_beta "
                            "without a public PyTorch file, the TF zoo's), 'zoo:NAME', a .pth path, or 'none'")
    recipe = parser.add_argument_group("recipe (TrainConfig)")
    _add_dataclass_flags(recipe, TrainConfig, skip=("class_weights",))
    recipe.add_argument("--class-weights", dest="class_weights", default=None,
                        help="loss weight per class: 'auto' (median-frequency, from the training masks), a FILE "
                             "(`deeplab data check` writes class_weights.txt) or w0,w1,...")
    recipe.set_defaults(resume_from="auto")
    parser.add_argument("--label-map", default=None,
                        help="folder datasets: remap mask values first, e.g. 255:1 for 0/255 binary masks")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _model_config(args: argparse.Namespace, num_classes: int) -> ModelConfig:
    values = {name: getattr(args, name) for name in MODEL_FLAGS if name != "num_classes"}
    for key in ("aspp_rates", "multi_grid"):
        if values[key] is not None:
            values[key] = tuple(int(v) for v in values[key])
    for key in ("input_mean", "input_std"):
        if values[key] is not None:
            values[key] = tuple(float(v) for v in values[key])
    return ModelConfig(num_classes=num_classes, **values)


def resolve_class_weights(value: Any, train_set: Any, *, progress: bool = True) -> Optional[tuple]:
    """``--class-weights``: ``None``, ``auto`` (median frequency of ``train_set``'s masks), a file or
    ``w0,w1,...``; a preset may give a list."""
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
        raise CLIError(f"--class-weights {text!r}: not 'auto', an existing file or numbers w0,w1,...") from None


def _train_config(args: argparse.Namespace, class_weights: Optional[tuple] = None) -> TrainConfig:
    values = {name: getattr(args, name) for name in TRAIN_FLAGS}
    values["class_weights"] = class_weights
    values["scale_range"] = tuple(float(v) for v in values["scale_range"])
    if values["resume_from"] in ("none", "", None):
        values["resume_from"] = None
    return TrainConfig(**values)


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
        error=CLIError,
    )


def make_eval_fn(val_set: Any, *, num_classes: int, device: torch.device, world_size: int,
                 num_workers: int) -> Callable[[torch.nn.Module], Dict[str, Any]]:
    sampler = ShardSampler(val_set) if world_size > 1 else None
    loader = DataLoader(val_set, batch_size=1, shuffle=False, sampler=sampler, num_workers=min(num_workers, 2))

    def eval_fn(model: torch.nn.Module) -> Dict[str, Any]:
        cm = evaluate(model, loader, num_classes=num_classes, device=device, progress=False)
        return {"mIoU": cm.miou, "pixel_accuracy": cm.pixel_accuracy, "iou": [float(v) for v in cm.iou]}

    return eval_fn


def run(args: argparse.Namespace) -> TrainResult:
    """Build everything from parsed flags and train."""
    info = dist_utils.init_distributed(device=args.device, timeout_s=args.dist_timeout)
    dataset_name = args.dataset or "voc"
    data_kwargs: Dict[str, Any] = {}
    if args.label_map:
        if dataset_name != "folder":
            raise CLIError(f"--label-map applies to the folder dataset, not {dataset_name!r}")
        data_kwargs["label_map"] = args.label_map
    train_set = make_dataset(dataset_name, args.data_root, args.train_split, None, **data_kwargs)
    num_classes = args.num_classes or train_set.num_classes
    if num_classes != train_set.num_classes:
        raise CLIError(f"--num-classes {num_classes} but the {dataset_name} dataset has {train_set.num_classes} classes")
    model_config = _model_config(args, num_classes)
    weights = resolve_class_weights(args.class_weights, train_set, progress=info.is_main and not args.no_progress)
    if weights is not None and len(weights) != num_classes:
        raise CLIError(f"--class-weights gives {len(weights)} weights for {num_classes} classes; give one per class")
    cfg = _train_config(args, weights)
    pretrained = None if str(args.pretrained_backbone).lower() in ("none", "") else args.pretrained_backbone
    zoo_name = str(pretrained)[len("zoo:"):] if str(pretrained).startswith("zoo:") else None
    if pretrained == "imagenet":  # backbones whose ImageNet weights only the TF zoo has (resnet_v1_*_beta)
        from deeplab.zoo import imagenet_entry

        zoo_name = imagenet_entry(model_config.backbone)
    if pretrained is not None and info.is_main:
        if zoo_name is not None:  # the TF zoo's ImageNet backbones (resnet_v1_101_beta_imagenet, ...)
            from deeplab.zoo import pretrained_path

            pretrained_path(zoo_name)
        else:
            resolve_pretrained(model_config.backbone, pretrained)  # fetch once, before the other ranks look
    dist_utils.barrier()
    if zoo_name is not None:
        from deeplab.zoo import pretrained_path

        pretrained = str(pretrained_path(zoo_name))  # the cache now holds it: no request
    # The same seed gives the same initial head on every rank and in every rerun.
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(model_config, pretrained_backbone=pretrained)
    if args.init_from:
        init_from(model, args.init_from)
    norm = model.normalization
    transform: Any = TrainTransform(crop_size=cfg.crop_size, scale_range=cfg.scale_range, scale_step=cfg.scale_step,
                                    mean=norm.mean, std=norm.std, flip=cfg.hflip, ignore_index=cfg.ignore_index)
    if cfg.augment:
        transform = AlbumentationsTransform(cfg.augment, then=transform, ignore_index=cfg.ignore_index)
    eval_fn = None
    if str(args.val_split).lower() != "none":
        val_set: Union[SegmentationDataset, Subset[Any]] = make_dataset(dataset_name, args.data_root, args.val_split,
                                        EvalTransform(mean=norm.mean, std=norm.std), **data_kwargs)
        if args.eval_limit is not None:
            val_set = Subset(val_set, range(min(args.eval_limit, len(val_set))))
        eval_fn = make_eval_fn(val_set, num_classes=num_classes, device=info.device, world_size=info.world_size,
                               num_workers=cfg.num_workers)
    if info.is_main:
        print_config("model", model_config.to_dict())
        print_config("recipe", cfg.to_dict())
        print_config("data", {"dataset": dataset_name, "data_root": args.data_root, "train_split": args.train_split,
                              "train_images": len(train_set), "val_split": args.val_split,
                              "pretrained_backbone": str(pretrained), "world_size": info.world_size,
                              "device": str(info.device)})
    result = train(
        model, train_set, cfg, transform=transform, eval_fn=eval_fn, model_config=model_config,
        classes=train_set.classes, palette=train_set.palette, normalization=norm.to_dict(),
        dataset_info={"dataset": dataset_name, "root": str(args.data_root), "train_split": args.train_split,
                      "val_split": args.val_split, **({"label_map": args.label_map} if args.label_map else {})},
        progress=info.is_main and not args.no_progress,
    )
    if info.is_main:
        best = f"{100 * result.best_metric:.2f}" if result.best_metric is not None else "n/a"
        print(f"{result.reason} at step {result.step}; best mIoU {best}; last: {result.last_checkpoint}; "
              f"best: {result.best_checkpoint}; metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}; "
              f"survived {result.restarts} restart(s)")
    dist_utils.cleanup()
    return result


# TrainConfig, the model builders, losses and the loop's argument checks raise ConfigError (a
# DeeplabError): bad flags print as one line; any other ValueError is a bug and keeps its traceback.
@cli_command("train")
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parse_with_preset(parser, argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # Under torchrun: SIGTERM from the agent ends this rank within seconds even when it is
    # blocked in a collective whose peer is gone, so the restart is not held up.
    with dist_utils.HardExitOnSignal(enabled=world_size > 1, label=f"deeplab train: rank {os.environ.get('RANK', 0)}: "):
        try:
            run(args)
        except RuntimeError as exc:
            if world_size > 1 and not isinstance(exc, dist_utils.PeerFailureError) and dist_utils.is_peer_failure(exc):
                raise dist_utils.PeerFailureError(dist_utils.peer_failure_message(
                    exc, rank=dist_utils.get_rank(), step=None, timeout_s=args.dist_timeout, checkpoint=None)) from exc
            raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
