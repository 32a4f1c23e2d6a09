"""Training throughput on this machine: model step time, peak memory, data-loader speed.

    python benchmarks/train_step.py                        # R101 OS16 crop 513 batch 2 (the issue's figure)
    python benchmarks/train_step.py --backbone mobilenet_v2 --steps 5
    python benchmarks/train_step.py --amp                  # bf16 autocast (what `deeplab train --amp` runs on CPU)

Measures, in one run:
  * the time of one SGD step (forward + backward + update) of DeepLabv3+ on random data at
    the given crop and batch (min / median over --steps after one warm-up step);
  * peak resident memory of the process (ru_maxrss) after those steps;
  * the training data pipeline (decode + random scale 0.5-2 + crop + flip + normalise) in
    images/s for one worker, on the real demo photos (VOC JPEGs, ~500x375);
and prints the model's images/s next to the loader's, i.e. how many loader workers keep the
model fed. Writes the figures as JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from deeplab import build_model
from deeplab.data import FolderSegmentation, TrainTransform, fetch_demo_data


def time_train_steps(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_model(arch=args.arch, backbone=args.backbone, num_classes=21, output_stride=args.output_stride,
                        separable=args.separable).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch_size, 3, args.crop, args.crop)
    y = torch.randint(0, 21, (args.batch_size, args.crop, args.crop))
    times = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        # as train/loop.py: forward under autocast, the loss in float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step allocates and warms the kernels
            times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s_min": min(times), "step_s_median": statistics.median(times), "steps": len(times),
            "peak_rss_mib": peak_mib, "model_images_per_s": args.batch_size / statistics.median(times)}


def time_loader(args: argparse.Namespace) -> dict:
    root = fetch_demo_data(progress=False)
    transform = TrainTransform(crop_size=args.crop)
    dataset = FolderSegmentation(root, split=None, transform=None)
    g = torch.Generator().manual_seed(0)
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.loader_seconds:
        image, mask = dataset[n % len(dataset)]  # decodes the files each time, as a worker does
        transform(image, mask, generator=g)
        n += 1
    elapsed = time.perf_counter() - start
    return {"loader_images_per_s_per_worker": n / elapsed, "loader_images": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deeplabv3plus")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--separable", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--crop", type=int, default=513)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--loader-seconds", type=float, default=10.0)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast forward (peak RSS is per process: run fp32 and amp separately)")
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    result = {"config": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}
    result.update(time_train_steps(args))
    result.update(time_loader(args))
    result["loader_workers_to_keep_up"] = result["model_images_per_s"] / result["loader_images_per_s_per_worker"]
    print(f"DeepLabv3+ {args.backbone} OS{args.output_stride} {'separable' if args.separable else 'regular'} "
          f"crop {args.crop} batch {args.batch_size}, {result['threads']} threads, {'bf16 amp' if args.amp else 'fp32'}")
    print(f"  train step: min {result['step_s_min']:.2f} s, median {result['step_s_median']:.2f} s "
          f"({result['model_images_per_s']:.2f} images/s)")
    print(f"  peak RSS: {result['peak_rss_mib']:.0f} MiB")
    print(f"  data pipeline: {result['loader_images_per_s_per_worker']:.1f} images/s per worker "
          f"-> {result['loader_workers_to_keep_up']:.3g} workers keep the model fed")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"  written to {out}")


if __name__ == "__main__":
    main()
