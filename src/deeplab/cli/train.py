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
from typing import Any, Dict, List, Optional

from deeplab import distributed as dist_utils
from deeplab.cli.common import add_data_args, cli_command, parse_with_preset
from deeplab.config import ModelConfig, RunSettings, TrainConfig, TrainRecipe
from deeplab.train import DataSpec, TrainResult, run

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
    recipe = parser.add_argument_group("recipe (TrainRecipe: decides the weights)")
    _add_dataclass_flags(recipe, TrainRecipe, skip=("class_weights",))
    recipe.add_argument("--class-weights", dest="class_weights", default=None,
                        help="loss weight per class: 'auto' (median-frequency, from the training masks), a FILE "
                             "(`deeplab data check` writes class_weights.txt) or w0,w1,...")
    run_group = parser.add_argument_group("run (RunSettings: a resume may change these)")
    _add_dataclass_flags(run_group, RunSettings)
    run_group.set_defaults(resume_from="auto")
    parser.add_argument("--label-map", default=None,
                        help="folder datasets: remap mask values first, e.g. 255:1 for 0/255 binary masks")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _model_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The ModelConfig fields the flags give (``num_classes`` ``None``: the dataset's count)."""
    values = {name: getattr(args, name) for name in MODEL_FLAGS}
    for key in ("aspp_rates", "multi_grid"):
        if values[key] is not None:
            values[key] = tuple(int(v) for v in values[key])
    for key in ("input_mean", "input_std"):
        if values[key] is not None:
            values[key] = tuple(float(v) for v in values[key])
    return values


def _train_config(args: argparse.Namespace) -> TrainConfig:
    values = {name: getattr(args, name) for name in TRAIN_FLAGS}
    values["class_weights"] = None  # --class-weights is resolved against the training set by run()
    values["scale_range"] = tuple(float(v) for v in values["scale_range"])
    if values["resume_from"] in ("none", "", None):
        values["resume_from"] = None
    return TrainConfig(**values)


def _data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec(dataset=args.dataset or "voc", root=args.data_root, train_split=args.train_split,
                    val_split=args.val_split, eval_limit=args.eval_limit, label_map=args.label_map)


def run_from_args(args: argparse.Namespace) -> TrainResult:
    """Parsed flags → :func:`deeplab.train.run`."""
    return run(_model_config(args), _train_config(args), _data_spec(args),
               pretrained_backbone=args.pretrained_backbone, init_from_checkpoint=args.init_from,
               class_weights=args.class_weights, progress=not args.no_progress)


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
            run_from_args(args)
        except RuntimeError as exc:
            if world_size > 1 and not isinstance(exc, dist_utils.PeerFailureError) and dist_utils.is_peer_failure(exc):
                raise dist_utils.PeerFailureError(dist_utils.peer_failure_message(
                    exc, rank=dist_utils.get_rank(), step=None, timeout_s=args.dist_timeout, checkpoint=None)) from exc
            raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
