"""``deeplab serve``'s HTTP API in-process (FastAPI's TestClient / httpx on the ASGI app):
masks and JSON, inference options, and a clean status + one line for every hostile input."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="deeplab serve needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="the API tests drive the app with httpx")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx versions
    from fastapi.testclient import TestClient

from deeplab.cli import serve as serve_cli  # noqa: E402
from deeplab.segmenter import Segmenter  # noqa: E402
from deeplab.serve.app import ServeLimits, create_app, describe_model, rle_encode, sniff_image  # noqa: E402

from tests.helpers import CLASSES, PALETTE  # noqa: E402


@pytest.fixture(scope="module")
def segmenter(ckpt: Path) -> Segmenter:
    return Segmenter.load(ckpt)


def client_for(segmenter: Segmenter, ckpt: Path, **limits: Any) -> TestClient:
    app = create_app(segmenter, limits=ServeLimits(**limits), model_info=describe_model(segmenter, str(ckpt)))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(segmenter: Segmenter, ckpt: Path) -> Iterator[TestClient]:
    with client_for(segmenter, ckpt) as c:
        yield c


def photo(h: int = 37, w: int = 53, fmt: str = "JPEG", seed: int = 0) -> Tuple[bytes, np.ndarray]:
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    data = buffer.getvalue()
    return data, np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def png_with_size(width: int, height: int) -> bytes:
    """A small valid 1x1 PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


# --------------------------------------------------------------------------- answers


def test_png_answer_is_the_index_mask_with_the_palette_at_upload_size(client: TestClient, segmenter: Segmenter) -> None:
    data, rgb = photo(37, 53)
    raw = client.post("/v1/segment", content=data, headers={"Content-Type": "application/octet-stream"})
    form = client.post("/v1/segment", files={"file": ("x.jpg", data, "image/jpeg")})
    for response in (raw, form):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert float(response.headers["x-latency-ms"]) > 0
        mask = Image.open(io.BytesIO(response.content))
        assert mask.mode == "P" and mask.size == (53, 37)
        assert mask.getpalette()[:9] == [v for c in PALETTE for v in c]
        np.testing.assert_array_equal(np.asarray(mask), segmenter.predict(rgb))


