"""``deeplab export --checkpoint CKPT --format onnx|torchscript --out FILE``.

BatchNorm is folded into the convs, batch/height/width stay dynamic, the class names,
palette and normalisation are embedded in the file, and a parity check runs on export:
``max |diff|`` of logits between the exported file and the PyTorch model on a
``1 x 3 x S x S`` input (``--parity-size``, default 513, the paper's eval size) and on a
second, non-square batch of 2 (to show the shapes really are dynamic). It must be below
``--tolerance`` (1e-3); otherwise the command exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from deeplab.cli.common import add_model_source_args, cli_command, resolve_model_source


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab export",
        description="Export a checkpoint to ONNX or TorchScript (BN folded, dynamic shapes, parity-checked).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_source_args(parser, what="deeplab checkpoint (.pt)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--out", required=True, help="output file, e.g. model.onnx / model.torchscript.pt")
    parser.add_argument("--output-stride", type=int, default=None, choices=[8, 16, 32],
                        help="rebuild at this output stride before exporting (default: the checkpoint's)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers")
    parser.add_argument("--parity-size", type=int, default=513, help="side of the parity-check input")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="parity: largest allowed max |diff| of logits")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    return parser


@cli_command("export")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_model_source(args)
    import torch

    from deeplab.checkpoint import load_model
    from deeplab.deploy.export import export_model, model_metadata
    from deeplab.deploy.format import ExportError
    from deeplab.deploy.runtime import check_parity

    model, ckpt = load_model(args.checkpoint, map_location="cpu", output_stride=args.output_stride)
    cfg = model.config
    assert cfg is not None  # load_model rebuilds the model from its config and keeps it there
    print(
        f"deeplab export: {args.checkpoint} ({cfg.arch} / {cfg.backbone}, OS {model.output_stride}, "
        f"{model.num_classes} classes) -> {args.out} [{args.format}{f', opset {args.opset}' if args.format == 'onnx' else ''}, "
        f"fold_bn={not args.no_fold_bn}]",
        flush=True,
    )
    meta = model_metadata(model, classes=ckpt.get("classes"), palette=ckpt.get("palette"),
                          normalization=ckpt.get("normalization"))
    start = time.perf_counter()
    path = export_model(model, args.out, format=args.format, metadata=meta, fold_bn=not args.no_fold_bn,
                        opset=args.opset)
    size_mb = Path(path).stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MiB) in {time.perf_counter() - start:.1f} s; "
          f"inputs 'image' (batch, 3, height, width) -> 'logits' (batch, {model.num_classes}, height, width)")
    if args.no_parity:
        return 0
    generator = torch.Generator().manual_seed(0)
    s = args.parity_size
    real = torch.randn(1, 3, s, s, generator=generator)
    other = torch.randn(2, 3, max(s // 2, 33) | 1, max(s * 3 // 4, 33), generator=generator)
    backend = "onnxruntime" if args.format == "onnx" else "torchscript"
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
