"""``deeplab weights fetch NAME`` / ``deeplab weights list``: public ImageNet backbone files."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from deeplab.cli.common import cli_command
from deeplab.weights import PRETRAINED_FILES, fetch_weights, hub_checkpoint_dir


@cli_command("weights")
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deeplab weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="put a backbone's ImageNet file into the torch hub cache (sha256-checked)")
    fetch.add_argument("backbone", choices=sorted(PRETRAINED_FILES))
    fetch.add_argument("--cache-dir", default=None, help=f"default: {hub_checkpoint_dir()}")
    sub.add_parser("list", help="known files and whether they are in the cache")
    args = parser.parse_args(argv)
    if args.command == "list":
        for backbone, entries in PRETRAINED_FILES.items():
            for entry in entries:
                here = (hub_checkpoint_dir() / entry.filename).is_file()
                print(f"{backbone:<13} {entry.filename:<30} {'cached' if here else '-':<7} {entry.source}")
        return 0
    path = fetch_weights(args.backbone, cache_dir=args.cache_dir)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
