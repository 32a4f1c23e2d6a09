"""``deeplab eval``: evaluate a checkpoint as the paper did.

Confusion matrix over the whole split, per-class IoU, mIoU (mean over classes present in the
ground truth or the prediction), pixel accuracy; output stride 8/16, multi-scale + flip
(softmax averaged), whole image (padded to OS*k+1) or sliding window. Writes ``report.json``
and ``confusion.png``. Under ``torchrun`` each rank evaluates its shard and the matrices are
summed, giving exactly the single-process result.

Beyond the paper's table, in the same one pass: ``--trimap W...`` (mIoU inside the band of
width W around object boundaries, paper Fig. 5: ``trimap.json`` + ``trimap.png``),
``--boundary-f TOL`` (boundary F-score, Csurka et al. 2013), per-image IoU in the report and
``--worst N`` (triptychs of the N worst images in ``worst/``). ``--checkpoint`` also takes an
exported model (``.onnx``, OpenVINO ``.xml``, TorchScript ``.ts``), run through its runtime
backend with the same inference options; classes and normalisation come from its metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from torch import nn
from torch.utils.data import DataLoader, Subset

from deeplab import distributed as dist_utils
from deeplab._utils import print_config
from deeplab.cli.common import (
    CLIError,
    add_data_args,
    add_inference_args,
    add_model_source_args,
    add_progress_args,
    add_runtime_args,
    cli_command,
    inference_config,
    make_dataset,
    resolve_model_source,
    zoo_comparison,
)
from deeplab.config import InferenceConfig
from deeplab.data import EvalTransform
from deeplab.data.base import SegmentationDataset
from deeplab.deploy.format import sniff_format
from deeplab.deploy.open import ModelCard, normalize_backend, open_model
from deeplab.eval.evaluate import EvalResult, ShardSampler, evaluate_detailed
from deeplab.eval.metrics import TRIMAP_SOURCES
from deeplab.eval.report import write_report
from deeplab.viz import plot_trimap, render_triptych

# The paper's Fig. 5 widths (pixels).
PAPER_TRIMAP = (0, 2, 4, 8, 12, 16, 20, 30, 40)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab eval", description=__doc__.split("\n\n")[0])
    add_model_source_args(parser, what="a deeplab checkpoint (best.pt / last.pt / converted) or an exported model "
                                       "(.onnx, OpenVINO .xml, TorchScript .ts from `deeplab export`)")
    add_runtime_args(parser, threads=False)
    add_data_args(parser, split="val",
                  label_map_help="folder datasets: remap mask values first, e.g. 255:1 (default: the one training used)")
    add_inference_args(parser, deprecated_crop=True)  # --crop: the old name of --crop-size
    extra = parser.add_argument_group("beyond the paper's table")
    extra.add_argument("--trimap", type=int, nargs="+", default=None, metavar="W",
                       help="trimap widths in px: mIoU inside the band around boundaries "
                            f"(paper Fig. 5: {' '.join(map(str, PAPER_TRIMAP))}); writes trimap.json + trimap.png")
    extra.add_argument("--trimap-source", default="auto", choices=["auto", *TRIMAP_SOURCES],
                       help="band seed: void = dilate the void (255) annotation (the paper; VOC), boundary = "
                            "dilate the ground truth's class edges; auto = void for voc, boundary otherwise")
    extra.add_argument("--boundary-f", type=int, default=None, metavar="TOL",
                       help="also report the boundary F-score (Csurka et al. 2013) at this tolerance in px")
    extra.add_argument("--worst", type=int, default=0, metavar="N",
                       help="write image | ground truth | prediction triptychs of the N lowest-IoU images to worst/")
    parser.add_argument("--out", default=None, help="report folder (default: next to the checkpoint)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (smoke tests)")
    add_progress_args(parser)
    return parser


def default_out_dir(checkpoint: Path, split: str, inference: InferenceConfig, output_stride: int,
                    backend: Optional[str] = None) -> Path:
    """``<checkpoint folder>/eval_<split>_os<N>[_ms][_flip][_slide][_<backend>]``."""
    parts = [f"eval_{split}", f"os{output_stride}"]
    if inference.scales != (1.0,):
        parts.append("ms")
    if inference.flip:
        parts.append("flip")
    if inference.mode != "whole":
        parts.append(inference.mode)
    if backend:
        parts.append(backend)
    return checkpoint.parent / "_".join(parts)


# --------------------------------------------------------------------------- the model


def open_model_to_eval(args: argparse.Namespace, inference: InferenceConfig) -> Tuple[nn.Module, ModelCard]:
    """The model to evaluate and its card, through :func:`deeplab.deploy.open.open_model`.

    An exported file runs at its own precision unless ``--precision`` names one (an evaluation
    measures the file as exported), on the CPU; a graph of one input size is padded to it.
    """
    path = Path(args.checkpoint)
    kind = sniff_format(path)
    if kind != "checkpoint" and inference.output_stride is not None:
        raise CLIError(f"{path} is an exported graph with its output stride built in; drop --output-stride "
                       "(or export the checkpoint again at the output stride you want)")
    if kind == "checkpoint" and normalize_backend(args.backend) not in ("auto", "torch"):
        raise CLIError(f"{path} is a deeplab checkpoint (run with PyTorch); --backend is for exported files")
    if kind != "checkpoint" and args.device not in ("auto", "cpu"):
        raise CLIError(f"{path} runs on the CPU through its runtime backend; drop --device {args.device}")
    precision = None if inference.precision == "auto" else inference.precision
    return open_model(path, backend=args.backend, precision=precision, output_stride=inference.output_stride)


# --------------------------------------------------------------------------- outputs beyond the table


def write_trimap(result: EvalResult, class_names: List[str], out_dir: Path, label: str,
                 identity: Dict[str, Any]) -> Path:
    """``trimap.json`` (the bands' mIoU per width and what produced them) and ``trimap.png``."""
    assert result.trimap is not None
    summary = result.trimap.summary(class_names)
    path = out_dir / "trimap.json"
    path.write_text(json.dumps({**identity, **summary}, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    widths = [row["width"] for row in summary["widths"]]
    values = [row["mIoU"] for row in summary["widths"]]
    plot_trimap({label: (widths, values)}, out_dir / "trimap.png",
                title=f"mIoU inside the trimap band ({summary['source']} seed)")
    return path


def write_worst(result: EvalResult, dataset: SegmentationDataset, palette: List[Any], class_names: List[str],
                out_dir: Path) -> List[Path]:
    """One triptych PNG per worst image, ``worst/<rank>_<name>.png``, worst first."""
    folder = out_dir / "worst"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a previous run's files would be mistaken for this one's
        old.unlink()
    paths = []
    for rank, entry in enumerate(result.worst, 1):
        score = entry.score
        name = dataset.names[score.index]
        assert score.iou is not None
        title = f"#{rank} worst: {name}   IoU {100 * score.iou:.1f}%"
        if score.boundary_f is not None:
            title += f"   boundary F {100 * score.boundary_f:.1f}%"
        picture = render_triptych(dataset.load_image(score.index), entry.target, entry.prediction, palette,
                                  class_names, title=title, ignore_index=dataset.ignore_index)
        path = folder / f"{rank:02d}_{name}.png"
        picture.save(path)
        paths.append(path)
    return paths


def check_options(args: argparse.Namespace) -> None:
    """The eval-only flags' ranges (inference flags are checked by InferenceConfig)."""
    if args.worst < 0:
        raise CLIError(f"--worst must be >= 0, got {args.worst}")
    if args.boundary_f is not None and args.boundary_f < 0:
        raise CLIError(f"--boundary-f is a tolerance in pixels (>= 0), got {args.boundary_f}")
    if args.trimap is not None and (min(args.trimap) < 0 or len(set(args.trimap)) != len(args.trimap)):
        raise CLIError(f"--trimap takes distinct widths in pixels >= 0, got {args.trimap}")


def open_dataset(args: argparse.Namespace, loaded: ModelCard, checkpoint: Path) -> Tuple[str, SegmentationDataset]:
    """``(dataset name, dataset)`` the model is evaluated on, normalised as the model expects."""
    config = loaded.config
    data_info = loaded.dataset  # a zoo model's says voc / cityscapes / ade20k
    dataset_name = args.dataset or data_info.get("dataset") or "voc"
    norm = loaded.normalization
    transform = EvalTransform(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    label_map = args.label_map or (data_info.get("label_map") if dataset_name == "folder" else None)
    if label_map and dataset_name != "folder":
        raise CLIError(f"--label-map applies to the folder dataset, not {dataset_name!r}")
    full_set = make_dataset(dataset_name, args.data_root, args.split, transform,
                            **({"label_map": label_map} if label_map else {}))
    if full_set.num_classes != config["num_classes"]:
        raise CLIError(
            f"{checkpoint} predicts {config['num_classes']} classes but the {dataset_name} dataset at "
            f"{args.data_root} has {full_set.num_classes}; evaluate it on the dataset it was trained for"
        )
    return dataset_name, full_set


def resolved_settings(args: argparse.Namespace, *, checkpoint: Path, config: Dict[str, Any], dataset_name: str,
                      images: int, output_stride: int, inference: InferenceConfig, info: Any,
                      exported: Optional[Dict[str, Any]], trimap_source: str) -> Dict[str, Any]:
    """What was evaluated and how: printed first and stored in report.json."""
    resolved = {
        "checkpoint": str(checkpoint),
        "arch": config["arch"],
        "backbone": config["backbone"],
        "dataset": dataset_name,
        "data_root": args.data_root,
        "split": args.split,
        "images": images,
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
    # New keys only when their option is used: a plain run's report keeps its old shape.
    if exported is not None:
        resolved.update(exported)
    if args.trimap:
        resolved["trimap_widths"] = sorted(args.trimap)
        resolved["trimap_source"] = trimap_source
    if args.boundary_f is not None:
        resolved["boundary_f_tolerance"] = args.boundary_f
    if args.worst:
        resolved["worst"] = args.worst
    return resolved


def report_results(args: argparse.Namespace, result: EvalResult, *, loaded: ModelCard, full_set: SegmentationDataset,
                   resolved: Dict[str, Any], out_dir: Path, source: Any) -> None:
    """Print the tables and write report.json, confusion.png and the optional trimap / worst files."""
    cm = result.confusion
    config, exported, checkpoint = loaded.config, loaded.exported, Path(resolved["checkpoint"])
    class_names = list(loaded.classes or full_set.classes)
    sections = result.sections(class_names)
    for score in sections.get("per_image", []):
        score["name"] = full_set.names[score["index"]]
    report = write_report(cm, class_names, out_dir, extra=resolved, sections=sections)
    print(cm.format_table(class_names))
    print(f"mIoU {100 * cm.miou:.2f}  pixel accuracy {100 * cm.pixel_accuracy:.2f}  "
          f"({resolved['images']} images, OS {resolved['output_stride']}, scales {resolved['scales']}, "
          f"flip {resolved['flip']}, {resolved['mode']})")
    if exported is not None:
        print(f"measured: {exported['model_file']} ({exported['format']}, {exported['backend']}, "
              f"{exported['precision']}, input {exported['input_size']})")
    if result.trimap is not None:
        print(result.trimap.format_table())
        identity = {key: resolved[key] for key in ("checkpoint", "arch", "backbone", "dataset", "split", "images")}
        trimap_json = write_trimap(result, class_names, out_dir, f"{config['arch']} ({checkpoint.parent.name})",
                                   identity)
        print(f"trimap: {trimap_json}, {trimap_json.parent / 'trimap.png'}")
    if result.boundary_f is not None:
        bf = result.boundary_f
        print(f"boundary F @ {bf.tolerance} px: {100 * bf.mean:.2f} (mean over {int((bf.counts > 0).sum())} classes)")
    if result.worst:
        # a checkpoint's worst images keep the dataset's colours (as before the model card)
        palette = list((loaded.palette if exported is not None else None) or full_set.palette)
        paths = write_worst(result, full_set, palette, class_names, out_dir)
        print(f"worst {len(paths)} images (IoU = mean over the classes in the image):")
        for entry, path in zip(result.worst, paths):
            assert entry.score.iou is not None
            print(f"  {100 * entry.score.iou:6.2f}  {full_set.names[entry.score.index]}  -> {path}")
    comparison = zoo_comparison(source, cm.miou, args.split)
    if comparison is not None:
        print(comparison)
    print(f"report: {report}\nconfusion matrix: {report.parent / 'confusion.png'}")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    source = resolve_model_source(args, eval_settings=True)  # a zoo name brings its eval setting
    if source.entry is not None and args.out is None:
        args.out = str(Path("runs") / "zoo" / f"{source.entry.name}_eval_{args.split}")
    inference = inference_config(args)
    check_options(args)
    checkpoint = Path(args.checkpoint)
    model, loaded = open_model_to_eval(args, inference)
    exported = loaded.exported
    info = dist_utils.init_distributed(device="cpu" if exported is not None else args.device)
    model.to(info.device)
    dataset_name, full_set = open_dataset(args, loaded, checkpoint)
    dataset: Union[SegmentationDataset, Subset[Any]] = full_set
    if args.limit is not None:
        dataset = Subset(full_set, range(min(args.limit, len(full_set))))
    sampler = ShardSampler(dataset) if info.world_size > 1 else None
    loader = DataLoader(dataset, batch_size=1, shuffle=False, sampler=sampler, num_workers=args.num_workers)
    output_stride = int(model.output_stride)  # type: ignore[arg-type]
    trimap_source = args.trimap_source
    if trimap_source == "auto":
        trimap_source = "void" if dataset_name == "voc" else "boundary"
    resolved = resolved_settings(args, checkpoint=checkpoint, config=loaded.config, dataset_name=dataset_name,
                                 images=len(dataset), output_stride=output_stride, inference=inference, info=info,
                                 exported=exported, trimap_source=trimap_source)
    if info.is_main:
        print_config("deeplab eval", resolved)
    result = evaluate_detailed(
        model,
        loader,
        num_classes=loaded.num_classes,
        device=info.device,
        inference=inference,
        progress=info.is_main and not args.no_progress,
        trimap_widths=sorted(args.trimap) if args.trimap else None,
        trimap_source=trimap_source,
        boundary_tolerance=args.boundary_f,
        per_image=True,
        worst=args.worst,
    )
    if info.is_main:
        out_dir = Path(args.out) if args.out else default_out_dir(
            checkpoint, args.split, inference, output_stride, exported["backend"] if exported else None)
        report_results(args, result, loaded=loaded, full_set=full_set, resolved=resolved, out_dir=out_dir, source=source)
    dist_utils.cleanup()
    return {"miou": result.confusion.miou, "pixel_accuracy": result.confusion.pixel_accuracy}


@cli_command("eval")
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
