"""``deeplab push --checkpoint best.pt --repo ORG/NAME``: a model on the Hugging Face Hub, with its card.

The checkpoint (or a zoo model, ``--model NAME``, or a folder already written by ``deeplab export
--format hub``: ``--folder DIR``) is saved as ``config.json`` + ``model.safetensors`` + ``README.md``
(see :mod:`deeplab.hub`), loaded back and compared with the checkpoint bit for bit, then uploaded in
one commit. ``--dry-run`` stops before the upload. Anyone then loads it by name:
``deeplab.from_pretrained("ORG/NAME")`` or ``--model hf://ORG/NAME`` on predict / eval / export / serve.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from deeplab.cli.common import CLIError, cli_command, resolve_model_source
from deeplab.zoo import ZOO_BASE_URL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab push",
        description="Upload a model to the Hugging Face Hub (config.json, model.safetensors, a model card).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("model (--checkpoint, --model or --folder)")
    one = group.add_mutually_exclusive_group(required=True)
    one.add_argument("--checkpoint", default=None, help="deeplab checkpoint (.pt)")
    one.add_argument("--model", default=None, metavar="NAME", help="a model of the paper's zoo (deeplab weights list)")
    one.add_argument("--folder", default=None, metavar="DIR", help="a folder written by deeplab export --format hub")
    group.add_argument("--mirror", default=None, metavar="URL", help=f"zoo tarballs from here instead of {ZOO_BASE_URL}")
    parser.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub repo (created when missing)")
    parser.add_argument("--revision", default=None, help="branch to commit to (default main)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", default=None, help="write token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--name", default=None, help="title of the model card")
    parser.add_argument("--out", default=None, metavar="DIR", help="keep the saved folder here (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="save and check the folder, do not upload")
    return parser


@cli_command("push")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from deeplab import hub

    if args.folder is not None:
        folder = Path(args.folder)
        loaded = hub.load_pretrained(folder)  # refuses a folder whose weights differ from its config.json
        print(f"deeplab push: {folder} ({loaded.config['name']}, {len(loaded.classes)} classes) checked")
        return _upload(args, folder)
    if args.model is not None and args.model.startswith("hf://"):
        raise CLIError(f"--model {args.model} is already on the Hub; push a checkpoint, a zoo name or a folder")
    resolve_model_source(args)
    with tempfile.TemporaryDirectory(prefix="deeplab-push-") as tmp:
        folder = Path(args.out) if args.out else Path(tmp) / "model"
        save_and_check(Path(args.checkpoint), folder, name=args.name)
        return _upload(args, folder)


def save_and_check(checkpoint: Path, folder: Path, *, name: Optional[str]) -> None:
    """Write the folder and load it back: the weights must equal the checkpoint's bit for bit."""
    import torch

    from deeplab import hub
    from deeplab.checkpoint import load_model

    hub.save_pretrained_from_checkpoint(checkpoint, folder, name=name)
    original, _ = load_model(checkpoint, map_location="cpu")
    loaded = hub.load_pretrained(folder)
    want, got = original.state_dict(), loaded.model.state_dict()
    same = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    if not same:
        raise CLIError(f"{folder}: the saved weights differ from {checkpoint}; this is a bug, please report it")
    weights = loaded.config["weights"]
    print(f"deeplab push: saved {checkpoint} -> {folder} (config.json, model.safetensors "
          f"{weights['size'] / 2**20:.1f} MiB sha256 {weights['sha256'][:16]}..., README.md); "
          f"reloaded: {len(want)} tensors equal bit for bit")


def _upload(args: argparse.Namespace, folder: Path) -> int:
    from deeplab import hub

    if args.dry_run:
        print(f"deeplab push: --dry-run, nothing uploaded; the folder is {folder}")
        return 0
    result = hub.push_to_hub(folder, args.repo, token=args.token, revision=args.revision, private=args.private,
                             commit_message=args.message)
    print(f"pushed to {result.url} (revision {result.revision}, commit {result.commit})")
    print(f"load it: deeplab.from_pretrained(\"{result.repo_id}@{result.commit[:12]}\")  or  "
          f"--model hf://{result.repo_id}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
