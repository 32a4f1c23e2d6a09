"""``deeplab export --checkpoint CKPT --format onnx|torchscript|tflite --out FILE``.

BatchNorm is folded into the convs, batch/height/width stay dynamic, the class names,
palette and normalisation are embedded in the file, and a parity check runs on export:
``max |diff|`` of logits between the exported file and the PyTorch model on a
``1 x 3 x S x S`` input (``--parity-size``, default 513, the paper's eval size) and on a
second, non-square batch of 2 (to show the shapes really are dynamic). It must be below
``--tolerance`` (1e-3); otherwise the command exits 1.

``--precision bf16|int8``: bf16 marks the float graph for bf16 inference (OpenVINO's
``INFERENCE_PRECISION_HINT``, torch autocast for TorchScript); int8 quantizes the ONNX graph
(static QDQ, per-channel weights) calibrated on ``--calib-images`` images from ``--calib-data
DIR`` or ``--dataset D --data-root R`` (``--calib-method``, default ONNX Runtime percentile;
``--int8-scheme``, default this CPU's: 7-bit weights without VNNI). The gate is accuracy: the
pseudo-label mIoU delta against fp32 on the held-out calibration images (and the true mIoU
delta where they have masks) is printed and stored in the file; int8 keeps its most sensitive
layers float until it is within 1.0 mIoU (bf16: 0.3, :mod:`deeplab.deploy.precision`), and where
that cannot be reached the command exits 1 naming the fix. Needs the calibration flags for int8;
for bf16 they are optional (parity on a random input otherwise).

``--format tflite``: a LiteRT file for phones and edge boards, converted by litert-torch (install
``deeplab[tflite]`` in an environment of its own), with one input size (``--input-size``, default
513 x 513); fp32 (parity on two inputs of that size) or full-integer int8 (calibrated and gated as
above, on the LiteRT interpreter).

``--format coreml``: an ``.mlpackage`` (ML Program, fp32) through ``torch.export`` and coremltools,
one input size; Core ML cannot run on Linux, so its specification is checked instead of its output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, cast

from deeplab.cli.common import CLIError, add_model_source_args, cli_command, resolve_model_source


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab export",
        description="Export a checkpoint to ONNX, TorchScript or LiteRT (BN folded, parity-checked).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_source_args(parser, what="deeplab checkpoint (.pt)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "tflite", "coreml", "hub"],
                        help="tflite: LiteRT for phones and edge boards (converted by litert-torch; fixed --input-size); "
                             "coreml: an .mlpackage for Apple devices (fixed --input-size; runs on macOS/iOS only); "
                             "hub: a folder of config.json + model.safetensors + README.md (deeplab push uploads it)")
    parser.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="tflite, coreml: the graph's one input size (default 513 513, the paper's eval crop); "
                             "smaller images are padded to it")
    parser.add_argument("--out", required=True, help="output file, e.g. model.onnx / model.torchscript.pt")
    parser.add_argument("--output-stride", type=int, default=None, choices=[8, 16, 32],
                        help="rebuild at this output stride before exporting (default: the checkpoint's)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers")
    parser.add_argument("--parity-size", type=int, default=513, help="side of the parity-check input")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="parity: largest allowed max |diff| of logits")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    group = parser.add_argument_group("precision")
    group.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                       help="bf16: float graph run at bf16 by OpenVINO / torch autocast; int8: ONNX QDQ, calibrated")
    group.add_argument("--calib-data", default=None, metavar="DIR", help="folder of calibration images (int8; bf16 parity)")
    group.add_argument("--dataset", default=None, help="calibrate on this dataset instead (voc, cityscapes, ade20k, folder)")
    group.add_argument("--data-root", default=None, help="root of --dataset")
    group.add_argument("--split", default=None, help="split of --dataset (default: the dataset's)")
    group.add_argument("--calib-images", type=int, default=40,
                       help="images to read; a fifth (at least 1) are held out to measure parity (40: 32 calibrate)")
    group.add_argument("--calib-method", default=None, choices=["nncf", "percentile", "minmax", "entropy"],
                       help="int8 calibration (default: percentile, chosen by measurement); nncf: OpenVINO NNCF with accuracy "
                            "control (quantize_with_accuracy_control validated by the mIoU gate; its files run fast in "
                            "OpenVINO only)")
    group.add_argument("--int8-scheme", default="auto", choices=["auto", "u8s8", "u8s7"],
                       help="int8 weights: u8s8 8-bit (VNNI/AMX CPUs), u8s7 7-bit (no int16 saturation without VNNI); "
                            "auto: this CPU's")
    group.add_argument("--int8-float-fraction", type=float, default=0.5,
                       help="int8: the largest share of the convs kept float (most sensitive first) to reach the 1.0 mIoU "
                            "bound (nncf: NNCF's steps); 0 quantizes every layer outside the logits / image pool / resizes")
    return parser


@cli_command("export")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_model_source(args)
    if args.format == "hub":
        from deeplab.cli.push import save_and_check

        save_and_check(Path(args.checkpoint), Path(args.out), name=None)
        return 0
    import torch

    from deeplab.deploy.export import export_model, model_metadata
    from deeplab.deploy.format import FIXED_INPUT_SIZE, ExportError, sniff_format
    from deeplab.deploy.open import open_model
    from deeplab.deploy.runtime import check_parity
    from deeplab.models import DeepLabV3

    kind = sniff_format(args.checkpoint)
    if kind != "checkpoint":
        raise CLIError(f"{args.checkpoint} is already an exported model ({kind}); export takes a deeplab checkpoint")
    opened, card = open_model(args.checkpoint, backend="torch", device="cpu", output_stride=args.output_stride)
    model = cast(DeepLabV3, opened)  # a checkpoint opens as its DeepLab model (not optimised)
    cfg = model.config
    assert cfg is not None  # load_model rebuilds the model from its config and keeps it there
    print(
        f"deeplab export: {args.checkpoint} ({cfg.arch} / {cfg.backbone}, OS {model.output_stride}, "
        f"{model.num_classes} classes) -> {args.out} [{args.format}{f', opset {args.opset}' if args.format == 'onnx' else ''}, "
        f"fold_bn={not args.no_fold_bn}]",
        flush=True,
    )
    if args.input_size is not None and args.format not in ("tflite", "coreml"):
        raise CLIError("--input-size applies to --format tflite and coreml (ONNX and TorchScript exports take any size)")
    if args.format == "coreml" and args.precision != "fp32":
        raise CLIError("--format coreml writes fp32 ML Programs (Core ML picks its own compute units on the device)")
    if args.format == "tflite" and args.precision == "bf16":
        raise CLIError("--format tflite writes fp32 or int8; for bf16 export ONNX (OpenVINO) or TorchScript")
    meta = model_metadata(model, classes=card.classes, palette=card.palette, normalization=card.normalization)
    calibration = _calibration(args, meta, model.output_stride)
    qat = _qat_ranges(args)
    start = time.perf_counter()
    path = export_model(model, args.out, format=args.format, metadata=meta, fold_bn=not args.no_fold_bn,
                        opset=args.opset, precision=args.precision, calibration=calibration,
                        calib_method=args.calib_method, int8_scheme=args.int8_scheme,
                        int8_float_fraction=args.int8_float_fraction, input_size=args.input_size,
                        report=lambda line: print(line, flush=True), qat=qat)
    files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [Path(path)]  # .mlpackage: a folder
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    h, w = args.input_size or FIXED_INPUT_SIZE
    shape = ("(batch, 3, height, width)", f"(batch, {model.num_classes}, height, width)") if args.format in (
        "onnx", "torchscript") else (f"(1, 3, {h}, {w})", f"(1, {model.num_classes}, {h}, {w})")
    print(f"wrote {path} ({size_mb:.1f} MiB, {args.precision}) in {time.perf_counter() - start:.1f} s; "
          f"inputs 'image' {shape[0]} -> 'logits' {shape[1]}")
    if args.precision != "fp32":
        return _report_precision(path)
    if args.format == "coreml":
        from deeplab.deploy.coreml import check_spec

        spec = check_spec(path, model.num_classes, (h, w), channels=int(getattr(model, "in_channels", 3) or 3))
        print(f"Core ML spec checked: {spec['input'][0]} {spec['input'][1]} float32 -> {spec['output'][0]} "
              f"{spec['output'][1]} float32, deeplab metadata present. Predictions need macOS or iOS (coremltools "
              "cannot run them on Linux): parity not measured here")
        return 0
    if args.no_parity:
        return 0
    generator = torch.Generator().manual_seed(0)
    s = args.parity_size
    real = torch.randn(1, 3, s, s, generator=generator)
    other = torch.randn(2, 3, max(s // 2, 33) | 1, max(s * 3 // 4, 33), generator=generator)
    backend = {"onnx": "onnxruntime", "tflite": "tflite"}.get(args.format, "torchscript")
    if args.format == "tflite":  # its one input size; the batch of 2 runs image by image
        real, other = torch.randn(1, 3, h, w, generator=generator), torch.randn(2, 3, h, w, generator=generator)
    worst = 0.0
    for x in (real, other):
        try:
            diff = check_parity(model, path, x, backend=backend)
        except (ExportError, RuntimeError, ValueError) as exc:
            print(f"deeplab export: parity check could not run: {exc}", file=sys.stderr)
            return 1
        worst = max(worst, diff)
        print(f"parity ({backend} vs PyTorch, input {tuple(x.shape)}): max |diff| of logits = {diff:.3g}")
    if not worst < args.tolerance:
        print(f"deeplab export: parity FAILED: {worst:.3g} >= {args.tolerance:g}; do not deploy {path}", file=sys.stderr)
        return 1
    print(f"parity OK (< {args.tolerance:g})")
    return 0


def _calibration(args: argparse.Namespace, meta: Dict[str, Any], output_stride: int) -> Any:
    """The calibration set the flags name (``None`` when none is named and none is needed)."""
    from deeplab.cli.common import CLIError
    from deeplab.deploy.calibration import calibration_set

    named = args.calib_data is not None or args.dataset is not None
    if args.precision == "fp32":
        if named:
            raise CLIError("--calib-data / --dataset calibrate bf16 and int8 exports; add --precision int8 (or bf16)")
        return None
    if args.precision == "int8" and not named:
        raise CLIError("--precision int8 needs calibration images: --calib-data DIR or --dataset NAME --data-root ROOT")
    if (args.calib_method is not None or args.int8_scheme != "auto") and args.precision != "int8":
        raise CLIError("--calib-method and --int8-scheme apply to --precision int8 only")
    if not named:
        return None
    calib = calibration_set(folder=args.calib_data, dataset=args.dataset, data_root=args.data_root, split=args.split,
                            count=args.calib_images, normalization=meta["normalization"], output_stride=output_stride)
    fewer = ""
    if len(calib.arrays) < args.calib_images:
        fewer = f" (the source has {len(calib.arrays)} of the {args.calib_images} asked for" + (
            ": fewer than 32 calibration images make the int8 ranges and the parity noisier)"
            if args.precision == "int8" else ")")
    print(f"calibration: {len(calib.calibration)} image(s) from {calib.source}, {calib.held_out} held out for parity"
          f"{fewer}", flush=True)
    return calib


def _qat_ranges(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The ranges a ``--qat`` checkpoint tracked, for an int8 ONNX export; ``None`` otherwise."""
    if args.precision != "int8" or not Path(args.checkpoint).is_file():
        return None
    from deeplab.checkpoint import load_checkpoint

    qat = load_checkpoint(args.checkpoint, map_location="cpu").get("qat")
    if qat and args.format != "onnx":
        print(f"note: {args.checkpoint} holds int8 input ranges from quantization-aware fine-tuning; the "
              f"{args.format} int8 converter calibrates its own (ONNX exports use them)", flush=True)
        return None
    return dict(qat) if qat else None


