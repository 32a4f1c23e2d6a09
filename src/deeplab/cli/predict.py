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

Videos (``.mp4 .mov .mkv .avi .webm``, extra ``[video]``) are segmented frame by frame, in
batches: ``DIR/<name>.mp4`` is the colour-mask video, ``--overlay`` adds ``<name>_overlay.mp4``,
``--frames`` adds ``<name>_frames/000000.png ...`` (index PNGs, lossless); fps and size are kept,
audio is dropped (with a note). ``--out clip_out.mp4`` with one video input writes that one file
(the overlay with ``--overlay``, else the mask video).

A live source works like a video: a stream URL (``rtsp://``, ``http(s)://``, ``udp://``, ...) or
a camera device (``/dev/video0``), read by PyAV. It runs until the stream ends, ``--max-frames N``
frames are done, or Ctrl-C, which closes the outputs properly (``DIR/<host_path>.mp4``).

Under ``torchrun`` the inputs are sharded across ranks (rank r takes files r, r+W, r+2W, ...
of the sorted, de-duplicated list; output names are decided on the whole list first, so they
never clash); each rank writes its own outputs and rank 0 prints the one summary.
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from deeplab._utils import DeeplabError, one_line
from deeplab.cli.common import (
    CLIError,
    add_inference_args,
    add_model_source_args,
    add_progress_args,
    add_runtime_args,
    cli_command,
    inference_config,
    resolve_model_source,
)
from deeplab.data.base import IMAGE_SUFFIXES  # the one suffix list


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab predict",
        description="Segment images with a checkpoint or an exported model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    add_model_source_args(parser, what="deeplab checkpoint (.pt) or exported model (.onnx / TorchScript)")
    parser.add_argument("--out", required=True, help="output directory (created)")
    add_runtime_args(parser)
    parser.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png with a legend")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay: weight of the mask colours")
    parser.add_argument("--no-legend", action="store_true", help="overlay without the class legend")
    parser.add_argument("--probs", action="store_true", help="also write <name>_probs.npy, (C, H, W) float32")
    add_inference_args(parser)
    parser.add_argument("--recursive", action="store_true", help="folders: include sub-folders")
    parser.add_argument("--format", default=None, choices=["cityscapes", "voc", "ade20k", "coco-stuff"],
                        help="write in a benchmark server's format (label ids, file names, folders; overlays in "
                             "OUT/overlays): see deeplab.data.submission")
    add_progress_args(parser, quiet_alias=True)
    add_video_args(parser)
    return parser


# --------------------------------------------------------------------------- video inputs


def add_video_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("video inputs (pip install 'deeplab[video]')")
    group.add_argument("--frames", action="store_true", help="also write <name>_frames/NNNNNN.png, one index PNG per frame")
    group.add_argument("--frame-batch", type=int, default=4, help="frames per forward pass")
    group.add_argument("--max-frames", type=int, default=None,
                       help="stop a video or a live stream (rtsp://, http://, /dev/video0) after this many frames")


def predict_video(segmenter: Any, path: Union[Path, str], stem: str, out: Path, args: argparse.Namespace) -> None:
    """Segment one video into the outputs its flags ask for (see the module docstring)."""
    from deeplab.video import is_video, segment_video

    if is_video(out):  # --out clip_out.mp4: that one file
        target = {"overlay_out" if args.overlay else "mask_out": out}
        frames_dir = out.with_name(out.stem + "_frames") if args.frames else None
    else:
        target = {"mask_out": out / f"{stem}.mp4"}
        if args.overlay:
            target["overlay_out"] = out / f"{stem}_overlay.mp4"
        frames_dir = out / f"{stem}_frames" if args.frames else None
    result = segment_video(segmenter, path, frames_dir=frames_dir, alpha=args.alpha, batch_size=args.frame_batch,
                           progress=not args.no_progress, max_frames=args.max_frames, **target)
    info = result.info
    note = "; audio dropped (the outputs carry no audio)" if result.dropped_audio else ""
    if result.interrupted:
        note += "; stopped by Ctrl-C (the outputs hold the frames until then)"
    tqdm_write(f"{path}: {result.frames} frames {info.width}x{info.height} at {float(info.fps):.3g} fps "
               f"in {result.seconds:.1f} s ({result.frames / max(result.seconds, 1e-9):.2f} frames/s) -> "
               f"{', '.join(str(p) for p in result.outputs)}{note}")


