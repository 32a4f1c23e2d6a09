"""The HTTP API and the page of ``deeplab serve``: a FastAPI app around one :class:`Segmenter`.

Endpoints:

- ``POST /v1/segment``: an image as the raw request body or as the one file of a
  ``multipart/form-data`` upload. Answers the index PNG (pixel value = class id, the model's
  palette embedded, same size as the upload) by default, or JSON (``size``, each present class's
  share of pixels, latency, optionally the mask as RLE or as a base64 index PNG) when
  ``format=json`` or ``Accept: application/json``. Inference options of ``deeplab predict``
  (``mode``, ``scales``, ``flip``, ``crop_size``, ``stride``, ``pad_to``) are query fields,
  validated by :class:`deeplab.config.InferenceConfig`; an unknown field is a 422.
- ``GET /v1/model``: architecture, classes, palette, normalisation, model config, defaults, limits.
- ``GET /healthz``: liveness and queue depth.
- ``GET /``: the page (``static/``); ``/docs`` and ``/openapi.json``: FastAPI's OpenAPI docs
  (Swagger UI loads its script from a CDN; ``/openapi.json`` itself needs nothing).

Hostile input gets a status and one line, never a traceback: bodies over ``max_bytes`` and images
over ``max_pixels`` (read from the header, before decoding: decompression bombs never allocate)
are 413 with the limit; bytes that are no image format we decode are 415 whatever the
``Content-Type`` says (the content is sniffed); a corrupt or truncated image is 400 naming the
problem. Inference runs on one worker thread behind a bounded queue: when ``queue_size``
requests are already waiting or running, the next one gets 503 with ``Retry-After`` at once,
so memory stays bounded (at most ``queue_size`` bodies are held) and clients never hang.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, List, Literal, Optional, Tuple

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, create_model, field_validator

from deeplab._utils import ConfigError, DeeplabError, jsonable, one_line
from deeplab.config import INFERENCE_MODES, InferenceConfig
from deeplab.deploy.runtime import InputSizeError
from deeplab.segmenter import Segmenter
from deeplab.serve.camera import mount_camera

__all__ = ["ServeLimits", "SegmentQuery", "create_app", "decode_image", "describe_model", "rle_encode", "sniff_image"]

log = logging.getLogger("deeplab.serve")

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}

# Magic numbers of the formats Pillow decodes that a user would upload. The Content-Type
# header is the client's claim; these bytes are what the file is.
SIGNATURES: Tuple[Tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP, TIFF"
# The multipart envelope (boundaries, part headers) on top of the file itself.
MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost the server.

    Attributes:
        max_bytes: largest upload (the image file) in bytes.
        max_pixels: largest image, width x height, read from the header before decoding.
        queue_size: requests waiting or running at once; one more gets 503 + Retry-After.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 16_000_000
    queue_size: int = 8

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ServeLimits.{name} must be a positive int, got {value!r}")


class RequestRejected(DeeplabError):
    """A request answered with an HTTP error status and a one-line message."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


# InferenceConfig fields fixed when the model is opened (they rebuild or re-open it): a request
# cannot change them. Every other field is a query field, generated below.
LOAD_TIME_FIELDS = ("output_stride", "precision")
QUERY_TYPES: Dict[str, Any] = {
    "mode": Literal[INFERENCE_MODES],
    "scales": List[float],
    "flip": bool,
    "crop_size": int,
    "stride": int,
    "pad_to": List[int],
}


