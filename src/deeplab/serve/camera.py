"""Live camera for ``deeplab serve``: ``GET /camera`` (the page) and ``WS /v1/camera`` (frames in, masks out).

The page takes the browser's camera (``getUserMedia``), sends JPEG frames over a WebSocket and
draws each returned mask over the live video, with the achieved fps and the latency.

The pipeline is bounded and drops stale frames rather than queueing them: per connection the
server keeps one slot holding the newest frame; a frame that arrives while another waits
replaces it (counted as ``dropped``), and one frame at a time goes to the app's single inference
thread (shared with ``POST /v1/segment``). So a slow model lowers the fps, never grows a queue or
the latency, and the server's memory stays flat however fast frames come. The client sends the
next frame when the previous result arrives, with at most two in flight.

Protocol: the client sends binary messages (a JPEG or PNG each); for every frame it segments the
server answers a text message ``{"frame": n, "dropped": d, "width", "height", "inference_ms",
"server_ms", "classes": [ids present]}`` followed by a binary message, the mask as a palette PNG.
A frame that cannot be decoded gets ``{"error": "..."}`` and the connection stays open. Closing
the tab closes the socket; its slot and task are freed (``GET /healthz`` counts open cameras).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Dict, Optional, Tuple

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import Response

from deeplab.config import InferenceConfig
from deeplab.segmenter import Segmenter

__all__ = ["CAMERA_FILES", "CameraStats", "FrameSlot", "mount_camera"]

log = logging.getLogger(__name__)

CAMERA_FILES = {"camera.html": "text/html; charset=utf-8", "camera.js": "text/javascript; charset=utf-8"}


@dataclass
class CameraStats:
    """What ``/healthz`` reports of the camera sockets."""

    open: int = 0
    frames: int = 0
    dropped: int = 0


class FrameSlot:
    """A one-frame mailbox: ``put`` replaces an unread frame (a drop), ``get`` waits for one."""

    def __init__(self) -> None:
        self._frame: Optional[Tuple[int, bytes]] = None
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, number: int, data: bytes) -> bool:
        """Store frame ``number``; ``True`` when it replaced one that was never processed."""
        replaced = self._frame is not None
        if replaced:
            self.dropped += 1
        self._frame = (number, data)
        self._ready.set()
        return replaced

    async def get(self) -> Tuple[int, bytes]:
        while self._frame is None:
            self._ready.clear()
            await self._ready.wait()
        frame, self._frame = self._frame, None
        return frame


def _mask_png(segmenter: Segmenter, mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    segmenter.mask_image(mask).save(buffer, format="PNG", compress_level=1)  # fast: a mask compresses well anyway
    return buffer.getvalue()


def mount_camera(app: FastAPI, worker: Any, segmenter: Segmenter, *, max_frame_bytes: int,
                 inference: Optional[InferenceConfig] = None) -> CameraStats:
    """Add ``GET /camera``, ``GET /static/camera.js`` and ``WS /v1/camera`` to ``app``.

    Args:
        app: the serve app.
        worker: its inference worker (``await worker.run(data, inference) -> (mask, timing)``).
        segmenter: the model (for the mask's palette PNG).
        max_frame_bytes: larger messages close the socket (code 1009).
        inference: how frames are segmented (default: the segmenter's own setting).
    """
    stats = CameraStats()
    setting = inference or segmenter.inference

    @app.get("/camera", include_in_schema=False)
    async def camera_page() -> Response:
        return _static("camera.html")

    @app.get("/static/camera.js", include_in_schema=False)
    async def camera_script() -> Response:
        return _static("camera.js")

    @app.websocket("/v1/camera")
    async def camera_socket(socket: WebSocket) -> None:
        await socket.accept()
        slot = FrameSlot()
        stats.open += 1
        processing = asyncio.create_task(_process(socket, slot, worker, segmenter, setting, stats))
        received = 0
        try:
            while True:
                message = await socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is None:
                    continue  # text from the client (none is defined) is ignored
                if len(data) > max_frame_bytes:
                    await socket.close(code=1009, reason=f"frame of {len(data)} bytes > {max_frame_bytes}")
                    break
                received += 1
                if slot.put(received, data):
                    stats.dropped += 1
        except WebSocketDisconnect:
            pass
        finally:
            processing.cancel()
            try:
                await processing
            except (asyncio.CancelledError, Exception):  # the socket is gone; nothing to report to
                pass
            stats.open -= 1

    return stats


async def _process(socket: WebSocket, slot: FrameSlot, worker: Any, segmenter: Segmenter,
                   inference: InferenceConfig, stats: CameraStats) -> None:
    """Segment the newest frame, send its result, repeat (one frame in the worker at a time)."""
    loop = asyncio.get_running_loop()
    while True:
        number, data = await slot.get()
        start = time.perf_counter()
        try:
            mask, timing = await worker.run(data, inference)
        except Exception as exc:  # a frame that does not decode: say so, keep the camera running
            await socket.send_text(json.dumps({"frame": number, "error": str(exc).splitlines()[0] if str(exc) else
                                               type(exc).__name__}))
            continue
        png = await loop.run_in_executor(None, _mask_png, segmenter, mask)
        stats.frames += 1
        height, width = mask.shape
        header: Dict[str, Any] = {
            "frame": number, "dropped": slot.dropped, "width": int(width), "height": int(height),
            "inference_ms": round(timing["inference_ms"], 1),
            "server_ms": round((time.perf_counter() - start) * 1e3, 1),
            "classes": [int(c) for c in np.unique(mask)],
        }
        await socket.send_text(json.dumps(header))
        await socket.send_bytes(png)


def _static(name: str) -> Response:
    data = resources.files("deeplab.serve").joinpath("static", name).read_bytes()
    return Response(data, media_type=CAMERA_FILES[name], headers={"Cache-Control": "no-cache"})
