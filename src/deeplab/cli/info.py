"""``deeplab info``: parameters and Mult-Adds of every arch x backbone x output stride x head.

Mult-Adds are counted twice by running each model on a meta-device input of the requested size
(:mod:`deeplab.models.complexity`): the convolutions proper, and as TensorFlow's profiler counts
the reference graph (the paper's tables), which adds the multiply-adds over the zero padding that
``SpaceToBatchND`` puts around every atrous convolution. ``--paper`` prints the rows of the
paper's Tables 3 and 5 next to both counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from deeplab.cli.common import cli_command
from deeplab.config import ARCHS, ModelConfig
from deeplab.models import BACKBONES
from deeplab.models.complexity import PAPER_ROWS
from deeplab.models.complexity import count as count_config

TF_COLUMN = "as TF's profiler counts it (the paper's tables)"


def count(
    *,
    arch: str,
    backbone: str,
    output_stride: int,
    separable: bool,
    size: int = 513,
    num_classes: int = 21,
    multi_grid: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Parameters and Mult-Adds of one variant at ``1 x 3 x size x size`` (see :func:`deeplab.models.complexity.count`)."""
    config = ModelConfig(arch=arch, backbone=backbone, num_classes=num_classes, output_stride=output_stride,
                         separable=separable, multi_grid=tuple(multi_grid) if multi_grid else None)
    return count_config(config, size=size)


def markdown(rows: List[Dict[str, Any]], size: int) -> str:
    """The rows of :func:`count` as a markdown table."""
    lines = [
        f"| arch | backbone | OS | ASPP/decoder 3x3 | params (M) | Mult-Adds @ {size}x{size} (B): conv | {TF_COLUMN} |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['backbone']} | {r['output_stride']} | {'separable' if r['separable'] else 'regular'} "
            f"| {r['params'] / 1e6:.2f} | {r['mult_adds'] / 1e9:.2f} | {r['mult_adds_tf'] / 1e9:.2f} |"
        )
    return "\n".join(lines)


def paper_rows() -> List[Dict[str, Any]]:
    """The Mult-Adds rows of the paper's Tables 3 and 5, counted both ways at 513x513."""
    rows = []
    for row in PAPER_ROWS:
        counted = count_config(ModelConfig(**row.config), size=513)
        counted.update(table=row.where, model=row.label, profiler=row.profiler * 1e9,
                       paper=None if row.paper is None else row.paper * 1e9)
        rows.append(counted)
    return rows


def paper_markdown(rows: List[Dict[str, Any]]) -> str:
    """The rows of :func:`paper_rows` as a markdown table (billions)."""
    lines = [
        "| table | model | conv | SpaceToBatchND padding | " + TF_COLUMN + " | TF profiler, measured | paper prints |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paper = "-" if r["paper"] is None else f"{r['paper'] / 1e9:.2f}"
        lines.append(
            f"| {r['table']} | {r['model']} | {r['mult_adds'] / 1e9:.2f} | {r['space_to_batch'] / 1e9:.2f} "
            f"| {r['mult_adds_tf'] / 1e9:.2f} | {r['profiler'] / 1e9:.2f} | {paper} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``deeplab info``."""
    parser = argparse.ArgumentParser(prog="deeplab info", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--backbone", nargs="+", default=list(BACKBONES), choices=sorted(BACKBONES))
    parser.add_argument("--output-stride", nargs="+", type=int, default=[16, 8], choices=[8, 16, 32])
    parser.add_argument("--separable", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--multi-grid", nargs="+", type=int, default=None, metavar="M",
                        help="rate multipliers of the last stage's units, e.g. 1 2 4 (the paper's ResNet); "
                             "changes only the TF-profiler count (its space-to-batch padding depends on the rates)")
    parser.add_argument("--size", type=int, default=513, help="square input size (default 513, the paper's)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--paper", action="store_true",
                        help="print the Mult-Adds rows of the paper's Tables 3 and 5 next to both counts and exit")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a markdown table")
    return parser


@cli_command("info")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.paper:
        rows = paper_rows()
        if args.json:
            for r in rows:
                print(json.dumps(r), flush=True)
        else:
            print(paper_markdown(rows))
        return 0
    rows = []
    grid = tuple(args.multi_grid) if args.multi_grid else None
    for arch, backbone, os_, sep in itertools.product(args.arch, args.backbone, args.output_stride, args.separable):
        row = count(arch=arch, backbone=backbone, output_stride=os_, separable=sep == "on", size=args.size,
                    num_classes=args.num_classes, multi_grid=grid if backbone != "mobilenet_v2" else None)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(markdown(rows, args.size))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