def test_json_answer_shares_sum_to_one_and_masks_decode(client: TestClient, segmenter: Segmenter) -> None:
    data, rgb = photo(40, 31, fmt="PNG", seed=1)
    expected = segmenter.predict(rgb)
    body = client.post("/v1/segment?mask=rle", content=data, headers={"Accept": "application/json"}).json()
    assert body["size"] == {"width": 31, "height": 40}
    shares = [c["share"] for c in body["classes"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-12)
    assert shares == sorted(shares, reverse=True)
    counts = np.bincount(expected.reshape(-1), minlength=len(CLASSES))
    assert {c["id"]: c["pixels"] for c in body["classes"]} == {i: int(n) for i, n in enumerate(counts) if n}
    assert {c["name"] for c in body["classes"]} <= set(CLASSES)
    assert set(body["latency_ms"]) == {"decode_ms", "inference_ms", "server_ms"}
    rle = body["mask"]
    assert rle["encoding"] == "rle" and sum(rle["counts"]) == 40 * 31
    np.testing.assert_array_equal(np.repeat(rle["values"], rle["counts"]).reshape(40, 31), expected)
    png = client.post("/v1/segment?format=json&mask=png", content=data).json()["mask"]
    decoded = Image.open(io.BytesIO(base64.b64decode(png["data"])))
    np.testing.assert_array_equal(np.asarray(decoded), expected)


def test_rle_round_trips_edge_cases() -> None:
    for mask in (np.zeros((3, 4), np.uint8), np.arange(12, dtype=np.uint8).reshape(3, 4), np.zeros((0, 5), np.uint8)):
        rle = rle_encode(mask)
        np.testing.assert_array_equal(np.repeat(np.asarray(rle["values"], dtype=np.uint8), rle["counts"]).reshape(mask.shape), mask)


def test_query_inference_options_are_those_of_predict(client: TestClient, ckpt: Path) -> None:
    data, rgb = photo(45, 38, seed=2)
    response = client.post("/v1/segment?scales=0.75,1.25&flip=true&format=json&mask=rle", content=data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["inference"]["scales"] == [0.75, 1.25] and body["inference"]["flip"] is True
    expected = Segmenter.load(ckpt, scales=(0.75, 1.25), flip=True).predict(rgb)
    np.testing.assert_array_equal(np.repeat(body["mask"]["values"], body["mask"]["counts"]).reshape(45, 38), expected)
    # repeated fields mean the same as commas; the server's own default is untouched
    again = client.post("/v1/segment?scales=0.75&scales=1.25&flip=true&format=json", content=data).json()
    assert again["classes"] == body["classes"]
    assert client.app.state.worker.segmenter.inference.scales == (1.0,)  # type: ignore[attr-defined]


def test_model_health_docs_and_page(client: TestClient) -> None:
    model = client.get("/v1/model").json()
    assert model["classes"] == CLASSES and model["palette"] == PALETTE
    assert model["arch"] == "deeplabv3plus" and model["backbone"] == "mobilenet_v2" and model["precision"] == "fp32"
    assert set(model["normalization"]) == {"mean", "std"} and model["config"]["num_classes"] == 3
    assert model["limits"]["max_pixels"] == ServeLimits().max_pixels
    assert client.get("/healthz").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert "/v1/segment" in spec["paths"] and "multipart/form-data" in spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for name in ("app.js", "style.css"):
        assert f"/static/{name}" in page.text
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.content
        assert "http://" not in asset.text and "https://" not in asset.text, f"{name} loads something from outside"
    assert "https://" not in page.text and "http://" not in page.text
    assert client.get("/static/..%2Fapp.py").status_code == 404


# --------------------------------------------------------------------------- hostile input


def test_sniffing_ignores_the_content_type(client: TestClient) -> None:
    assert sniff_image(photo(fmt="PNG")[0]) == "PNG" and sniff_image(photo(fmt="WEBP")[0]) == "WebP"
    for body, claimed in ((b"just some text, not a picture", "image/png"), (b"%PDF-1.7\n...", "image/jpeg")):
        response = client.post("/v1/segment", content=body, headers={"Content-Type": claimed})
        assert response.status_code == 415
        assert "not an image" in response.json()["detail"]
    # a real PNG declared as text is still segmented
    assert client.post("/v1/segment", content=photo(fmt="PNG")[0], headers={"Content-Type": "text/plain"}).status_code == 200


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_and_corrupt_images_are_400_naming_the_problem(client: TestClient, fmt: str) -> None:
    data = photo(64, 64, fmt=fmt)[0]
    for broken in (data[: len(data) // 2], data[:16] + b"\x00" * 64):
        response = client.post("/v1/segment", content=broken)
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert fmt in detail and ("truncated" in detail or "corrupt" in detail)
        assert "Traceback" not in response.text


def test_size_limits_are_413_with_the_limit(segmenter: Segmenter, ckpt: Path) -> None:
    with client_for(segmenter, ckpt, max_bytes=2000, max_pixels=1000) as small:
        big = photo(60, 60, fmt="PNG")[0]
        assert len(big) > 2000
        for response in (small.post("/v1/segment", content=big), small.post("/v1/segment", files={"file": ("a.png", big)})):
            assert response.status_code == 413
            assert "2000 bytes" in response.json()["detail"]
        response = small.post("/v1/segment", content=photo(40, 40, fmt="PNG")[0][:2000])
        assert response.status_code == 413 and "1600 pixels" in response.json()["detail"] and "1000" in response.json()["detail"]


def test_decompression_bombs_are_refused_before_decoding(client: TestClient) -> None:
    # a header claiming 100000 x 100000 pixels in a 70-byte file: refused from the header alone
    response = client.post("/v1/segment", content=png_with_size(100_000, 100_000))
    assert response.status_code == 413
    assert "10000000000 pixels" in response.json()["detail"] and str(ServeLimits().max_pixels) in response.json()["detail"]
    # a real one: 5000 x 5000 black pixels compress to a few kB
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 100_000
    assert client.post("/v1/segment", content=buffer.getvalue()).status_code == 413


def test_unknown_and_invalid_query_fields_are_422(client: TestClient) -> None:
    data = photo()[0]
    unknown = client.post("/v1/segment?scale=2", content=data)
    assert unknown.status_code == 422 and "unknown query field 'scale'" in unknown.json()["detail"]
    assert "scales" in unknown.json()["detail"]  # the choices are listed
    for query, words in (("mode=tiles", "mode"), ("scales=0", "scales"), ("mode=slide&crop_size=33&stride=65", "stride"),
                         ("flip=maybe", "flip"), ("format=gif", "format"), ("scales=3", "at most 2.0"),
                         ("scales=" + ",".join(["1"] * 9), "at most 8"), ("pad_to=9000,9000", "16000000 pixels")):
        response = client.post(f"/v1/segment?{query}", content=data)
        assert response.status_code == 422, query
        assert words in response.json()["detail"], (query, response.json())


def test_empty_and_malformed_uploads_are_400(client: TestClient) -> None:
    assert client.post("/v1/segment", content=b"").status_code == 400
    response = client.post("/v1/segment", files={"note": (None, "text only")})
    assert response.status_code == 400 and "no file" in response.json()["detail"]
    bad = client.post("/v1/segment", content=b"--x\r\nnot a form", headers={"Content-Type": "multipart/form-data; boundary=zzz"})
    assert bad.status_code == 400


class Failing(torch.nn.Module):
    output_stride = 16

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("out of memory\nat C++ frame 0x1"), KeyError("a bug")])
def test_server_errors_are_one_line_never_a_traceback(error: Exception) -> None:
    broken = Segmenter(Failing(error), classes=CLASSES, palette=PALETTE, normalization={"mean": [0.5] * 3, "std": [0.5] * 3})
    with TestClient(create_app(broken), raise_server_exceptions=False) as c:
        response = c.post("/v1/segment", content=photo()[0])
        assert response.status_code == 500
        detail = response.json()["detail"]
        assert "\n" not in detail and "Traceback" not in response.text
        assert ("out of memory" in detail) if isinstance(error, RuntimeError) else ("KeyError" in detail)
        assert c.get("/healthz").json()["queued"] == 0  # the failed request gave its place back


def test_an_image_larger_than_a_fixed_size_model_is_413_naming_the_way_out() -> None:
    from deeplab.deploy.runtime import InputSizeError

    too_small = Failing(InputSizeError("model.tflite was exported for 33x33 inputs only and this image needs 49x65; "
                                       "run it with --mode slide --crop-size 33"))
    seg = Segmenter(too_small, classes=CLASSES, palette=PALETTE, normalization={"mean": [0.5] * 3, "std": [0.5] * 3})
    with TestClient(create_app(seg), raise_server_exceptions=False) as c:
        response = c.post("/v1/segment", content=photo()[0])
        assert response.status_code == 413 and "--crop-size 33" in response.json()["detail"]
        assert c.get("/healthz").json()["queued"] == 0


def test_full_queue_answers_503_with_retry_after_not_a_hang(segmenter: Segmenter) -> None:
    app = create_app(segmenter, limits=ServeLimits(queue_size=2))
    worker = app.state.worker
    gate = threading.Event()
    worker.executor.submit(gate.wait, 30)  # the inference thread is busy: admitted requests wait

    async def scenario() -> list:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            data = photo()[0]
            tasks = [asyncio.ensure_future(c.post("/v1/segment", content=data)) for _ in range(2)]
            await asyncio.sleep(0.2)  # both admitted and queued
            rejected = await asyncio.wait_for(c.post("/v1/segment", content=data), timeout=5)
            health = (await c.get("/healthz")).json()
            gate.set()
            done = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
            return [rejected, health, *done]

    rejected, health, *done = asyncio.run(scenario())
    assert rejected.status_code == 503
    assert int(rejected.headers["retry-after"]) >= 1 and "limit 2" in rejected.json()["detail"]
    assert health["queued"] == 2 and health["rejected"] == 1
    assert [r.status_code for r in done] == [200, 200]
    assert worker.pending == 0
    worker.executor.shutdown()


def test_cli_reports_a_bad_model_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_cli.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deeplab serve: error:") and "missing.pt" in err and err.count("\n") == 1
    assert serve_cli.is_loopback("127.0.0.1") and serve_cli.is_loopback("::1") and not serve_cli.is_loopback("0.0.0.0")
