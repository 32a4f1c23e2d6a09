"""``deeplab predict`` on a live source: a stream URL served from a local file by the test (HTTP on
127.0.0.1, with byte ranges as real servers have), ``--max-frames``, and Ctrl-C ending it cleanly."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("av", reason="video needs the [video] extra (PyAV)")

from deeplab import video  # noqa: E402
from deeplab.cli import predict as predict_cli  # noqa: E402
from deeplab.segmenter import Segmenter  # noqa: E402

from tests.helpers import make_checkpoint  # noqa: E402
from .test_video import clip_frames, write_clip  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("stream") / "best.pt")


@pytest.fixture()
def stream_url(tmp_path: Path) -> Iterator[str]:
    clip = write_clip(tmp_path / "clip.mp4", clip_frames(12, 48, 64))
    data = clip.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            start, end = 0, len(data) - 1
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes="):
                first, _, last = ranged[6:].partition("-")
                start, end = int(first or 0), int(last) if last else len(data) - 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(data[start:end + 1])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/live/clip.mp4"
    server.shutdown()


def test_stream_sources_are_recognised() -> None:
    assert video.is_stream("rtsp://cam.local:554/live") and video.is_stream("/dev/video0")
    assert video.is_stream("HTTPS://example.org/a.m3u8") and not video.is_stream("clips/a.mp4")
    assert predict_cli.stream_stem("rtsp://cam.local:554/live/main") == "cam.local_554_live_main"


def test_predict_reads_a_stream_url_until_max_frames_and_to_its_end(stream_url: str, ckpt: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert predict_cli.main([stream_url, "--checkpoint", str(ckpt), "--out", str(out), "--max-frames", "5",
                             "--frames", "--quiet"]) == 0
    stem = "127.0.0.1_" + stream_url.rsplit(":", 1)[1].replace("/", "_")
    assert video.probe(out / f"{stem}.mp4").frames == 5
    assert len(list((out / f"{stem}_frames").glob("*.png"))) == 5
    assert "5 frames 64x48" in capsys.readouterr().err
    assert predict_cli.main([stream_url, "--checkpoint", str(ckpt), "--out", str(tmp_path / "all"), "--quiet"]) == 0
    assert video.probe(tmp_path / "all" / f"{stem}.mp4").frames == 12  # the stream ended: so does predict


def test_ctrl_c_ends_a_live_source_cleanly(stream_url: str, ckpt: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = video.read_frames

    def interrupted_after_three(path: str, max_frames: object = None) -> Iterator[np.ndarray]:
        for index, frame in enumerate(real(path)):
            if index == 3:
                raise KeyboardInterrupt
            yield frame

    monkeypatch.setattr(video, "read_frames", interrupted_after_three)
    segmenter = Segmenter.load(ckpt)
    result = video.segment_video(segmenter, stream_url, mask_out=tmp_path / "masks.mp4", batch_size=2, progress=False)
    assert result.interrupted and result.frames == 3
    assert video.probe(tmp_path / "masks.mp4").frames == 3  # a complete, readable file
