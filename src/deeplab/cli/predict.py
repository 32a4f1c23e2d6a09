"""``deeplab predict --checkpoint MODEL INPUT... --out DIR``: segment images.

For every input image it writes ``DIR/<name>.png``, an index PNG (pixel value = class id,
the model's palette embedded, same size as the input); with ``--overlay`` also
``DIR/<name>_overlay.png`` (image blended with the colour mask, legend of the classes
present); with ``--probs`` also ``DIR/<name>_probs.npy`` (``(C, H, W)`` float32 softmax).

INPUT may be image files, folders (their image files, sorted) or glob patterns (quoted, so
the shell leaves them alone; ``**`` recurses). MODEL is a deeplab checkpoint (run with
PyTorch) or a file from ``deeplab export`` (``--backend onnxruntime|openvino`` for ONNX,
``torch`` for TorchScript). A file that is not an image is reported and skipped; the run
ends with a summary, and exits 1 if any file failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from deeplab.cli.common import CLIError, add_inference_args, cli_command, inference_config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab predict",
        description="Segment images with a checkpoint or an exported model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                        help="deeplab checkpoint (.pt) or exported model (.onnx / TorchScript)")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "openvino"],
                        help="torch: a checkpoint or TorchScript file; onnxruntime/openvino: an .onnx file")
    parser.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png with a legend")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay: weight of the mask colours")
    parser.add_argument("--no-legend", action="store_true", help="overlay without the class legend")
    parser.add_argument("--probs", action="store_true", help="also write <name>_probs.npy, (C, H, W) float32")
    add_inference_args(parser)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="auto: the fastest this CPU accelerates whose stored export parity is in bound (fp32 for a checkpoint)")
    parser.add_argument("--device", default="cpu", help="torch backend: cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--recursive", action="store_true", help="folders: include sub-folders")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def collect_inputs(inputs: List[str], *, recursive: bool = False) -> Tuple[List[Path], List[str]]:
    """Expand files, folders and globs into a de-duplicated list of files.

    Returns:
        ``(files, problems)``: files in the given order (folder contents sorted); problems are
        messages for inputs that matched nothing.
    """
    files: List[Path] = []
    problems: List[str] = []
    seen = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{item}: folder has no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
            for p in found:
                add(p)
        elif path.is_file():
            add(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                problems.append(f"{item}: pattern matched no files")
            for p in matches:
                add(p)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def output_names(files: List[Path]) -> Dict[Path, str]:
    """A unique output stem per input: the file stem, with ``-2``, ``-3``... on clashes."""
    names: Dict[Path, str] = {}
    used: Dict[str, int] = {}
    for path in files:
        stem = path.stem
        count = used.get(stem, 0) + 1
        used[stem] = count
        names[path] = stem if count == 1 else f"{stem}-{count}"
    return names


def _why_not_an_image(exc: BaseException) -> str:
    """One line for a file that could not be read as an image (the dataset loader's message
    talks about split lists, which mean nothing here)."""
    from PIL import UnidentifiedImageError

    cause = exc.__cause__
    if isinstance(cause, UnidentifiedImageError):
        return "not an image file Pillow can decode"
    if cause is not None:
        return f"truncated or corrupt image ({cause})"
    return str(exc)


@cli_command("predict")
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch
    from tqdm import tqdm

    from deeplab.checkpoint import CheckpointError
    from deeplab.data.base import DatasetError
    from deeplab.deploy.format import ExportError
    from deeplab.segmenter import Segmenter
    from deeplab.viz import to_rgb_array

    if args.threads:
        torch.set_num_threads(args.threads)
    files, problems = collect_inputs(args.inputs, recursive=args.recursive)
    for problem in problems:
        print(f"deeplab predict: {problem}", file=sys.stderr)
    if not files:
        raise CLIError("no input files; pass image files, folders or quoted glob patterns")
    try:
        inference = dataclasses.replace(inference_config(args), precision=args.precision)
        if args.backend == "torch":
            segmenter = Segmenter.load(args.checkpoint, backend="torch", device=args.device, inference=inference)
        else:
            segmenter = Segmenter.load(args.checkpoint, backend=args.backend, threads=args.threads, inference=inference)
    except (CheckpointError, ExportError, FileNotFoundError, ValueError) as exc:
        # Segmenter.load says "bad option / wrong file for this backend" with ValueError: a user error
        raise CLIError(str(exc)) from exc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"deeplab predict: {len(files)} file(s) -> {out} | model {args.checkpoint} ({segmenter.backend}, "
        f"{segmenter.num_classes} classes) | precision {segmenter.precision} ({args.precision}: "
        f"{segmenter.precision_reason or 'asked for'}) | mode={args.mode} scales={list(segmenter.scales)} flip={args.flip}"
        f"{' overlay' if args.overlay else ''}{' probs' if args.probs else ''}",
        flush=True,
    )
    names = output_names(files)
    done, failed = 0, []
    start = time.perf_counter()
    bar = tqdm(files, unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    for path in bar:
        bar.set_postfix_str(path.name[-30:], refresh=False)
        try:
            rgb = to_rgb_array(path)
        except (DatasetError, OSError, ValueError) as exc:
            failed.append(path)
            tqdm.write(f"skipped {path}: {_why_not_an_image(exc)}", file=sys.stderr)
            continue
        try:
            mask, probs = segmenter.predict_with_probs(rgb)
            stem = names[path]
            segmenter.mask_image(mask).save(out / f"{stem}.png")
            if args.overlay:
                segmenter.overlay(rgb, mask, alpha=args.alpha, legend=not args.no_legend).save(out / f"{stem}_overlay.png")
            if args.probs:
                np.save(out / f"{stem}_probs.npy", probs.astype(np.float32, copy=False))
            done += 1
        except (RuntimeError, ValueError, OSError) as exc:
            failed.append(path)
            tqdm.write(f"failed {path}: {exc}", file=sys.stderr)
    bar.close()
    elapsed = time.perf_counter() - start
    rate = f", {elapsed / max(done, 1):.3f} s/image" if done else ""
    print(f"done: {done}, failed: {len(failed)} ({elapsed:.1f} s{rate}); outputs in {out}")
    if failed:
        print("failed files:\n" + "\n".join(f"  {p}" for p in failed))
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
