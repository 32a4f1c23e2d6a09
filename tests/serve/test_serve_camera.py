"""The camera mode of ``deeplab serve``: WS /v1/camera in-process, and the page in a real browser
with Chromium's fake camera (``--use-fake-device-for-media-stream --use-fake-ui-for-media-stream``)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="deeplab serve needs the [serve] extra")
pytest.importorskip("httpx", reason="the API tests drive the app with httpx")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from deeplab.segmenter import Segmenter  # noqa: E402
from deeplab.serve.app import create_app, describe_model  # noqa: E402
from deeplab.serve.camera import FrameSlot  # noqa: E402

from tests.serve_server import Server  # noqa: E402
from tests.helpers import make_checkpoint  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("DEEPLAB_REQUIRE_BROWSER", "") == "1"


def jpeg(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_frame_slot_keeps_only_the_newest() -> None:
    async def run() -> Any:
        slot = FrameSlot()
        assert slot.put(1, b"a") is False
        assert slot.put(2, b"b") is True  # frame 1 was never processed: dropped
        first = await slot.get()
        waiter = asyncio.ensure_future(slot.get())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # nothing waiting: get() blocks
        slot.put(3, b"c")
        return first, await waiter, slot.dropped

    assert asyncio.run(run()) == ((2, b"b"), (3, b"c"), 1)


class Slow(torch.nn.Module):
    """The model, 0.3 s slower per frame: frames arrive faster than they are segmented."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.output_stride = inner.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.3)
        return self.inner(x)


def test_camera_socket_returns_masks_and_drops_stale_frames(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "best.pt")
    fast = Segmenter.load(ckpt)
    slow = Segmenter(Slow(fast.model), classes=fast.classes, palette=fast.palette, normalization=fast.normalization)
    with TestClient(create_app(slow, model_info=describe_model(slow, str(ckpt)))) as client:
        assert "getUserMedia" in client.get("/static/camera.js").text
        assert 'src="/static/camera.js"' in client.get("/camera").text
        frame = jpeg()
        expected = fast.predict(np.array(Image.open(io.BytesIO(frame)).convert("RGB")))
        with client.websocket_connect("/v1/camera") as socket:
            assert client.get("/healthz").json()["cameras"] == 1
            for _ in range(6):  # back to back: 1 is taken at once, 2..5 are replaced by 6
                socket.send_bytes(frame)
            seen = []
            while not seen or seen[-1]["frame"] != 6:
                header = json.loads(socket.receive_text())
                mask = np.array(Image.open(io.BytesIO(socket.receive_bytes())))
                assert np.array_equal(mask, expected)  # the palette PNG holds the class ids
                assert header["width"] == 64 and header["height"] == 48 and header["inference_ms"] >= 300
                seen.append(header)
            assert [h["frame"] for h in seen] == [1, 6] and seen[-1]["dropped"] == 4
            socket.send_bytes(b"not an image")
            assert "error" in json.loads(socket.receive_text())  # one bad frame does not end the camera
            socket.send_bytes(frame)
            assert json.loads(socket.receive_text())["frame"] == 8
            socket.receive_bytes()
        for _ in range(50):  # the server notices the close and frees the slot and its task
            if client.get("/healthz").json()["cameras"] == 0:
                break
            time.sleep(0.05)
        assert client.get("/healthz").json()["cameras"] == 0


@pytest.mark.spawn
@pytest.mark.slow
def test_camera_page_streams_the_fake_camera_in_chromium(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        if REQUIRED:
            pytest.fail(f"no browser at {CHROMIUM} (DEEPLAB_REQUIRE_BROWSER=1)")
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    checkpoint = Path(os.environ.get("DEEPLAB_SERVE_TEST_CHECKPOINT") or make_checkpoint(tmp_path / "best.pt"))
    shot = Path(os.environ.get("DEEPLAB_CAMERA_SCREENSHOT") or tmp_path / "camera.png")
    with Server(checkpoint, "--threads", "2", log=tmp_path / "serve.log") as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 620})
            errors: list = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/camera")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')", timeout=30_000)
            page.click("#start")
            page.wait_for_selector("#view[data-ready='1']", timeout=60_000)
            assert server.get("/healthz")["cameras"] == 1
            page.wait_for_function("Number(document.getElementById('view').dataset.received) >= 5", timeout=60_000)
            rss_start = server.rss_bytes()
            received_start = int(page.get_attribute("#view", "data-received") or 0)
            time.sleep(4)
            received = int(page.get_attribute("#view", "data-received") or 0)
            assert received > received_start  # masks keep arriving
            assert float(page.get_attribute("#view", "data-fps") or 0) > 0
            assert "fps" in page.text_content("#fps") and "latency" in page.text_content("#latency")
            # flat memory: a few seconds of frames do not grow the server (no queue of frames)
            assert server.rss_bytes() - rss_start < 64 * 2**20
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            page.close()  # closing the tab frees the camera's slot and task
            for _ in range(100):
                if server.get("/healthz")["cameras"] == 0:
                    break
                time.sleep(0.1)
            assert server.get("/healthz")["cameras"] == 0
            assert not errors, errors
        finally:
            browser.close()
