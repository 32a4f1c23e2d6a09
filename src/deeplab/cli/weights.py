"""``deeplab weights list`` / ``deeplab weights fetch NAME``: the paper's model zoo and public ImageNet files.

``list`` shows every model of the TF model zoo this package converts (name, dataset, model, the
zoo's mIoU and its setting, tarball size, cache state) and the public ImageNet backbone files.
``fetch NAME`` puts one into the cache: a zoo name is downloaded from its official location
(or ``--mirror`` / ``$DEEPLAB_ZOO_URL``), converted and cached under
``$TORCH_HOME/hub/checkpoints/deeplab/``; a backbone name fetches its ImageNet file.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from deeplab.cli.common import cli_command
from deeplab.weights import PRETRAINED_FILES, fetch_weights, hub_checkpoint_dir
from deeplab.zoo import ZOO, ZOO_URL_ENV, base_url, describe, pretrained_path, zoo_dir

ZOO_COLUMNS = ["name", "dataset", "model", "zoo mIoU (split, setting)", "size", "cache"]


def print_zoo() -> None:
    rows = [ZOO_COLUMNS] + [describe(entry) for entry in ZOO.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(ZOO_COLUMNS))]
    print(f"model zoo (TF reference, {base_url()}; cache {zoo_dir()}):")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@cli_command("weights")
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deeplab weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="put a zoo model (converted) or a backbone's ImageNet file into the cache")
    fetch.add_argument("name", choices=sorted(ZOO) + sorted(PRETRAINED_FILES), metavar="NAME",
                       help="a zoo name (see list) or a backbone with a public ImageNet file")
    fetch.add_argument("--cache-dir", default=None,
                       help=f"default: {zoo_dir()} (zoo), {hub_checkpoint_dir()} (ImageNet files)")
    fetch.add_argument("--mirror", default=None, metavar="URL",
                       help=f"zoo: base URL or folder instead of the official one (or ${ZOO_URL_ENV})")
    sub.add_parser("list", help="the zoo and the ImageNet files, and whether they are in the cache")
    args = parser.parse_args(argv)
    if args.command == "list":
        print_zoo()
        print(f"ImageNet backbone files ({hub_checkpoint_dir()}):")
        for backbone, entries in PRETRAINED_FILES.items():
            for entry in entries:
                here = (hub_checkpoint_dir() / entry.filename).is_file()
                print(f"  {backbone:<13} {entry.filename:<30} {'cached' if here else '-':<7} {entry.source}")
        return 0
    if args.name in ZOO:
        print(pretrained_path(args.name, mirror=args.mirror, cache_dir=args.cache_dir))
        return 0
    path = fetch_weights(args.name, cache_dir=args.cache_dir)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
