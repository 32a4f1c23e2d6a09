"""Video files in and out (PyAV, extra ``[video]``) and segmenting them frame by frame.

>>> from deeplab.video import segment_video                            # doctest: +SKIP
>>> segment_video(seg, "clip.mp4", overlay_out="out.mp4")                # doctest: +SKIP

A top-level module beside :mod:`deeplab.serve`, not inside it: ``deeplab predict`` reads and
writes videos without a web server, and the server does not need video. It sits above
:mod:`deeplab.segmenter` (it drives one) and below :mod:`deeplab.cli`.

Frames are decoded as RGB, segmented in batches (one forward pass per ``batch_size`` frames, all
of a video's frames having one size), and written at the input's frame rate and size: H.264 in
``yuv420p`` (what every player shows) for even sizes, ``yuv444p`` for odd ones (4:2:0 cannot hold
an odd size, and the size is kept). Audio is not carried over (:attr:`VideoResult.dropped_audio`
says when there was some). Per-frame index PNGs are the lossless output; a video is lossy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from deeplab._utils import DeeplabError
from deeplab.eval.inference import predict_probs
from deeplab.segmenter import Segmenter
from deeplab.viz import overlay_mask

__all__ = ["STREAM_PREFIXES", "VIDEO_SUFFIXES", "VideoError", "VideoInfo", "VideoResult", "VideoWriter", "is_stream", "is_video", "probe", "read_frames",
           "segment_video"]

PathLike = Union[str, "os.PathLike[str]"]
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")


class VideoError(DeeplabError):
    """A video that cannot be read or written (names the file and the fix)."""


def is_video(path: PathLike) -> bool:
    """True for a file name with a video suffix (:data:`VIDEO_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


# Live or remote sources FFmpeg opens by URL; a camera device by its /dev/video path (V4L2).
STREAM_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
STREAM_OPEN_TIMEOUT_S = 15.0


def is_stream(source: Union[str, "os.PathLike[str]"]) -> bool:
    """True for a stream URL (:data:`STREAM_PREFIXES`) or a camera device (``/dev/videoN``)."""
    text = os.fspath(source)
    return text.lower().startswith(STREAM_PREFIXES) or text.startswith("/dev/video")


def _open(av: Any, source: str) -> Any:
    if source.startswith("/dev/video"):
        return av.open(source, format="v4l2")
    if is_stream(source):
        options = {"rtsp_transport": "tcp"} if source.lower().startswith(("rtsp://", "rtsps://")) else {}
        return av.open(source, options=options, timeout=STREAM_OPEN_TIMEOUT_S)
    return av.open(source)


def require_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise VideoError("video files need PyAV: pip install 'deeplab[video]'") from exc
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds (from its container header).

    Attributes:
        frames: frame count from the header (0 when the container does not say).
        fps: average frame rate.
        width, height: frame size in pixels.
        codec: the video codec's name.
        has_audio: an audio stream is present.
    """

    frames: int
    fps: Fraction
    width: int
    height: int
    codec: str
    has_audio: bool


def probe(path: PathLike) -> VideoInfo:
    """The :class:`VideoInfo` of ``path``.

    Raises:
        VideoError: no such file, not a video, or no video stream.
    """
    av = require_av()
    if not is_stream(path) and not Path(path).is_file():
        raise VideoError(f"video not found: {path}")
    path = os.fspath(path)
    try:
        with _open(av, path) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            return VideoInfo(frames=int(stream.frames or 0), fps=Fraction(rate), width=stream.codec_context.width,
                             height=stream.codec_context.height, codec=stream.codec_context.name,
                             has_audio=bool(container.streams.audio))
    except av.FFmpegError as exc:
        raise VideoError(f"cannot read {path} as a video: {exc}") from exc


def read_frames(path: PathLike, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
    """The frames of ``path``'s first video stream (a file, a stream URL or a camera device), in
    order, as ``(H, W, 3)`` uint8 RGB; at most ``max_frames``.

    Raises:
        VideoError: the file cannot be opened or decoding fails part-way (names the frame).
    """
    av = require_av()
    index = 0
    try:
        with _open(av, os.fspath(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # decode on several threads; frame order is kept
            for frame in container.decode(stream):
                if max_frames is not None and index >= max_frames:
                    break
                yield frame.to_ndarray(format="rgb24")
                index += 1
    except av.FFmpegError as exc:
        raise VideoError(f"cannot decode {path} at frame {index}: {exc}") from exc


class VideoWriter:
    """Write RGB frames to an H.264 file at a fixed rate and size.

    Args:
        path: output file (``.mp4``, ``.mkv``, ``.mov``...); its folder is created.
        fps: frame rate.
        width, height: frame size; every frame must have it.
        crf: x264 quality (0 = lossless .. 51; 18 looks lossless).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: PathLike, *, fps: Union[Fraction, float], width: int, height: int, crf: int = 18) -> None:
        av = require_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width, self.height = int(width), int(height)
        self.frames = 0
        try:
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100000))
        except (av.FFmpegError, ValueError) as exc:
            raise VideoError(f"cannot write {self.path}: {exc}; use a .mp4 or .mkv name") from exc
        self._stream.width, self._stream.height = self.width, self.height
        even = self.width % 2 == 0 and self.height % 2 == 0
        self._stream.pix_fmt = "yuv420p" if even else "yuv444p"
        self._stream.options = {"crf": str(crf)}

    def write(self, rgb: np.ndarray) -> None:
        """Append one ``(H, W, 3)`` uint8 frame."""
        av = require_av()
        if rgb.shape != (self.height, self.width, 3):
            raise VideoError(f"{self.path}: frame of shape {rgb.shape}, the video is {self.height}x{self.width}x3")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class VideoResult:
    """What :func:`segment_video` did.

    Attributes:
        frames: frames segmented.
        info: the input's :class:`VideoInfo`.
        outputs: files and folders written.
        seconds: wall time.
        dropped_audio: the input had audio, which the outputs do not carry.
        interrupted: Ctrl-C ended it; the outputs hold the frames segmented until then.
    """

    frames: int
    info: VideoInfo
    outputs: List[Path] = field(default_factory=list)
    seconds: float = 0.0
    dropped_audio: bool = False
    interrupted: bool = False


def segment_batch(segmenter: Segmenter, frames: Sequence[np.ndarray]) -> np.ndarray:
    """Class ids ``(B, H, W)`` uint8 of equal-sized frames in one forward pass per scale/flip."""
    x = torch.cat([segmenter.preprocess(f) for f in frames])
    probs = predict_probs(segmenter.model, x, segmenter.inference, num_classes=segmenter.num_classes)
    return probs.argmax(1).to(torch.uint8).cpu().numpy()


def segment_video(
    segmenter: Segmenter,
    path: PathLike,
    *,
    mask_out: Optional[PathLike] = None,
    overlay_out: Optional[PathLike] = None,
    frames_dir: Optional[PathLike] = None,
    alpha: float = 0.5,
    batch_size: int = 4,
    progress: bool = True,
    max_frames: Optional[int] = None,
) -> VideoResult:
    """Segment every frame of a video, a stream URL or a camera device (see :func:`is_stream`).

    A live source runs until it ends, ``max_frames`` are done or Ctrl-C; Ctrl-C finishes the
    batch in hand and closes the outputs properly (``result.interrupted``).

    Args:
        segmenter: the model (its :attr:`~Segmenter.inference` settings apply to every frame).
        path: the input video.
        mask_out: write the colour mask video here.
        overlay_out: write the frames blended with the colour mask here (no legend: the size is kept).
        frames_dir: write one index PNG per frame here (``000000.png``...; lossless class ids).
        alpha: overlay weight of the mask colours.
        batch_size: frames per forward pass.
        progress: a progress bar by frame (tqdm, stderr).
        max_frames: stop after this many frames.

    Raises:
        VideoError: unreadable input, no output asked for, or an unwritable output.
    """
    import time

    from tqdm import tqdm

    if mask_out is None and overlay_out is None and frames_dir is None:
        raise VideoError(f"{path}: nothing to write; pass mask_out, overlay_out or frames_dir")
    if batch_size < 1:
        raise VideoError(f"batch_size must be at least 1, got {batch_size}")
    info = probe(path)
    start = time.perf_counter()
    writers: List[VideoWriter] = []
    mask_writer = overlay_writer = None
    result = VideoResult(frames=0, info=info, dropped_audio=info.has_audio)
    if mask_out is not None:
        mask_writer = VideoWriter(mask_out, fps=info.fps, width=info.width, height=info.height)
        writers.append(mask_writer)
    if overlay_out is not None:
        overlay_writer = VideoWriter(overlay_out, fps=info.fps, width=info.width, height=info.height)
        writers.append(overlay_writer)
    frame_folder = Path(frames_dir) if frames_dir is not None else None
    if frame_folder is not None:
        frame_folder.mkdir(parents=True, exist_ok=True)
    total = min(info.frames or max_frames or 0, max_frames or info.frames or 0) or None
    label = os.fspath(path)[-40:] if is_stream(path) else Path(path).name
    bar = tqdm(total=total, unit="frame", disable=not progress, desc=label, dynamic_ncols=True)

    def flush(batch: List[np.ndarray]) -> None:
        for rgb, mask in zip(batch, segment_batch(segmenter, batch)):
            if mask_writer is not None:
                mask_writer.write(segmenter.colorize(mask))
            if overlay_writer is not None:
                overlay_writer.write(np.asarray(overlay_mask(rgb, mask, segmenter.palette, segmenter.classes,
                                                             alpha=alpha, legend=False)))
            if frame_folder is not None:
                segmenter.mask_image(mask).save(frame_folder / f"{result.frames:06d}.png")
            result.frames += 1
            bar.update(1)

    batch: List[np.ndarray] = []
    try:
        try:
            for rgb in read_frames(path, max_frames=max_frames):
                batch.append(rgb)
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
        except KeyboardInterrupt:  # a live source has no end: Ctrl-C is how it stops
            result.interrupted = True
        if batch:
            flush(batch)
    finally:
        bar.close()
        for writer in writers:
            writer.close()
    result.outputs = [w.path for w in writers] + ([frame_folder] if frame_folder is not None else [])
    result.seconds = time.perf_counter() - start
    return result
