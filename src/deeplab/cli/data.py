"""``deeplab data check``: the label doctor - read every mask once, report the pitfalls;
``deeplab data fetch NAME --root DIR``: the paper's datasets from their official archives.

``deeplab data check --dataset folder --data-root DIR [--split S] [--label-map 255:1] [--out OUT]``
prints a summary and writes ``OUT/data_report.json``, ``OUT/class_frequency.png`` and
``OUT/class_weights.txt`` (median-frequency weights, for ``deeplab train --class-weights``).
Exit status 1 when it found errors, 0 otherwise (2: the command itself failed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from deeplab.cli.common import add_data_args, cli_command, make_dataset
from deeplab.data.base import DatasetError
from deeplab.data.check import check_dataset, write_class_weights
from deeplab.viz import plot_class_frequency


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="report class histogram, ignore share, sizes and label pitfalls")
    add_data_args(check, split=None)
    check.add_argument("--label-map", default=None,
                       help="folder datasets: remap mask values first, e.g. 255:1 for 0/255 binary masks")
    check.add_argument("--out", default="data_check", help="folder for data_report.json, class_frequency.png, "
                                                           "class_weights.txt")
    check.add_argument("--workers", type=int, default=2, help="worker processes reading masks (0: none)")
    check.add_argument("--no-progress", action="store_true")
    add_fetch_parser(sub)
    return parser


def add_fetch_parser(sub: Any) -> None:
    from deeplab.data.fetch import MIRROR_ENV, SPECS

    fetch = sub.add_parser("fetch", help="download, verify and convert a dataset of the paper",
                           description="Download (resumable, checksummed), extract and convert a dataset into the "
                                       "layout `deeplab train` reads; then run `data check` and print the training "
                                       "command. A second run makes no request.")
    fetch.add_argument("name", choices=sorted(SPECS), help="dataset")
    fetch.add_argument("--root", required=True, help="folder to fill (archives go to ROOT/archives)")
    fetch.add_argument("--sbd", action="store_true", help="voc2012: add SBD and build train_aug (10,582 images)")
    fetch.add_argument("--mirror", default=None, help=f"base URL or folder holding the archives under their official "
                                                      f"names (default ${MIRROR_ENV}, else the official URLs)")
    fetch.add_argument("--from", dest="source", default=None, help="folder with the official archives downloaded by "
                                                                  "hand (no network)")
    fetch.add_argument("--workers", type=int, default=2, help="worker processes for conversions (0: none)")
    fetch.add_argument("--no-check", action="store_true", help="skip `deeplab data check` on the result")
    fetch.add_argument("--no-progress", action="store_true")


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch the dataset of ``args``, check it, print the training command."""
    from deeplab.data.fetch import fetch

    result = fetch(args.name, args.root, sbd=args.sbd, mirror=args.mirror, source=args.source,
                   workers=max(0, args.workers), progress=not args.no_progress)
    for archive, digest in sorted(result.sha256.items()):
        print(f"{archive}: sha256 {digest}")
    print("splits: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
    for warning in result.warnings:
        print(f"WARNING {warning}")
    if result.spec.note:
        print(result.spec.note)
    status = 0
    if not args.no_check:
        check = argparse.Namespace(dataset=result.spec.loader, data_root=str(result.data_root),
                                   split=result.spec.check_split, label_map=None, out=str(result.root / "data_check"),
                                   workers=max(0, args.workers), no_progress=args.no_progress)
        print(f"$ deeplab data check --dataset {check.dataset} --data-root {check.data_root} --split {check.split} "
              f"--out {check.out}")
        status = run_check(check)
    print("train the paper's recipe on it with:")
    print(f"  {result.train_command}")
    return status


def summary_lines(report: Dict[str, Any]) -> List[str]:
    """The printed summary of a report."""
    lines = [f"{report['dataset']} {report['split']}: {report['samples']} samples, {len(report['classes'])} classes, "
             f"{report['total_pixels']} pixels, ignore {100 * report['ignore_share']:.2f}%"]
    sizes = report["image_sizes"]
    shown = ", ".join(f"{k} ({v})" for k, v in list(sizes.items())[:5])
    lines.append(f"image sizes: {len(sizes)} distinct: {shown}{' ...' if len(sizes) > 5 else ''}")
    total = max(sum(report["class_pixels"]), 1)
    width = max(len(c) for c in report["classes"])
    lines.append(f"  {'class':<{width}}  {'pixels %':>8}  {'images':>6}  {'weight':>7}")
    for name, pixels, images, weight in zip(report["classes"], report["class_pixels"], report["class_images"],
                                            report["class_weights"]):
        lines.append(f"  {name:<{width}}  {100 * pixels / total:8.2f}  {images:6d}  {weight:7.3f}")
    for problem in report["problems"]:
        lines.append(f"{problem['severity'].upper()} {problem['kind']}: {problem['count']} {problem['what']}")
        for item in problem["files"][:5]:
            lines.append(f"    {item}")
        if problem["count"] > 5:
            lines.append(f"    ... {problem['count'] - 5} more in data_report.json")
        lines.append(f"  fix: {problem['fix']}")
    lines.append(f"{report['errors']} error(s), {report['warnings']} warning(s)")
    return lines


def run_check(args: argparse.Namespace) -> int:
    """Check the dataset of ``args``; write the report files; 1 on errors."""
    name = args.dataset or "folder"
    kwargs: Dict[str, Any] = {}
    if args.label_map:
        if name != "folder":
            raise DatasetError(f"--label-map applies to the folder dataset, not {name!r}")
        kwargs["label_map"] = args.label_map
    out = Path(args.out)
    try:
        dataset = make_dataset(name, args.data_root, args.split, None, **kwargs)
    except DatasetError as exc:
        # the layout itself is broken (e.g. duplicate stems): that is the finding, exit 1
        out.mkdir(parents=True, exist_ok=True)
        report = {"dataset": name, "root": str(args.data_root), "split": args.split, "errors": 1,
                  "problems": [{"kind": "layout", "severity": "error", "what": str(exc), "count": 1,
                                "files": [], "fix": "see the message"}]}
        (out / "data_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"ERROR layout: {exc}")
        print(f"1 error(s); report: {out / 'data_report.json'}")
        return 1
    report = check_dataset(dataset, workers=max(0, args.workers), progress=not args.no_progress, name=name)
    out.mkdir(parents=True, exist_ok=True)
    weights = write_class_weights(report["class_weights"], out / "class_weights.txt", report["classes"])
    plot_class_frequency(report["classes"], report["class_pixels"], report["class_images"],
                         out / "class_frequency.png", title=f"{name} {report['split']}: {report['samples']} masks")
    report["class_weights_file"] = str(weights)
    (out / "data_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for line in summary_lines(report):
        print(line)
    print(f"report: {out / 'data_report.json'}; chart: {out / 'class_frequency.png'}; "
          f"weights: {weights} (deeplab train --class-weights {weights})")
    return 1 if report["errors"] else 0


@cli_command("data")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "fetch":
        return run_fetch(args)
    return run_check(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