def tqdm_write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def stream_stem(source: str) -> str:
    """An output name for a stream: ``rtsp://cam.local:554/live`` -> ``cam.local_554_live``."""
    return re.sub(r"[^\w.-]+", "_", source.split("://", 1)[-1]).strip("_")[:80] or "stream"


def check_video_out(files: Sequence[Union[Path, str]], out: Path) -> None:
    """``--out X.mp4`` takes exactly one video input."""
    from deeplab.video import is_stream, is_video

    if is_video(out) and (len(files) != 1 or not (is_stream(files[0]) or is_video(files[0]))):
        raise CLIError(f"--out {out} names a video file: pass exactly one video input, or make --out a folder")


# --------------------------------------------------------------------------- torchrun sharding


def shard_inputs(files: List[Path], device: str) -> Tuple[List[Path], Any]:
    """This rank's share of ``files`` (all of them without torchrun) and its ``DistInfo``.

    Rank r of W takes ``files[r::W]`` (:func:`deeplab.eval.evaluate.shard_indices`): the list is
    the same on every rank (same arguments, sorted folders), so the shards are disjoint and cover
    it, and interleaving balances folders sorted by size.
    """
    from deeplab.distributed import init_distributed
    from deeplab.eval.evaluate import shard_indices

    info = init_distributed(device=device)
    return [files[i] for i in shard_indices(len(files), info.world_size, info.rank)], info


