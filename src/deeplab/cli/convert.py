"""``deeplab convert tf``: turn the paper's released TensorFlow checkpoints into deeplab checkpoints.

    deeplab convert tf deeplabv3_pascal_train_aug_2018_01_04.tar.gz --reference-config xception65_voc \\
        --out xception65_voc.pt
    deeplab convert tf xception_65/model.ckpt --out tf_xception_65.pth      # ImageNet backbone
    deeplab convert tf model.ckpt-30000 --list                              # what is inside

A model checkpoint (DeepLabv3+ Xception, DeepLabv3 MobileNetV2) becomes a self-describing deeplab
checkpoint (architecture, ``tf_compat=True``, class names, palette, [-1, 1] input normalisation)
for ``deeplab eval`` / ``predict`` / ``export`` and ``deeplab.checkpoint.load_model``. An
ImageNet backbone checkpoint (``xception_41/65/71``) becomes a backbone state dict for
``build_model(pretrained_backbone=PATH)``.

The settings a model's weights cannot reveal (output stride, atrous rates, multi-grid, decoder
stride) come from ``--reference-config NAME`` or one flag each; see docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional

from deeplab._utils import save_atomically
from deeplab.cli.common import CLIError, cli_command
from deeplab.tf.settings import MULTI_GRID_HELP, REFERENCE_CONFIGS, ReferenceSettings


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
                    help="dataset the checkpoint was trained on (class names, palette); default: the reference "
                         "config's, else from the number of classes (21 voc, 19 cityscapes, 151 ade20k)")
    ref = tf.add_argument_group(
        "the reference's settings",
        "A model checkpoint's weights do not reveal how the reference ran it; a model rebuilt with other "
        "settings computes another function. Name the reference config it was trained with, or give each "
        "setting the checkpoint needs; a missing one is an error, never a guess. They are recorded in the "
        "converted checkpoint (converted_from.settings). ImageNet backbone files need none.",
    )
    ref.add_argument("--reference-config", choices=sorted(REFERENCE_CONFIGS), metavar="NAME",
                     help="a named reference configuration; flags below override it: "
                          + "; ".join(f"{c.name}: {c.describe()}" for c in REFERENCE_CONFIGS.values()))
    ref.add_argument("--output-stride", type=int, choices=[8, 16, 32],
                     help="the reference's --output_stride to build the model at (the released models are "
                          "trained at 16; the weights do not depend on it; eval --output-stride can rebuild it)")
    ref.add_argument("--atrous-rates", nargs="+", metavar="R",
                     help="the reference's --atrous_rates, one per ASPP 3x3 branch of the checkpoint (Xception, "
                          "ResNet: 6 12 18 at output stride 16); 'none' for a head without them (MobileNetV2)")
    ref.add_argument("--multi-grid", nargs="+", metavar="R", help=f"the reference's --multi_grid, {MULTI_GRID_HELP}")
    ref.add_argument("--decoder-output-stride", metavar="S",
                     help="the reference's --decoder_output_stride: 4 for a DeepLabv3+ checkpoint (the only one "
                          "our decoder has), 'none' for DeepLabv3")
    ref.add_argument("--image-pooling", choices=["on", "off"],
                     help="add_image_level_feature; default: read off the checkpoint (image_pooling/weights); "
                          "a value given is checked against it")
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


def _ints_or_none(values: Optional[List[str]], flag: str) -> Optional[tuple]:
    if values is None:
        return None
    if [v.lower() for v in values] == ["none"]:
        return ()
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise CLIError(f"{flag} takes integers or 'none', got {' '.join(values)}") from None


def settings_from(args: argparse.Namespace) -> ReferenceSettings:
    """The settings given by flags (``None`` where a flag is absent)."""
    decoder = _ints_or_none(None if args.decoder_output_stride is None else [args.decoder_output_stride],
                            "--decoder-output-stride")
    return ReferenceSettings(
        output_stride=args.output_stride,
        atrous_rates=_ints_or_none(args.atrous_rates, "--atrous-rates"),
        multi_grid=_ints_or_none(args.multi_grid, "--multi-grid"),
        decoder_output_stride=None if decoder is None else (decoder[0] if decoder else 0),
        image_pooling=None if args.image_pooling is None else args.image_pooling == "on",
    )


def _convert(args: argparse.Namespace) -> int:
    from deeplab.checkpoint import save_checkpoint
    from deeplab.tf.convert import convert_checkpoint

    if not args.out:
        raise CLIError("--out is required (or --list to inspect the checkpoint)")
    out = Path(args.out).expanduser()
    settings = settings_from(args)
    given = {k: v for k, v in settings.to_dict().items() if v is not None}
    print(f"converting {args.checkpoint} (reader={args.reader}, dataset={args.dataset or 'auto'}, "
          f"reference_config={args.reference_config}, given={given}, backbone_only={args.backbone_only})")
    conv = convert_checkpoint(
        args.checkpoint,
        settings=settings,
        reference_config=args.reference_config,
        dataset=args.dataset,
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
        if given or args.reference_config:
            print("note: the reference's settings apply to model checkpoints; a backbone file holds weights only "
                  "(choose output stride and multi-grid where it is used: build_model(..., multi_grid=...))")
        save_atomically(conv.state_dict(), out)
        print(f"wrote backbone weights {out}; use build_model(backbone={conv.recognised.backbone!r}, "
              f"pretrained_backbone={str(out)!r})")
        return 0
    save_checkpoint(out, conv.checkpoint_payload(source=str(args.checkpoint)))
    if conv.settings is not None:
        for key, value in conv.settings.to_dict().items():
            print(f"setting {key}: {value} ({conv.provenance.get(key, 'given')})")
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
