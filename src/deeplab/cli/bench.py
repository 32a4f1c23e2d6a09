"""``deeplab bench``: CPU inference latency of DeepLabv3+ against the machine's own limits.

Flags and printing only; what is measured and how is :mod:`deeplab.deploy.bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from deeplab.cli.common import cli_command
from deeplab.deploy.bench import DEFAULT_BACKBONES, DEFAULT_PATHS, PATH_SPECS, PATHS, PRECISIONS, markdown_table, run_bench


def build_parser() -> argparse.ArgumentParser:
    from deeplab.deploy import bench

    parser = argparse.ArgumentParser(prog="deeplab bench", description=(bench.__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--arch", default="deeplabv3plus", choices=["deeplabv3plus", "deeplabv3"])
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16, 32])
    parser.add_argument("--regular", action="store_true", help="regular 3x3 convs in ASPP/decoder (default: separable)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=list(PATHS),
                        help="deployment paths to time (tflite, tflite_int8: only by name; they need litert-torch)")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="only the paths of these precisions (each measured against its own GEMM limit)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (the machine's cores)")
    parser.add_argument("--gemm-size", type=int, default=4096, help="N of the N x N GEMMs that measure the limits")
    parser.add_argument("--json", default="bench.json", help="where to write the full report")
    return parser


@cli_command("bench")
def main(argv: Optional[List[str]] = None) -> int:
    """``deeplab bench``: parse ``argv``, run, print the table and write the JSON report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths if PATH_SPECS[p].precision in args.precision]
    if not args.paths:
        parser.error(f"no path of --paths runs at --precision {' '.join(args.precision)}")
    print(f"deeplab bench: {vars(args)}", flush=True)
    report = run_bench(
        backbones=args.backbones, arch=args.arch, size=args.size, batch=args.batch, output_stride=args.output_stride,
        separable=not args.regular, num_classes=args.num_classes, paths=args.paths, warmup=args.warmup,
        repeat=args.repeat, threads=args.threads, gemm_size=args.gemm_size,
        log=lambda s: print(s, flush=True),
    )
    print()
    print(markdown_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
