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
from typing import Any, Dict, List, Optional, Union

from torch.utils.data import DataLoader, Subset

from deeplab.checkpoint import load_model
from deeplab.cli.common import (
    CLIError,
    add_data_args,
    add_inference_args,
    add_model_source_args,
    cli_command,
    inference_config,
    make_dataset,
    print_config,
    resolve_model_source,
    zoo_comparison,
)
from deeplab.config import InferenceConfig
from deeplab.data import EvalTransform
from deeplab.data.base import SegmentationDataset
from deeplab.eval.evaluate import ShardSampler, evaluate, write_report
from deeplab.train import distributed as dist_utils


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab eval", description=__doc__.split("\n\n")[0])
    add_model_source_args(parser, what="a deeplab checkpoint (best.pt / last.pt / converted)")
    add_data_args(parser, split="val")
    add_inference_args(parser, deprecated_crop=True)  # --crop: the old name of --crop-size
    parser.add_argument("--out", default=None, help="report folder (default: next to the checkpoint)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (smoke tests)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def default_out_dir(checkpoint: Path, split: str, inference: InferenceConfig, output_stride: int) -> Path:
    """``<checkpoint folder>/eval_<split>_os<N>[_ms][_flip][_slide]``."""
    parts = [f"eval_{split}", f"os{output_stride}"]
    if inference.scales != (1.0,):
        parts.append("ms")
    if inference.flip:
        parts.append("flip")
    if inference.mode != "whole":
        parts.append(inference.mode)
    return checkpoint.parent / "_".join(parts)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    source = resolve_model_source(args, eval_settings=True)  # a zoo name brings its eval setting
    if source.entry is not None and args.out is None:
        args.out = str(Path("runs") / "zoo" / f"{source.entry.name}_eval_{args.split}")
    inference = inference_config(args)
    info = dist_utils.init_distributed(device=args.device)
    checkpoint = Path(args.checkpoint)
    model, ckpt = load_model(checkpoint, map_location="cpu", output_stride=inference.output_stride)
    model.to(info.device)
    config = ckpt["config"]
    data_info = dict(ckpt.get("dataset") or {})  # a zoo model's says voc / cityscapes / ade20k
    dataset_name = args.dataset or data_info.get("dataset") or "voc"
    norm = ckpt.get("normalization") or model.normalization.to_dict()
    transform = EvalTransform(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    full_set = make_dataset(dataset_name, args.data_root, args.split, transform)
    if full_set.num_classes != config["num_classes"]:
        raise CLIError(
            f"{checkpoint} predicts {config['num_classes']} classes but the {dataset_name} dataset at "
            f"{args.data_root} has {full_set.num_classes}; evaluate it on the dataset it was trained for"
        )
    dataset: Union[SegmentationDataset, Subset[Any]] = full_set
    if args.limit is not None:
        dataset = Subset(full_set, range(min(args.limit, len(full_set))))
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
        # Lists, not tuples, and the old "crop" key: the printed config and report.json
        # keep the shape they had before InferenceConfig.
        "scales": list(inference.scales),
        "flip": inference.flip,
        "mode": inference.mode,
        "crop": inference.crop_size,
        "stride": inference.stride,
        "pad_to": list(inference.pad_to) if inference.pad_to else None,
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
        inference=inference,
        progress=info.is_main and not args.no_progress,
    )
    class_names = list(ckpt.get("classes") or full_set.classes)
    if info.is_main:
        out_dir = Path(args.out) if args.out else default_out_dir(checkpoint, args.split, inference, output_stride)
        report = write_report(cm, class_names, out_dir, extra=resolved)
        print(cm.format_table(class_names))
        print(f"mIoU {100 * cm.miou:.2f}  pixel accuracy {100 * cm.pixel_accuracy:.2f}  "
              f"({len(dataset)} images, OS {output_stride}, scales {list(inference.scales)}, flip {inference.flip}, "
              f"{inference.mode})")
        comparison = zoo_comparison(source, cm.miou, args.split)
        if comparison is not None:
            print(comparison)
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
