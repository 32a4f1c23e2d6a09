"""``deeplab eval``: evaluate a checkpoint as the paper did.

Confusion matrix over the whole split, per-class IoU, mIoU (mean over classes present in the
ground truth or the prediction), pixel accuracy; output stride 8/16, multi-scale + flip
(softmax averaged), whole image (padded to OS*k+1) or sliding window. Writes ``report.json``
and ``confusion.png``. Under ``torchrun`` each rank evaluates its shard and the matrices are
summed, giving exactly the single-process result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from deeplab.checkpoint import load_model
from deeplab.cli.common import CLIError, add_data_args, cli_command, make_dataset, print_config
from deeplab.data import EvalTransform
from deeplab.train import distributed as dist_utils
from deeplab.eval.evaluate import ShardSampler, evaluate, write_report
from deeplab.eval.inference import MODES

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a deeplab checkpoint (best.pt / last.pt / converted)")
    add_data_args(parser, split="val")
    group = parser.add_argument_group("inference (the paper: --output-stride 8 --scales 0.5 ... 1.75 --flip)")
    group.add_argument("--output-stride", type=int, default=None, choices=[8, 16, 32],
                       help="evaluate at this output stride (default: the checkpoint's)")
    group.add_argument("--scales", type=float, nargs="+", default=[1.0],
                       help=f"input scales whose softmax is averaged (paper: {' '.join(map(str, PAPER_SCALES))})")
    group.add_argument("--flip", action="store_true", help="also average the left-right flipped input")
    group.add_argument("--mode", default="whole", choices=list(MODES), help="whole image or sliding window")
    group.add_argument("--crop", type=int, default=513, help="sliding-window size")
    group.add_argument("--stride", type=int, default=341, help="sliding-window step")
    group.add_argument("--pad-to", type=int, nargs=2, default=None, metavar=("H", "W"),
                       help="pad every image to this size first, as TF evaluates (VOC 513 513, Cityscapes 1025 2049)")
    parser.add_argument("--out", default=None, help="report folder (default: next to the checkpoint)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (smoke tests)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def default_out_dir(checkpoint: Path, args: argparse.Namespace, output_stride: int) -> Path:
    parts = [f"eval_{args.split}", f"os{output_stride}"]
    if len(args.scales) > 1 or args.scales[0] != 1.0:
        parts.append("ms")
    if args.flip:
        parts.append("flip")
    if args.mode != "whole":
        parts.append(args.mode)
    return checkpoint.parent / "_".join(parts)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    info = dist_utils.init_distributed(device=args.device)
    checkpoint = Path(args.checkpoint)
    model, ckpt = load_model(checkpoint, map_location="cpu", output_stride=args.output_stride)
    model.to(info.device)
    config = ckpt["config"]
    data_info = dict(ckpt.get("dataset") or {})
    dataset_name = args.dataset or data_info.get("dataset") or "voc"
    norm = ckpt.get("normalization") or model.normalization.to_dict()
    transform = EvalTransform(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    dataset = make_dataset(dataset_name, args.data_root, args.split, transform)
    if dataset.num_classes != config["num_classes"]:
        raise CLIError(
            f"{checkpoint} predicts {config['num_classes']} classes but the {dataset_name} dataset at "
            f"{args.data_root} has {dataset.num_classes}; evaluate it on the dataset it was trained for"
        )
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    sampler = ShardSampler(dataset) if info.world_size > 1 else None
    loader = DataLoader(dataset, batch_size=1, shuffle=False, sampler=sampler, num_workers=args.num_workers)
    output_stride = model.output_stride
    resolved = {
        "checkpoint": str(checkpoint),
        "arch": config["arch"],
        "backbone": config["backbone"],
        "dataset": dataset_name,
        "data_root": args.data_root,
        "split": args.split,
        "images": len(dataset),
        "output_stride": output_stride,
        "scales": args.scales,
        "flip": args.flip,
        "mode": args.mode,
        "crop": args.crop,
        "stride": args.stride,
        "pad_to": args.pad_to,
        "device": str(info.device),
        "world_size": info.world_size,
    }
    if info.is_main:
        print_config("deeplab eval", resolved)
    cm = evaluate(
        model,
        loader,
        num_classes=config["num_classes"],
        device=info.device,
        mode=args.mode,
        scales=tuple(args.scales),
        flip=args.flip,
        crop_size=args.crop,
        stride=args.stride,
        pad_to=tuple(args.pad_to) if args.pad_to else None,
        progress=info.is_main and not args.no_progress,
    )
    class_names = list(ckpt.get("classes") or dataset.classes)
    if info.is_main:
        out_dir = Path(args.out) if args.out else default_out_dir(checkpoint, args, output_stride)
        report = write_report(cm, class_names, out_dir, extra=resolved)
        print(cm.format_table(class_names))
        print(f"mIoU {100 * cm.miou:.2f}  pixel accuracy {100 * cm.pixel_accuracy:.2f}  "
              f"({len(dataset)} images, OS {output_stride}, scales {args.scales}, flip {args.flip}, {args.mode})")
        print(f"report: {report}\nconfusion matrix: {report.parent / 'confusion.png'}")
    dist_utils.cleanup()
    return {"miou": cm.miou, "pixel_accuracy": cm.pixel_accuracy}


@cli_command("eval")
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