def gather_summary(info: Any, done: int, failed: List[Path], elapsed: float) -> Tuple[int, List[Path], float]:
    """Every rank's ``(done, failed, elapsed)`` summed on all ranks (elapsed: the slowest rank's);
    the process group ends here."""
    if info.world_size <= 1:
        return done, failed, elapsed
    import torch.distributed as dist

    from deeplab.distributed import cleanup

    parts: List[Any] = [None] * info.world_size
    dist.all_gather_object(parts, (done, [str(p) for p in failed], elapsed))
    cleanup()
    return (sum(p[0] for p in parts), [Path(f) for p in parts for f in p[1]], max(p[2] for p in parts))


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
                deeper = not recursive and any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                               for p in path.glob("**/*"))
                hint = "; its sub-folders have some: add --recursive" if deeper else ""
                problems.append(f"{item}: folder has no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...){hint}")
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

    from deeplab.data.base import DatasetError
    from deeplab.deploy.format import sniff_format
    from deeplab.segmenter import Segmenter
    from deeplab.video import is_stream, is_video
    from deeplab.viz import to_rgb_array

    if args.threads:
        torch.set_num_threads(args.threads)
    streams = [source for source in args.inputs if is_stream(source)]
    files, problems = collect_inputs([i for i in args.inputs if not is_stream(i)], recursive=args.recursive)
    for problem in problems:
        print(f"deeplab predict: {problem}", file=sys.stderr)
    if not files and not streams:
        raise CLIError("no input files; pass image files, folders, quoted glob patterns or a stream URL")
    check_video_out([*files, *streams], Path(args.out))
    resolve_model_source(args)  # a zoo name becomes its cached checkpoint (downloaded once, before sharding)
    names = output_names(files)  # on the whole list: the same names whichever rank writes a file
    all_files = len(files)
    files, dist_info = shard_inputs(files, args.device)
    # under torchrun each rank runs a checkpoint on its own device
    on_rank = dist_info.world_size > 1 and sniff_format(args.checkpoint) == "checkpoint"
    segmenter = Segmenter.open(args.checkpoint, backend=args.backend, device=dist_info.device if on_rank else args.device,
                               threads=args.threads, inference=inference_config(args))
    out = Path(args.out)
    (out.parent if is_video(out) else out).mkdir(parents=True, exist_ok=True)
    ranks = f" on {dist_info.world_size} ranks" if dist_info.world_size > 1 else ""
    if dist_info.is_main:
        print(
            f"deeplab predict: {all_files} file(s){ranks} -> {out} | model {args.model or args.checkpoint} "
            f"({segmenter.backend}, {segmenter.num_classes} classes) | precision {segmenter.precision} "
            f"({args.precision}: {segmenter.precision_reason or 'asked for'}) | mode={args.mode} "
            f"scales={list(segmenter.inference.scales)} flip={args.flip}{' overlay' if args.overlay else ''}"
            f"{' probs' if args.probs else ''}",
            flush=True,
        )
    writer = None
    if args.format:
        from deeplab.data.submission import SubmissionWriter

        writer = SubmissionWriter(args.format, out, segmenter.num_classes)
    done, failed = 0, []
    start = time.perf_counter()
    args.no_progress = args.no_progress or not dist_info.is_main  # one progress bar: rank 0's
    only_videos = bool(files) and all(is_video(p) for p in files)  # then the frame bars are the progress
    bar = tqdm(files, unit="img", disable=args.no_progress or only_videos, file=sys.stderr, dynamic_ncols=True)
    for path in bar:
        bar.set_postfix_str(path.name[-30:], refresh=False)
        if is_video(path):
            try:
                predict_video(segmenter, path, names[path], out, args)
                done += 1
            except (DeeplabError, RuntimeError, ValueError, OSError) as exc:
                failed.append(path)
                tqdm.write(f"failed {path}: {one_line(exc)}", file=sys.stderr)
            continue
        try:
            rgb = to_rgb_array(path)
        except (DatasetError, OSError, ValueError) as exc:
            failed.append(path)
            tqdm.write(f"skipped {path}: {_why_not_an_image(exc)}", file=sys.stderr)
            continue
        try:
            mask, probs = segmenter.predict_with_probs(rgb)
            stem = names[path]
            if writer is not None:  # a server's format: its ids and names, overlays in OUT/overlays
                writer.write(mask, stem, segmenter.overlay(rgb, mask, alpha=args.alpha, legend=not args.no_legend)
                             if args.overlay else None)
            else:
                segmenter.mask_image(mask).save(out / f"{stem}.png")
            if args.overlay and writer is None:
                segmenter.overlay(rgb, mask, alpha=args.alpha, legend=not args.no_legend).save(out / f"{stem}_overlay.png")
            if args.probs:
                np.save(out / f"{stem}_probs.npy", probs.astype(np.float32, copy=False))
            done += 1
        except (RuntimeError, ValueError, OSError) as exc:
            failed.append(path)
            tqdm.write(f"failed {path}: {exc}", file=sys.stderr)
    bar.close()
    for source in streams if dist_info.is_main else []:  # a live source is read once, by rank 0
        try:
            predict_video(segmenter, source, stream_stem(source), out, args)
            done += 1
        except (DeeplabError, RuntimeError, ValueError, OSError) as exc:
            failed.append(Path(stream_stem(source)))
            tqdm.write(f"failed {source}: {one_line(exc)}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    done, failed, elapsed = gather_summary(dist_info, done, failed, elapsed)
    if not dist_info.is_main:
        return 1 if failed else 0
    rate = f", {elapsed / max(done, 1):.3f} s/image" if done else ""
    print(f"done: {done}, failed: {len(failed)} ({elapsed:.1f} s{rate}); outputs in {out}")
    if failed:
        print("failed files:\n" + "\n".join(f"  {p}" for p in failed))
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
