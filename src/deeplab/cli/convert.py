"""``deeplab convert tf``: turn the paper's released TensorFlow checkpoints into deeplab checkpoints.

    deeplab convert tf deeplabv3_pascal_train_aug_2018_01_04.tar.gz --out xception65_voc.pt
    deeplab convert tf xception_65/model.ckpt --out tf_xception_65.pth      # ImageNet backbone
    deeplab convert tf model.ckpt-30000 --list                              # what is inside

A model checkpoint (DeepLabv3+ Xception, DeepLabv3 MobileNetV2) becomes a self-describing deeplab
checkpoint (architecture, ``tf_compat=True``, class names, palette, [-1, 1] input normalisation)
for ``deeplab eval`` / ``predict`` / ``export`` and ``deeplab.checkpoint.load_model``. An
ImageNet backbone checkpoint (``xception_41/65/71``) becomes a backbone state dict for
``build_model(pretrained_backbone=PATH)``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional

from deeplab._utils import save_atomically
from deeplab.cli.common import CLIError, cli_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab convert",
        description="Convert the paper's released checkpoints into deeplab checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source_format", metavar="FORMAT")
    sub.required = True
    tf = sub.add_parser(
        "tf",
        help="a TensorFlow DeepLab checkpoint (tensorflow/models research/deeplab model zoo)",
        description=(
            "Convert a TF DeepLab checkpoint: the model-zoo .tar.gz, or a checkpoint prefix "
            "(DIR/model.ckpt for model.ckpt.index + model.ckpt.data-*), its .index file, or its directory. "
            "TensorFlow is not needed."
        ),
    )
    tf.add_argument("checkpoint", help="model-zoo .tar.gz, checkpoint prefix, .index file or directory")
    tf.add_argument("--out", help="where to write the converted checkpoint (.pt)")
    tf.add_argument("--dataset", choices=["voc", "cityscapes", "ade20k"],
                    help="dataset the checkpoint was trained on (class names, palette); default: from the "
                         "number of classes (21 voc, 19 cityscapes, 151 ade20k)")
    tf.add_argument("--output-stride", type=int, default=16, choices=[8, 16, 32],
                    help="output stride stored in the config (weights do not depend on it; default 16; "
                         "load_model/eval can override it)")
    tf.add_argument("--multi-grid", type=int, nargs=3, metavar="R",
                    help="Xception exit-block rate multipliers, only if the checkpoint was trained with them")
    tf.add_argument("--backbone-only", action="store_true",
                    help="write only the backbone (for pretrained_backbone=); implied for ImageNet checkpoints")
    tf.add_argument("--reader", choices=["python", "tensorflow"], default="python",
                    help="read the bundle with this package's reader (default, no TensorFlow) or with TensorFlow")
    tf.add_argument("--list", action="store_true", help="list the checkpoint's variables and shapes; write nothing")
    return parser


def _list(args: argparse.Namespace) -> int:
    from deeplab.tf.convert import open_checkpoint

    with open_checkpoint(args.checkpoint, reader=args.reader) as source:
        shapes = source.shapes()
        for name in sorted(shapes):
            print(f"{name}\t{list(shapes[name])}")
        print(f"{len(shapes)} variables", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from deeplab.checkpoint import save_checkpoint
    from deeplab.tf.convert import convert_checkpoint

    if not args.out:
        raise CLIError("--out is required (or --list to inspect the checkpoint)")
    out = Path(args.out).expanduser()
    print(f"converting {args.checkpoint} (reader={args.reader}, dataset={args.dataset or 'auto'}, "
          f"output_stride={args.output_stride}, multi_grid={args.multi_grid}, backbone_only={args.backbone_only})")
    conv = convert_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        output_stride=args.output_stride,
        multi_grid=args.multi_grid,
        backbone_only=args.backbone_only,
        reader=args.reader,
    )
    reasons = Counter(conv.ignored.values())
    print(f"recognised: {conv.recognised.tf_scope} -> {conv.recognised.backbone}"
          + ("" if conv.config is None else f", {conv.config.arch}, {conv.config.num_classes} classes"))
    print(f"variables used: {len(conv.used)} (every parameter and buffer filled)")
    for reason, count in sorted(reasons.items()):
        print(f"variables ignored: {count} - {reason}")
    if conv.dropped_classes:
        print(f"logits: the checkpoint's first {conv.dropped_classes} class(es) ('other', ignored in training) left out")
    if conv.config is None:
        save_atomically(conv.state_dict(), out)
        print(f"wrote backbone weights {out}; use build_model(backbone={conv.recognised.backbone!r}, "
              f"pretrained_backbone={str(out)!r})")
        return 0
    save_checkpoint(out, conv.checkpoint_payload(source=str(args.checkpoint)))
    print(f"config: {conv.config.to_dict()}")
    print(f"wrote {out}")
    if conv.dataset is not None:
        from deeplab.tf.convert import EVAL_CROP_SIZE

        h, w = EVAL_CROP_SIZE[conv.dataset]
        print(f"the reference evaluates {conv.dataset} images whole, padded to {h}x{w} (bottom/right, mean "
              f"pixel); to reproduce its numbers: deeplab eval --checkpoint {out} --data-root DIR --pad-to {h} {w}")
    return 0


@cli_command("convert")
def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        return _list(args)
    return _convert(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
