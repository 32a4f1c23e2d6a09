"""A bounded load test of a real ``deeplab serve`` on loopback: 8 concurrent clients x 25
requests, zero errors, throughput and p50/p99 latency printed, the server's memory after the run
within 64 MiB of before; a full queue answers 503 with Retry-After at once, not a hang; and
``--workers 2`` serves from two processes.

Every request has a timeout and the server is stopped at the end: the test stops by itself.
The figures go to stdout (``pytest -s``); timings on a shared machine are noisy.
"""

from __future__ import annotations

import io
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
from PIL import Image

from tests.serve_server import Server

pytestmark = [pytest.mark.spawn, pytest.mark.slow]
pytest.importorskip("fastapi", reason="deeplab serve needs the [serve] extra")

CLIENTS, REQUESTS = 8, 25
RSS_GROWTH_LIMIT = 64 * 2**20  # allocator caches settle during warm-up; a leak of 1 image per request would not


def jpeg(h: int, w: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def post(url: str, data: bytes, timeout: float = 60.0) -> Tuple[int, float, dict]:
    """(status, seconds, headers) of one ``POST /v1/segment``; HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url + "/v1/segment", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, time.perf_counter() - start, dict(response.headers)
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, time.perf_counter() - start, dict(exc.headers)


def test_eight_clients_zero_errors_and_bounded_memory(ckpt: Path, tmp_path: Path) -> None:
    data = jpeg(96, 128)
    with Server(ckpt, "--threads", "1", "--queue", str(2 * CLIENTS), log=tmp_path / "serve.log") as server:
        for _ in range(5):  # warm-up: first-call allocations and oneDNN kernel choices
            assert post(server.url, data)[0] == 200
        rss_before = server.rss_bytes()

        def client(_: int) -> List[Tuple[int, float, dict]]:
            return [post(server.url, data) for _ in range(REQUESTS)]

        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for batch in pool.map(client, range(CLIENTS)) for r in batch]
        wall = time.perf_counter() - start
        rss_after = server.rss_bytes()
    statuses = [s for s, _, _ in results]
    latencies = np.array([t for _, t, _ in results]) * 1e3
    server_ms = np.array([float(h["x-latency-ms"] if "x-latency-ms" in h else h["X-Latency-Ms"]) for _, _, h in results])
    print(f"\nload: {CLIENTS} clients x {REQUESTS} requests of a 128x96 JPEG, tiny MobileNetV2 model, 1 intra-op thread: "
          f"{len(results) / wall:.1f} req/s; latency p50 {np.percentile(latencies, 50):.0f} ms, "
          f"p99 {np.percentile(latencies, 99):.0f} ms (server-side p50 {np.percentile(server_ms, 50):.0f} ms); "
          f"errors {sum(s != 200 for s in statuses)}; RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert statuses == [200] * (CLIENTS * REQUESTS)
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, f"RSS grew by {(rss_after - rss_before) / 2**20:.0f} MiB"


def test_full_queue_answers_503_not_a_hang(ckpt: Path, tmp_path: Path) -> None:
    data = jpeg(384, 512, seed=1)  # slow enough that 12 simultaneous requests overlap
    n = 12
    with Server(ckpt, "--threads", "1", "--queue", "2", log=tmp_path / "serve.log") as server:
        assert post(server.url, data)[0] == 200
        gate = threading.Barrier(n)

        def client(_: int) -> Tuple[int, float, dict]:
            gate.wait(timeout=30)
            return post(server.url, data, timeout=120)

        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(client, range(n)))
        wall = time.perf_counter() - start
        health = server.get("/healthz")
    statuses = sorted(s for s, _, _ in results)
    rejected = [(t, h) for s, t, h in results if s == 503]
    print(f"\nqueue 2, {n} simultaneous requests: {statuses.count(200)} served, {len(rejected)} answered 503 "
          f"(slowest 503 in {max(t for t, _ in rejected) * 1e3:.0f} ms) in {wall:.1f} s")
    assert set(statuses) <= {200, 503} and 2 <= statuses.count(200) < n
    assert all(int(h.get("Retry-After", h.get("retry-after", "0"))) >= 1 for _, h in rejected)
    assert max(t for t, _ in rejected) < 5.0  # refused at once, not after waiting for a place
    assert health["rejected"] == len(rejected) and health["queued"] == 0


def test_two_worker_processes_share_the_port(ckpt: Path, tmp_path: Path) -> None:
    data = jpeg(48, 64, seed=2)
    # --log-level info: uvicorn logs "Child process [N] died" at info when it kills a worker
    with Server(ckpt, "--threads", "1", "--workers", "2", "--log-level", "info", log=tmp_path / "serve.log", ready_s=240) as server:
        with ThreadPoolExecutor(4) as pool:
            statuses = [s for s, _, _ in pool.map(lambda _: post(server.url, data), range(12))]
        log = server.log_text()
    assert statuses == [200] * 12
    assert "workers=2" in log and log.count("Application startup complete") == 2
    assert "died" not in log  # neither worker was killed while loading its model
