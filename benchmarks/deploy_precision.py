"""fp32 / bf16 / int8 deployment of a trained model: accuracy and speed, as ratios, in one run.

    python benchmarks/deploy_precision.py                      # the demo model on the demo photos
    python benchmarks/deploy_precision.py --checkpoint run/best.pt --data-root DATA --dataset folder

For one checkpoint (default ``/work/runs/demo/best.pt``-style: ``deeplab demo``'s MobileNetV2)
and one labelled dataset (default the 4 demo photos), it exports

* fp32 ONNX, bf16 ONNX (OpenVINO ``INFERENCE_PRECISION_HINT=bf16``), and int8 ONNX with each
  calibration method (``nncf``, ``percentile``, ``minmax``, ``entropy``), calibrated on the
  dataset's images minus the held-out last quarter (at least one);

then evaluates every file with :func:`deeplab.eval.evaluate.evaluate` around
:func:`deeplab.deploy.runtime.load_exported` (mIoU on all images, and on the held-out ones
only), prints the stored parity, and times each runtime path on one ``1 x 3 x S x S`` input
(min of ``--repeat`` interleaved runs in this one process; on a shared machine only ratios
within the run mean anything). Writes everything as JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader, Subset

from deeplab._utils import optional_import
from deeplab.checkpoint import load_model
from deeplab.data import build_dataset
from deeplab.data.transforms import EvalTransform
from deeplab.deploy.export import export_model, model_metadata
from deeplab.deploy.quantize import CALIBRATION_METHODS, calibration_set
from deeplab.deploy.runtime import AutocastBF16, load_exported
from deeplab.eval.evaluate import evaluate


def miou(model: Any, dataset: Any, num_classes: int) -> float:
    cm = evaluate(model, DataLoader(dataset, batch_size=1), num_classes=num_classes, progress=False)
    return 100.0 * float(cm.miou)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="/work/runs/demo/best.pt")
    parser.add_argument("--dataset", default="folder")
    parser.add_argument("--data-root", default=str(Path.home() / ".cache/deeplab/demo_data"))
    parser.add_argument("--size", type=int, default=513, help="side of the timed input")
    parser.add_argument("--repeat", type=int, default=7)
    # nncf only where installed (the [openvino] extra)
    methods = [m for m in CALIBRATION_METHODS if m != "nncf" or optional_import("nncf") is not None]
    parser.add_argument("--methods", nargs="+", default=methods, choices=list(CALIBRATION_METHODS))
    parser.add_argument("--json", default="deploy_precision.json")
    args = parser.parse_args()

    model, ckpt = load_model(args.checkpoint, map_location="cpu")
    norm = ckpt.get("normalization") or model.normalization.to_dict()
    meta = model_metadata(model, classes=ckpt.get("classes"), palette=ckpt.get("palette"), normalization=norm)
    dataset = build_dataset(args.dataset, args.data_root, transform=EvalTransform(mean=norm["mean"], std=norm["std"]))
    n = len(dataset)
    calib = calibration_set(dataset=args.dataset, data_root=args.data_root, count=n, normalization=norm,
                            output_stride=model.output_stride)
    held = list(range(n - calib.held_out, n))
    held_set = Subset(dataset, held)
    print(f"{args.checkpoint}: {model.config.backbone if model.config else '?'}; {n} labelled images "
          f"({args.data_root}); calibration on {len(calib.calibration)}, held out {calib.names[n - calib.held_out:]}")

    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows: List[Dict[str, Any]] = []
    runners: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="deeplab-precision-") as tmp:
        files = {"fp32": export_model(model, Path(tmp) / "fp32.onnx", metadata=meta)}
        files["bf16"] = export_model(model, Path(tmp) / "bf16.onnx", metadata=meta, precision="bf16", calibration=calib)
        for method in args.methods:
            start = time.perf_counter()
            files[f"int8 {method}"] = export_model(model, Path(tmp) / f"int8_{method}.onnx", metadata=meta,
                                                   precision="int8", calibration=calib, calib_method=method)
            print(f"int8 {method}: quantized in {time.perf_counter() - start:.0f} s")
        paths = {"torch fp32": (model, "fp32"), "torch bf16 autocast": (AutocastBF16(model), "bf16")}
        for name, file in files.items():
            precision = name.split()[0]
            if precision != "bf16":
                paths[f"onnxruntime {name}"] = (load_exported(file, backend="onnxruntime"), precision)
            paths[f"openvino {name}"] = (load_exported(file, backend="openvino", static_shapes=True), precision)
        for label, (runner, precision) in paths.items():
            meta_file = getattr(runner, "metadata", {})
            parity = meta_file.get("parity") or {}
            rows.append({"path": label, "precision": precision, "miou": miou(runner, dataset, model.num_classes),
                         "miou_held_out": miou(runner, held_set, model.num_classes),
                         "pixel_agreement": parity.get("pixel_agreement"), "max_logit_diff": parity.get("max_logit_diff"),
                         "pseudo_miou_delta": parity.get("miou_delta"), "true_miou_delta": parity.get("true_miou_delta"),
                         "sensitive_float": len((meta_file.get("quantization") or {}).get("sensitive_float") or [])})
            runners[label] = runner
        times: Dict[str, List[float]] = {label: [] for label in runners}
        with torch.inference_mode():
            for runner in runners.values():
                runner(x)
            for _ in range(args.repeat):
                for label, runner in runners.items():
                    start = time.perf_counter()
                    runner(x)
                    times[label].append(time.perf_counter() - start)
    base_time = min(times["onnxruntime fp32"])
    base_miou = rows[0]["miou"]
    print(f"\nlatency: min of {args.repeat} interleaved runs, 1x3x{args.size}x{args.size}; "
          "ratio = onnxruntime fp32 time / path time; parity on the held-out image(s)\n")
    print("| path | min (s) | speed vs ORT fp32 | mIoU (all) | Δ mIoU | mIoU (held-out) | stored pseudo-label Δ | "
          "stored true Δ | float layers | pixel agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        row["min_s"] = min(times[row["path"]])
        row["speedup_vs_ort_fp32"] = base_time / row["min_s"]
        agree = f"{100 * row['pixel_agreement']:.1f}%" if row["pixel_agreement"] is not None else "-"
        pseudo = f"{row['pseudo_miou_delta']:.2f}" if row["pseudo_miou_delta"] is not None else "-"
        true = f"{row['true_miou_delta']:+.2f}" if row["true_miou_delta"] is not None else "-"
        print(f"| {row['path']} | {row['min_s']:.3f} | {row['speedup_vs_ort_fp32']:.2f}x | {row['miou']:.2f} | "
              f"{row['miou'] - base_miou:+.2f} | {row['miou_held_out']:.2f} | {pseudo} | {true} | "
              f"{row['sensitive_float'] or '-'} | {agree} |")
    Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "data_root": args.data_root, "images": n,
                                           "held_out": calib.names[n - calib.held_out:], "size": args.size,
                                           "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
