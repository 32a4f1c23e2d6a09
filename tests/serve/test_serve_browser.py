"""The page of ``deeplab serve`` in a real browser (Debian's chromium, driven by Playwright).

It starts ``deeplab serve`` on 127.0.0.1, uploads a real VOC photo through the page's file
input, waits for the overlay, checks that the legend lists the classes the API returns for the
same photo, moves the opacity slider and switches views, and saves a screenshot.

Skips when ``/usr/bin/chromium`` (or the playwright package) is missing, unless
``DEEPLAB_REQUIRE_BROWSER=1`` (CI sets it), which makes that a failure. Playwright's own
browser download is not used: it needs the internet at test time.

``DEEPLAB_SERVE_TEST_CHECKPOINT=runs/demo/best.pt`` serves that model instead of the test's
tiny random one; ``DEEPLAB_SERVE_SCREENSHOT=docs/serve.png`` is where the screenshot goes
(default: the test's temporary folder). The README's screenshot is
``DEEPLAB_SERVE_TEST_CHECKPOINT=/work/runs/demo/best.pt DEEPLAB_SERVE_SCREENSHOT=docs/serve.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.serve_server import Server, voc_photo
from tests.helpers import make_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("DEEPLAB_REQUIRE_BROWSER", "") == "1"

pytestmark = [pytest.mark.spawn, pytest.mark.slow, pytest.mark.network]  # the photo: demo data download


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if REQUIRED:
        pytest.fail(f"{reason} (DEEPLAB_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def test_page_segments_a_photo_in_a_real_browser(tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="deeplab serve needs the [serve] extra")
    require(CHROMIUM.is_file(), f"no browser at {CHROMIUM}: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed: pip install playwright")
    checkpoint = Path(os.environ.get("DEEPLAB_SERVE_TEST_CHECKPOINT") or make_checkpoint(tmp_path / "best.pt"))
    shot = Path(os.environ.get("DEEPLAB_SERVE_SCREENSHOT") or tmp_path / "serve.png")
    photo = voc_photo()
    with Server(checkpoint, "--threads", "2", log=tmp_path / "serve.log") as server, sync_playwright() as p:
        expected = server.post("/v1/segment?format=json", photo.read_bytes())
        model = server.get("/v1/model")
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 620})
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server.url, "data:", "blob:")) else None)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')", timeout=30_000)
            assert model["backbone"] in page.text_content("#model")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#view[data-ready='1']", timeout=60_000)
            names = page.locator("#legend li .name").all_text_contents()
            assert names == [c["name"] for c in expected["classes"]]  # same classes, same order (by share)
            shares = page.locator("#legend li .share").all_text_contents()
            assert shares == ["<0.1%" if c["share"] < 0.001 else f"{100 * c['share']:.1f}%" for c in expected["classes"]]
            assert "server" in page.text_content("#latency") and "ms" in page.text_content("#latency")
            assert page.get_attribute("#download", "download") == photo.stem + "_mask.png"
            canvas = page.locator("#view")
            assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == tuple(
                str(expected["size"][k]) for k in ("width", "height"))
            pixels = "Array.from(document.getElementById('view').getContext('2d').getImageData(0, 0, 500, 300).data)"
            half = page.evaluate(pixels)
            page.locator("#opacity").fill("90")
            assert canvas.get_attribute("data-opacity") == "0.9"
            assert page.text_content("#opacity-value") == "90%"
            assert page.evaluate(pixels) != half  # the blend changed
            page.check("input[name='view'][value='image']")
            assert canvas.get_attribute("data-view") == "image"
            page.check("input[name='view'][value='overlay']")
            page.locator("#opacity").fill("60")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert not errors, errors
            assert not outside, f"the page loaded something from outside: {outside}"
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