def _report_precision(path: Path) -> int:
    """Print the stored parity of a bf16/int8 export; 1 (and the fix) if it is outside its mIoU bound."""
    from deeplab.deploy.format import read_metadata
    from deeplab.deploy.precision import PARITY_BOUNDS, parity_text, parity_within_bound

    meta = read_metadata(path)
    parity, precision = meta["parity"], meta["precision"]
    quant = meta.get("quantization") or {}
    if quant:
        sensitive = quant.get("sensitive_float") or []
        print(f"quantized by {quant['tool']} ({quant['method']}, {quant['weights']} weights, scheme {quant.get('scheme')}: "
              f"{quant.get('scheme_reason')}); float layers: {', '.join(quant['keep_float']) or 'none'}"
              + (f" + {len(sensitive)} sensitive: {', '.join(sensitive)}" if sensitive else ""))
        if quant.get("qat_ranges"):
            print(f"input ranges of {quant['qat_ranges']} tensor(s) from quantization-aware fine-tuning")
        cost = quant.get("float_cost")
        if cost:
            ov = cost.get("openvino")
            print(f"speed cost of the float layers: {cost['mixed_s']:.3f} s vs {cost['all_int8_s']:.3f} s all-int8 "
                  f"({cost['slowdown']:.2f}x) on one held-out image"
                  + (f"; OpenVINO {ov['mixed_s']:.3f} s vs {ov['all_int8_s']:.3f} s ({ov['slowdown']:.2f}x)" if ov else ""))
    print(f"parity ({precision} {parity['backend']} vs fp32 PyTorch, {parity['images']} {parity['inputs']}): "
          f"{parity_text(parity, precision)}; pseudo-label mIoU {parity['pseudo_miou']:.2f}, "
          f"pixel agreement {100 * parity['pixel_agreement']:.2f}%, max |diff| of logits {parity['max_logit_diff']:.3g}")
    if parity.get("true_miou") is not None:
        print(f"true mIoU on the held-out masks: {parity['true_miou']:.2f} vs fp32 {parity['true_miou_fp32']:.2f}")
    bound = PARITY_BOUNDS[precision]
    if not parity_within_bound(parity, precision):
        if precision != "int8":
            fix = "deploy fp32 (bf16 rounds this model's near-tied logits)"
        elif parity["backend"] == "tflite":
            fix = ("calibrate on more images like the deployment's (--calib-images, --dataset with masks for the true "
                   "delta), or deploy the fp32 LiteRT file (LiteRT int8 is all-integer: no layer can stay float)")
        else:
            fix = ("calibrate on more images like the deployment's (--calib-images, --dataset with masks for the true "
                   "delta), let more layers stay float (--int8-float-fraction, up to 1), fine-tune for int8 "
                   "(deeplab train --init-from CKPT --freeze-bn --qat ...) and export that run's checkpoint, "
                   "or deploy fp32/bf16")
        print(f"deeplab export: {path} loses more than {bound:g} mIoU at {precision} "
              f"({parity_text(parity, precision)}); precision auto will not run it. Fix: {fix}", file=sys.stderr)
        return 1
    print(f"parity OK (within {bound:g} mIoU of fp32, the bound of {precision}); stored in the file")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
