"""``deeplab info``: parameters and Mult-Adds of every arch x backbone x output stride x head.

Mult-Adds are counted by running each model on a meta-device input of the requested size
under ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls; FLOPs / 2), so
nothing is typed in and no memory is spent on activations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from deeplab.cli.common import cli_command
from deeplab.config import ARCHS, ModelConfig
from deeplab.models import BACKBONES, build_model_from_config


def count(
    *, arch: str, backbone: str, output_stride: int, separable: bool, size: int = 513, num_classes: int = 21
) -> Dict[str, Any]:
    """Parameters and Mult-Adds of one variant at ``1 x 3 x size x size``."""
    config = ModelConfig(
        arch=arch, backbone=backbone, num_classes=num_classes, output_stride=output_stride, separable=separable
    )
    with torch.device("meta"):
        model = build_model_from_config(config).eval()
        x = torch.empty(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return {
        "arch": arch,
        "backbone": backbone,
        "output_stride": output_stride,
        "separable": separable,
        "params": sum(p.numel() for p in model.parameters()),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
        "mult_adds": counter.get_total_flops() / 2,
    }


def markdown(rows: List[Dict[str, Any]], size: int) -> str:
    lines = [
        f"| arch | backbone | OS | ASPP/decoder 3x3 | params (M) | Mult-Adds @ {size}x{size} (B) |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['backbone']} | {r['output_stride']} | {'separable' if r['separable'] else 'regular'} "
            f"| {r['params'] / 1e6:.2f} | {r['mult_adds'] / 1e9:.2f} |"
        )
    return "\n".join(lines)


@cli_command("info")
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deeplab info", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--backbone", nargs="+", default=list(BACKBONES), choices=sorted(BACKBONES))
    parser.add_argument("--output-stride", nargs="+", type=int, default=[16, 8], choices=[8, 16, 32])
    parser.add_argument("--separable", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--size", type=int, default=513, help="square input size (default 513, the paper's)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a markdown table")
    args = parser.parse_args(argv)
    rows = []
    for arch, backbone, os_, sep in itertools.product(args.arch, args.backbone, args.output_stride, args.separable):
        row = count(arch=arch, backbone=backbone, output_stride=os_, separable=sep == "on", size=args.size,
                    num_classes=args.num_classes)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(markdown(rows, args.size))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
