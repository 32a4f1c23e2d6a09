"""Video files (extra ``[video]``): a clip written here round-trips, and ``deeplab predict clip.mp4``
segments every frame at the clip's size and rate."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av", reason="video needs the [video] extra (PyAV)")

from deeplab.cli import predict as predict_cli  # noqa: E402
from deeplab.segmenter import Segmenter  # noqa: E402
from deeplab.video import VideoError, VideoWriter, probe, read_frames, segment_video  # noqa: E402

FPS = Fraction(5)  # 10 frames = a 2-second clip


@pytest.fixture(scope="module")
def seg(ckpt: Path) -> Segmenter:
    return Segmenter.load(ckpt)


def clip_frames(n: int, h: int, w: int) -> np.ndarray:
    """Smooth moving gradients (colour changing slowly from pixel to pixel): what 4:2:0 chroma keeps, so
    decoded frames can be compared with the written ones."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = [np.stack([40 + 2 * x + 6 * t, 30 + 2 * y + 4 * t, 200 - x - y], axis=-1) for t in range(n)]
    return np.asarray(frames).round().clip(0, 255).astype(np.uint8)


def write_clip(path: Path, frames: np.ndarray, *, audio: bool = False) -> Path:
    if not audio:
        with VideoWriter(path, fps=FPS, width=frames.shape[2], height=frames.shape[1]) as writer:
            for frame in frames:
                writer.write(frame)
        return path
    with av.open(str(path), mode="w") as container:  # a clip with a sound track, written by hand
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = container.add_stream("aac", rate=8000)
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        tone = (np.sin(np.arange(16000) / 5.0) * 0.2).astype(np.float32)[None]
        samples = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        samples.sample_rate = 8000
        for packet in [*sound.encode(samples), *sound.encode(None), *video.encode(None)]:
            container.mux(packet)
    return path


@pytest.mark.parametrize("size", [(48, 64), (21, 33)], ids=["even", "odd"])
def test_clip_round_trips_frame_count_size_and_rate(tmp_path: Path, size: tuple) -> None:
    frames = clip_frames(10, *size)
    path = write_clip(tmp_path / "clip.mp4", frames)
    info = probe(path)
    assert (info.frames, info.height, info.width, info.fps, info.has_audio) == (10, *size, FPS, False)
    decoded = np.asarray(list(read_frames(path)))
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # Lossy: RGB -> limited-range YUV 4:2:0 -> RGB alone costs ~1.4 levels on average here (measured with
    # crf 0), H.264 at crf 18 ~0.1 more; a wrong colour matrix or a shifted frame costs tens.
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 2.5


def test_errors_name_the_file(tmp_path: Path, seg: Segmenter) -> None:
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="notes.mp4"):
        probe(tmp_path / "notes.mp4")
    with pytest.raises(VideoError, match="not found"):
        probe(tmp_path / "missing.mp4")
    path = write_clip(tmp_path / "c.mp4", clip_frames(2, 16, 16))
    with pytest.raises(VideoError, match="nothing to write"):
        segment_video(seg, path)


def test_segment_video_writes_every_frame_at_size_and_rate(tmp_path: Path, seg: Segmenter) -> None:
    frames = clip_frames(10, 40, 56)
    path = write_clip(tmp_path / "clip.mp4", frames, audio=True)
    result = segment_video(seg, path, mask_out=tmp_path / "mask.mp4", overlay_out=tmp_path / "over.mkv",
                           frames_dir=tmp_path / "frames", batch_size=3, progress=False)
    assert result.frames == 10 and result.dropped_audio
    for out in ("mask.mp4", "over.mkv"):
        info = probe(tmp_path / out)
        assert (info.frames or len(list(read_frames(tmp_path / out))), info.height, info.width, info.fps) == (10, 40, 56, FPS)
        assert not info.has_audio
    pngs = sorted((tmp_path / "frames").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    # per-frame PNGs are the batched prediction of the decoded frames (checked on a first and a last batch)
    decoded = list(read_frames(path))
    for png, frame in [(pngs[i], decoded[i]) for i in (0, 9)]:
        mask = np.asarray(Image.open(png))
        single = seg.predict(frame)
        # batch-of-3 vs batch-of-1 convolutions may round differently: argmax ties can flip
        assert (mask == single).mean() > 0.999


def test_predict_cli_video_outputs(tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = write_clip(tmp_path / "clip.mp4", clip_frames(10, 32, 48), audio=True)
    assert predict_cli.main([str(clip), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--overlay",
                             "--frames", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "10 frames 48x32 at 5 fps" in captured.err and "audio dropped" in captured.err
    assert "done: 1, failed: 0" in captured.out
    assert probe(tmp_path / "out" / "clip.mp4").frames == 10
    assert probe(tmp_path / "out" / "clip_overlay.mp4").frames == 10
    assert len(list((tmp_path / "out" / "clip_frames").glob("*.png"))) == 10
    # --out FILE.mp4: that one file, here the overlay
    assert predict_cli.main([str(clip), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o.mp4"), "--overlay", "--quiet"]) == 0
    assert (probe(tmp_path / "o.mp4").width, probe(tmp_path / "o.mp4").height) == (48, 32)
    # ... which takes exactly one video
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert predict_cli.main([str(clip), str(tmp_path / "x.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "p.mp4")]) == 2
    assert "exactly one video" in capsys.readouterr().err
