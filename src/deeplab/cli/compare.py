"""``deeplab compare REPORT.json REPORT.json ...``: compare evaluation runs.

Prints a table of mIoU, pixel accuracy, boundary F, trimap mIoU per width and per-class IoU of
every report, with the difference to the first one, and writes ``compare.json`` and
``compare.png`` (per-class IoU deltas as bars; the trimap curves of all runs on one plot).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from deeplab.cli.common import cli_command
from deeplab.eval.compare import compare_reports, format_comparison, load_report, write_comparison


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", metavar="REPORT",
                        help="report.json files (or their folders); the first is the baseline")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per report (default: arch and folder)")
    parser.add_argument("--out", default=".", help="folder for compare.json and compare.png (default: .)")
    return parser


@cli_command("compare")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    reports = [load_report(p) for p in args.reports]
    comparison = compare_reports(reports, args.labels)
    print(format_comparison(comparison))
    paths = write_comparison(comparison, Path(args.out))
    print(f"comparison: {paths['json']}\nplot: {paths['png']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
