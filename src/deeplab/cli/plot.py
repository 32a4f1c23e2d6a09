"""``deeplab plot RUN_DIR [RUN_DIR ...]``: training curves of one or more runs in one PNG.

Reads each run's ``metrics.jsonl`` and draws loss, learning rate and the evaluation metric
against step, one line per run (``--out``, default ``curves.png``; with one run and no
``--out`` it is ``RUN_DIR/curves.png``, the file training rewrites at every evaluation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

from deeplab.cli.common import CLIError, cli_command
from deeplab.viz import plot_curves, read_metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png for one run, "
                                                    "else curves.png)")
    parser.add_argument("--metric", default="mIoU", help="evaluation metric of the third panel")
    parser.add_argument("--title", default=None)
    return parser


@cli_command("plot")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    runs: Dict[str, list] = {}
    for run in args.runs:
        label = Path(run).resolve().name
        while label in runs:  # two runs named alike (a/run, b/run): keep both
            label += "'"
        records = read_metrics(run)
        if not records:
            raise CLIError(f"{run}: metrics.jsonl holds no train or eval records yet")
        runs[label] = records
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1
                                           else Path("curves.png"))
    plot_curves(runs, out, metric=args.metric, title=args.title)
    evals = {k: [r for r in v if r.get("kind") == "eval" and args.metric in r] for k, v in runs.items()}
    for label, records in runs.items():
        last = evals[label][-1] if evals[label] else None
        metric = f"{args.metric} {float(last[args.metric]):.4f} at step {last['step']}" if last else "no eval yet"
        print(f"{label}: {sum(r.get('kind') == 'train' for r in records)} train points, {metric}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