class _SegmentQueryBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Optional[Literal["png", "json"]] = None
    mask: Literal["none", "rle", "png"] = "none"

    @field_validator("scales", "pad_to", mode="before", check_fields=False)
    @classmethod
    def split_commas(cls, value: Any) -> Any:
        """``scales=0.5,1.0`` as well as ``scales=0.5&scales=1.0``."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [part for item in value for part in (item.split(",") if isinstance(item, str) else [item]) if part != ""]
        return value

    def inference(self, default: InferenceConfig) -> InferenceConfig:
        """``default`` with the fields given here replaced.

        Raises:
            deeplab._utils.ConfigError: an invalid combination (the message says what is allowed).
        """
        changes: Dict[str, Any] = {}
        for name in QUERY_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "pad_to":
                if len(value) not in (1, 2):
                    raise ConfigError(f"pad_to takes one or two ints (H,W), got {value}")
                value = value * 2 if len(value) == 1 else value
            changes[name] = tuple(value) if isinstance(value, list) else value
        return InferenceConfig.from_dict({**default.to_dict(), **changes})


QUERY_FIELDS = tuple(f.name for f in dataclasses.fields(InferenceConfig) if f.name not in LOAD_TIME_FIELDS)
# Query fields of ``POST /v1/segment``: ``format``, ``mask`` and one per InferenceConfig field
# (those of ``deeplab predict``); a field left out keeps the server's default (``deeplab serve``'s
# flags); any other field is rejected (422).
if TYPE_CHECKING:
    SegmentQuery = _SegmentQueryBase
else:
    SegmentQuery = create_model(
        "SegmentQuery",
        __base__=_SegmentQueryBase,
        __doc__="Query fields of ``POST /v1/segment``; any other field is rejected (422).",
        **{name: (Optional[QUERY_TYPES[name]], None) for name in QUERY_FIELDS},
    )


# Per-request options multiply the work of one image: bound them as the upload is bounded.
MAX_SCALES, MAX_SCALE = 8, 2.0


def check_cost(inference: InferenceConfig, limits: ServeLimits) -> None:
    """Refuse per-request options that would cost far more than the upload limits allow.

    Raises:
        deeplab._utils.ConfigError: more than :data:`MAX_SCALES` scales, a scale above
            :data:`MAX_SCALE`, or a ``pad_to`` (or, sliding, a ``crop_size``) over ``max_pixels``.
    """
    if len(inference.scales) > MAX_SCALES or max(inference.scales) > MAX_SCALE:
        raise ConfigError(f"scales: at most {MAX_SCALES} scales of at most {MAX_SCALE} per request, got {list(inference.scales)}")
    for name in ("pad_to", "crop_size"):
        value = getattr(inference, name)
        if value is None or (name == "crop_size" and inference.mode != "slide"):
            continue
        h, w = (value, value) if isinstance(value, int) else value
        if h * w > limits.max_pixels:
            raise ConfigError(f"{name}: {h}x{w} is over the limit of {limits.max_pixels} pixels")


# --------------------------------------------------------------------------- images in, masks out


def sniff_image(data: bytes) -> Optional[str]:
    """The image format of ``data`` by its first bytes (``"PNG"``, ``"JPEG"``...), or ``None``."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for magic, name in SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Bytes of an uploaded image -> ``(H, W, 3)`` uint8 RGB, refusing what would hurt the server.

    Raises:
        RequestRejected: 415 not an image format we decode; 413 more than ``max_pixels``
            pixels (checked on the header, before any pixel is decoded); 400 corrupt or truncated.
    """
    kind = sniff_image(data)
    if kind is None:
        raise RequestRejected(415, f"the upload is not an image ({FORMAT_NAMES}); its first bytes are {data[:8]!r}")
    with warnings.catch_warnings():
        # Pillow warns (and errors at 2x) past its own MAX_IMAGE_PIXELS; ours is the limit here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
        except Image.DecompressionBombError as exc:
            raise RequestRejected(413, f"image too large: {one_line(exc)}; the limit is {max_pixels} pixels") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise RequestRejected(400, f"corrupt {kind} image: cannot read its header ({one_line(exc)})") from exc
        if width * height > max_pixels:
            raise RequestRejected(
                413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels "
                     f"(deeplab serve --max-pixels); downscale it first",
            )
        try:
            image.load()  # first frame of a GIF / multi-page TIFF
            rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))
        except Image.DecompressionBombError as exc:
            raise RequestRejected(413, f"image too large: {one_line(exc)}; the limit is {max_pixels} pixels") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise RequestRejected(400, f"truncated or corrupt {kind} image: {one_line(exc)}") from exc
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise RequestRejected(400, f"{kind} image decodes to shape {rgb.shape}, not an RGB picture")
    return rgb


def rle_encode(mask: np.ndarray) -> Dict[str, Any]:
    """Run-length code of a class-id mask in row-major order.

    Returns:
        ``{"order": "row-major", "size": [H, W], "values": [...], "counts": [...]}``: run ``i``
        is ``counts[i]`` pixels of class ``values[i]``; the counts sum to ``H * W``.
    """
    flat = np.asarray(mask).reshape(-1)
    if flat.size == 0:
        return {"order": "row-major", "size": list(mask.shape), "values": [], "counts": []}
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    counts = np.diff(np.concatenate([starts, [flat.size]]))
    return {"order": "row-major", "size": list(mask.shape), "values": flat[starts].tolist(), "counts": counts.tolist()}


def class_shares(mask: np.ndarray, segmenter: Segmenter) -> List[Dict[str, Any]]:
    """Each class present in ``mask``: id, name, colour, pixel count and share (shares sum to 1),
    largest first."""
    counts = np.bincount(mask.reshape(-1), minlength=segmenter.num_classes)
    total = int(counts.sum())
    present = [int(i) for i in np.flatnonzero(counts)]
    present.sort(key=lambda i: (-counts[i], i))
    return [
        {"id": i, "name": segmenter.classes[i] if i < segmenter.num_classes else f"class_{i}",
         "color": list(segmenter.palette[i]) if i < len(segmenter.palette) else [0, 0, 0],
         "pixels": int(counts[i]), "share": float(counts[i]) / total}
        for i in present
    ]


def segment(segmenter: Segmenter, rgb: np.ndarray, inference: InferenceConfig) -> np.ndarray:
    """Class ids ``(H, W)`` uint8 of one image with per-request inference options (the
    segmenter's own :attr:`Segmenter.inference` is shared by all requests and left alone)."""
    return segmenter.predict(rgb, inference)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- the model's description


def describe_model(segmenter: Segmenter, path: Optional[str] = None) -> Dict[str, Any]:
    """What ``GET /v1/model`` reports: arch, backbone, classes, palette, normalisation, config.

    Args:
        segmenter: the served model.
        path: the file it came from; its model config is read from the checkpoint or from the
            export's embedded metadata (nothing is read when ``None``).
    """
    card = segmenter.card
    config: Dict[str, Any] = dict(card.config) if card is not None and path is not None else {}
    return {
        "source": Path(path).name if path else None,
        "backend": segmenter.backend,
        "arch": config.get("arch"),
        "backbone": config.get("backbone"),
        "output_stride": config.get("output_stride"),
        # issue 12 adds reduced precision; until then every served model computes in float32
        "precision": str(getattr(segmenter, "precision", "fp32")),
        "device": str(segmenter.device),
        "num_classes": segmenter.num_classes,
        "classes": list(segmenter.classes),
        "palette": [list(c) for c in segmenter.palette[: segmenter.num_classes]],
        "normalization": dict(segmenter.normalization),
        "config": config,
        "inference": jsonable(segmenter.inference.to_dict()),
    }


# --------------------------------------------------------------------------- the app


class Worker:
    """One inference thread behind a bounded queue, shared by every request of the app.

    Torch already spreads one forward pass over the cores (intra-op threads), so one thread
    per process is the fastest order; more processes: ``deeplab serve --workers N``.
    """

    def __init__(self, segmenter: Segmenter, limits: ServeLimits) -> None:
        self.segmenter = segmenter
        self.limits = limits
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deeplab-infer")
        self.pending = 0  # requests admitted and not finished; only touched on the event loop
        self.served = 0
        self.rejected = 0
        self.mean_latency_s = 0.5  # running mean, for Retry-After

    def admit(self) -> None:
        """Take a place in the queue, or raise 503 with ``Retry-After``."""
        if self.pending >= self.limits.queue_size:
            self.rejected += 1
            wait = max(1, math.ceil(self.mean_latency_s * self.pending))
            raise RequestRejected(
                503, f"server busy: {self.pending} requests queued (limit {self.limits.queue_size}); retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self.pending += 1

    def release(self, latency_s: Optional[float]) -> None:
        self.pending -= 1
        if latency_s is not None:
            self.served += 1
            self.mean_latency_s = 0.8 * self.mean_latency_s + 0.2 * latency_s

    async def run(self, data: bytes, inference: InferenceConfig) -> Tuple[np.ndarray, Dict[str, float]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._work, data, inference)

    def _work(self, data: bytes, inference: InferenceConfig) -> Tuple[np.ndarray, Dict[str, float]]:
        t0 = time.perf_counter()
        rgb = decode_image(data, max_pixels=self.limits.max_pixels)
        t1 = time.perf_counter()
        mask = segment(self.segmenter, rgb, inference)
        t2 = time.perf_counter()
        return mask, {"decode_ms": (t1 - t0) * 1e3, "inference_ms": (t2 - t1) * 1e3}


def error_response(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestRejected(413, f"upload of {int(declared)} bytes is over the limit of {limit} bytes (deeplab serve --max-bytes)")
    chunks: List[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRejected(413, f"upload is over the limit of {limit} bytes (deeplab serve --max-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_bytes(request: Request, limits: ServeLimits) -> bytes:
    """The image bytes of a raw body or of the one file in a multipart form."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        data = await read_body(request, limits.max_bytes)
    else:
        body = await read_body(request, limits.max_bytes + MULTIPART_OVERHEAD)
        sent = False

        async def replay() -> Dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as exc:  # starlette raises its HTTPException or MultiPartException
            raise RequestRejected(400, f"malformed multipart/form-data body: {one_line(exc)}") from exc
        files = [value for value in form.values() if not isinstance(value, str)]
        if not files:
            raise RequestRejected(400, "the multipart form has no file; send the image as a file field (e.g. curl -F file=@photo.jpg)")
        data = await files[0].read()
        if len(data) > limits.max_bytes:
            raise RequestRejected(413, f"upload of {len(data)} bytes is over the limit of {limits.max_bytes} bytes (deeplab serve --max-bytes)")
    if not data:
        raise RequestRejected(400, "empty upload; send the image file as the body or as a multipart file field")
    return data


def wants_json(query: SegmentQuery, accept: str) -> bool:
    if query.format is not None:
        return query.format == "json"
    return "application/json" in accept and "image/png" not in accept


SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {"description": "index PNG (palette embedded) or JSON", "content": {"image/png": {}, "application/json": {}}},
        "400": {"description": "corrupt or truncated image"},
        "413": {"description": "upload or image over the limit"},
        "415": {"description": "not an image"},
        "503": {"description": "queue full; see Retry-After"},
    },
}


def create_app(segmenter: Segmenter, *, limits: Optional[ServeLimits] = None,
               model_info: Optional[Dict[str, Any]] = None) -> FastAPI:
    """The FastAPI app serving ``segmenter``.

    Args:
        segmenter: the model; its :attr:`~Segmenter.inference` is the default of every request.
        limits: upload, pixel and queue limits (default :class:`ServeLimits`).
        model_info: what ``GET /v1/model`` answers (default :func:`describe_model` without a file).
    """
    limits = limits or ServeLimits()
    info = dict(model_info or describe_model(segmenter))
    info["limits"] = asdict(limits)
    worker = Worker(segmenter, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="deeplab serve", version=str(info.get("version", "1")),
                  description="DeepLab semantic segmentation: upload an image, get its class-id mask.",
                  lifespan=lifespan)
    app.state.worker = worker
    camera = mount_camera(app, worker, segmenter, max_frame_bytes=limits.max_bytes)  # GET /camera, WS /v1/camera

    @app.exception_handler(RequestValidationError)
    async def invalid_query(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log, never to the client.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        """Liveness, queue depth and counters."""
        return {"status": "ok", "queued": worker.pending, "queue_size": limits.queue_size,
                "served": worker.served, "rejected": worker.rejected, "cameras": camera.open}

    @app.get("/v1/model")
    async def model() -> Dict[str, Any]:
        """The served model: arch, backbone, classes, palette, normalisation, config, limits."""
        return info

    @app.post("/v1/segment", openapi_extra=SEGMENT_BODY, response_class=Response)
    async def segment_endpoint(request: Request, query: SegmentQuery = Query()) -> Response:  # noqa: B008
        """Segment one image: the index PNG (default) or JSON with class shares and latency."""
        start = time.perf_counter()
        try:
            inference = query.inference(segmenter.inference)
            check_cost(inference, limits)
        except (ConfigError, ValueError) as exc:
            return error_response(422, one_line(exc))
        try:
            worker.admit()
        except RequestRejected as exc:
            return error_response(exc.status, str(exc), exc.headers)
        latency: Optional[float] = None
        try:
            data = await upload_bytes(request, limits)
            mask, timing = await worker.run(data, inference)
            latency = time.perf_counter() - start
        except RequestRejected as exc:
            return error_response(exc.status, str(exc), exc.headers)
        except InputSizeError as exc:  # larger than a fixed-size model (a LiteRT file) takes
            return error_response(413, one_line(exc))
        except (RuntimeError, MemoryError) as exc:
            log.exception("inference failed")
            return error_response(500, f"inference failed: {one_line(exc)}")
        finally:
            worker.release(latency)
        timing["server_ms"] = latency * 1e3
        return segment_response(segmenter, mask, timing, inference, query, request.headers.get("accept", ""))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Response:
        return static_response("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            return error_response(404, f"no static file {name!r}")
        return static_response(name)

    return app


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """422 with one line per invalid or unknown query field."""
    errors = exc.errors()
    parts = []
    for error in errors:
        field = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
        if error.get("type") == "extra_forbidden":
            parts.append(f"unknown query field {field!r}; allowed: {sorted(SegmentQuery.model_fields)}")
        else:
            parts.append(f"{field}: {error.get('msg')}")
    return JSONResponse({"detail": "; ".join(parts), "errors": jsonable(errors)}, status_code=422)


def segment_response(segmenter: Segmenter, mask: np.ndarray, timing: Dict[str, float], inference: InferenceConfig,
                     query: SegmentQuery, accept: str) -> Response:
    """The answer to ``POST /v1/segment``: the index PNG, or JSON with class shares and latency."""
    height, width = mask.shape
    headers = {"X-Latency-Ms": f"{timing['server_ms']:.1f}", "X-Inference-Ms": f"{timing['inference_ms']:.1f}",
               "Server-Timing": f"decode;dur={timing['decode_ms']:.1f}, infer;dur={timing['inference_ms']:.1f}"}
    if not wants_json(query, accept):
        return Response(png_bytes(segmenter.mask_image(mask)), media_type="image/png", headers=headers)
    payload: Dict[str, Any] = {
        "size": {"width": width, "height": height},
        "classes": class_shares(mask, segmenter),
        "latency_ms": {k: round(v, 2) for k, v in timing.items()},
        "inference": jsonable(inference.to_dict()),
    }
    if query.mask == "rle":
        payload["mask"] = {"encoding": "rle", **rle_encode(mask)}
    elif query.mask == "png":
        payload["mask"] = {"encoding": "png-base64", "data": base64.b64encode(png_bytes(segmenter.mask_image(mask))).decode()}
    return JSONResponse(payload, headers=headers)


def static_response(name: str) -> Response:
    """One of the page's files from the package data (never a path from the request)."""
    text = resources.files("deeplab.serve").joinpath("static", name).read_bytes()
    return Response(text, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

