"""deeplab.zoo: the paper's models by name, fetched from a server the test starts on 127.0.0.1.

The served tarball is tests/fixtures/tf/zoo_mnv2_voc.tar.gz, written by real TensorFlow with the
reference's variable names (scripts/make_tf_fixtures.py: a MobileNetV2 DeepLabv3 saved as
``model.ckpt-30000`` with ``global_step`` and optimizer slots, next to a
``frozen_inference_graph.pb``), under the file name of the zoo's mobilenetv2_coco_voc_trainaug. Its
weights are well conditioned, so ``predict``'s optimised float32 model (BN folded, fused convs)
passes its own parity check and matches TensorFlow's float32 logits to ~1e-6. The server counts requests, can ignore ``Range``, drop
the connection mid-file or answer 404, so download, resume, restart, cache hits and the offline
message are all observed from the server's side.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import threading
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab import zoo
from deeplab.checkpoint import load_checkpoint
from deeplab.cli.main import main as cli
from deeplab.config import BACKBONE_NAMES
from deeplab.segmenter import Segmenter
from deeplab.tf import ConversionError, ConversionWarning, DictSource, convert_source, open_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "tf"
MNV2_TARBALL = FIXTURES / "zoo_mnv2_voc.tar.gz"
NAME = "mobilenetv2_coco_voc_trainaug"
TARBALL = zoo.ZOO[NAME].tarball


class ZooServer:
    """An http.server in a thread serving ``files`` (name -> bytes) under ``/models/``.

    Attributes:
        requests: ``(path, Range header or None)`` of every request, in order.
        ranges: honour ``Range`` (206) or ignore it (200 with the whole file).
        drop_after: on the first request only (every request with ``drop_always``), send this
            many body bytes of a full ``Content-Length`` and close the connection.
    """

    def __init__(self, files: Dict[str, bytes]) -> None:
        self.files = files
        self.requests: List[tuple] = []
        self.ranges = True
        self.drop_after: Optional[int] = None
        self.drop_always = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/models/") else None
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng and server.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_after is not None and (server.drop_always or len(server.requests) == 1):
                    self.wfile.write(body[: server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ZooServer]:
    s = ZooServer({TARBALL: MNV2_TARBALL.read_bytes()})
    yield s
    s.close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``$TORCH_HOME`` (so the cache is empty) and no zoo URL from the environment."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(zoo.ZOO_URL_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints" / "deeplab"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the registry


def test_registry_covers_the_issue_and_is_consistent() -> None:
    wanted = {"xception65_coco_voc_trainaug", "xception65_coco_voc_trainval", "xception65_cityscapes_trainfine",
              "xception65_ade20k_train", "mobilenetv2_coco_voc_trainaug", "mobilenetv2_coco_voc_trainval",
              "mobilenetv2_coco_cityscapes_trainfine", "xception41_imagenet", "xception65_imagenet",
              "xception71_imagenet", "resnet_v1_50_beta_imagenet", "resnet_v1_101_beta_imagenet"}
    assert wanted <= set(zoo.ZOO)
    for name, entry in zoo.ZOO.items():
        assert entry.name == name and entry.tarball.endswith(".tar.gz")
        assert entry.backbone in BACKBONE_NAMES
        assert entry.url() == zoo.ZOO_BASE_URL + entry.tarball
        assert (entry.miou is None) == entry.is_backbone
    e = zoo.ZOO["xception65_coco_voc_trainaug"]
    assert (e.miou, e.eval_output_stride, e.eval_scales, e.eval_flip, e.pad_to) == (82.20, 16, (1.0,), False, (513, 513))
    ade = zoo.ZOO["xception65_ade20k_train"].eval_inference()
    assert ade.output_stride == 8 and ade.flip and ade.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert zoo.ZOO["xception65_cityscapes_trainfine"].pad_to == (1025, 2049)
    with pytest.raises(zoo.ZooError, match="choose from"):
        zoo.get_entry("xception65_voc")


def test_base_url_mirror_env_and_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(zoo.ZOO_URL_ENV, raising=False)
    assert zoo.base_url() == "http://download.tensorflow.org/models/"
    monkeypatch.setenv(zoo.ZOO_URL_ENV, "https://mirror.example/deeplab")
    assert zoo.base_url() == "https://mirror.example/deeplab/"
    assert zoo.base_url("http://other/x/") == "http://other/x/"  # --mirror wins over the environment
    assert zoo.base_url(str(tmp_path)) == tmp_path.resolve().as_uri() + "/"


# --------------------------------------------------------------------------- download, convert, cache


def test_download_convert_predict_through_the_cli_then_a_cache_hit(server: ZooServer, home: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(zoo.ZOO_URL_ENV, server.url)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 31, 3), dtype=np.uint8)).save(photo)
    # --pad-to small: the default (the zoo's 513 x 513 eval crop) costs seconds per image on a CPU.
    fast = ["--pad-to", "25", "33", "--quiet"]
    assert cli(["predict", "--model", NAME, str(photo), "--out", str(tmp_path / "out"), *fast]) == 0
    err = capsys.readouterr().err
    want = sha256(MNV2_TARBALL.read_bytes())
    assert f"sha256 {want}" in err
    assert server.requests == [(f"/models/{TARBALL}", None)]
    mask = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert mask.shape == (24, 31) and mask.max() < 21
    # Cached: the tarball and the converted checkpoint, with where it came from.
    assert sorted(p.name for p in home.iterdir()) == [TARBALL, f"{NAME}.pt"]
    ckpt = load_checkpoint(home / f"{NAME}.pt")
    info = ckpt["converted_from"]
    assert info["sha256"] == want and info["url"] == server.url + TARBALL and info["zoo"] == NAME
    assert ckpt["zoo"]["miou"] == 75.32 and ckpt["config"]["backbone"] == "mobilenet_v2"
    # Later calls make no request.
    assert zoo.pretrained_path(NAME) == home / f"{NAME}.pt"
    seg = Segmenter.from_pretrained(NAME, progress=False, pad_to=(25, 33))
    assert seg.classes[15] == "person" and seg.inference.pad_to == (25, 33)
    assert len(server.requests) == 1
    np.testing.assert_array_equal(seg.predict(np.asarray(Image.open(photo))), mask)


def test_from_pretrained_matches_tensorflows_logits(server: ZooServer, home: Path) -> None:
    import deeplab

    model = deeplab.from_pretrained(NAME, mirror=server.url, progress=False)
    golden = np.load(FIXTURES / "zoo_mnv2_voc_logits.npz")
    with torch.no_grad():
        ours = model(torch.from_numpy(golden["image"]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    ref = golden["logits"]
    # float32 on both sides through ~55 layers of a well-conditioned net: ~5e-7 measured; a wrong
    # padding, epsilon or transpose is 1e-2 or worse.
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("ranges", [True, False], ids=["resume-with-range", "server-without-range-restarts"])
def test_dropped_connection_resumes_or_restarts(server: ZooServer, home: Path, ranges: bool) -> None:
    data = MNV2_TARBALL.read_bytes()
    server.ranges = ranges
    server.drop_after = len(data) // 3
    dest = home / TARBALL
    digest = zoo.download(server.url + TARBALL, dest, progress=False)
    assert digest == sha256(data) and dest.read_bytes() == data
    assert not dest.with_name(dest.name + ".part").exists()
    assert len(server.requests) == 2
    assert server.requests[1][1] == f"bytes={len(data) // 3}-"  # asked for the rest either way


def test_a_connection_that_always_drops_gives_up_with_a_clear_error(server: ZooServer, home: Path) -> None:
    server.ranges, server.drop_after, server.drop_always = False, 5000, True
    with pytest.raises(zoo.ZooError, match=r"keeps stopping at 5000 of \d+ bytes; run again to resume"):
        zoo.download(server.url + TARBALL, home / TARBALL, progress=False)
    assert len(server.requests) == 1 + zoo.MAX_STALLED_ATTEMPTS and not (home / TARBALL).exists()


def test_a_part_file_from_an_earlier_run_is_resumed(server: ZooServer, home: Path) -> None:
    data = MNV2_TARBALL.read_bytes()
    home.mkdir(parents=True)
    (home / (TARBALL + ".part")).write_bytes(data[:1000])
    assert zoo.cache_state(zoo.ZOO[NAME]) == "partial"
    path = zoo.pretrained_path(NAME, mirror=server.url, progress=False)
    assert server.requests == [(f"/models/{TARBALL}", "bytes=1000-")]
    assert load_checkpoint(path)["converted_from"]["sha256"] == sha256(data)


def test_404_gives_the_offline_line_then_a_dropped_file_works_offline(home: Path, tmp_path: Path, capsys) -> None:
    empty = ZooServer({})
    try:
        with pytest.raises(zoo.ZooError) as info:
            zoo.pretrained_path(NAME, mirror=empty.url, progress=False)
        message = str(info.value)
        assert empty.url + TARBALL in message and "HTTP 404" in message
        assert f"put it in {home}/" in message and "\n" not in message
        photo = tmp_path / "photo.png"
        Image.new("RGB", (9, 7)).save(photo)
        assert cli(["predict", "--model", NAME, str(photo), "--out", str(tmp_path / "o"), "--mirror", empty.url]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("deeplab predict: error: cannot download") and "Traceback" not in err
        assert not any(home.iterdir())  # nothing half-made left behind
        # What the message says: put the tarball in that folder; no server is asked again.
        (home / TARBALL).write_bytes(MNV2_TARBALL.read_bytes())
        count = len(empty.requests)
        path = zoo.pretrained_path(NAME, mirror=empty.url, progress=False)
        assert len(empty.requests) == count and path == home / f"{NAME}.pt"
        assert load_checkpoint(path)["converted_from"]["sha256"] == sha256(MNV2_TARBALL.read_bytes())
    finally:
        empty.close()


def test_no_server_at_all_is_the_offline_line(home: Path) -> None:
    with pytest.raises(zoo.ZooError, match=rf"cannot download http://127\.0\.0\.1:9/m/{TARBALL} .*{TARBALL}"):
        zoo.pretrained_path(NAME, mirror="http://127.0.0.1:9/m/", progress=False)


@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
def test_bad_tarball_is_a_clear_error_and_leaves_no_cache_entry(home: Path, kind: str) -> None:
    data = MNV2_TARBALL.read_bytes()
    bad = data[: len(data) // 2] if kind == "truncated" else bytes(np.random.default_rng(0).integers(0, 255, 5000,
                                                                                                      dtype=np.uint8))
    s = ZooServer({TARBALL: bad})  # served whole, Content-Length matching: the bytes themselves are bad
    try:
        with pytest.raises(zoo.ZooError, match=rf"{TARBALL} \(sha256 {sha256(bad)[:16]}\.\.\.\) is not the {NAME}"):
            zoo.pretrained_path(NAME, mirror=s.url, progress=False)
    finally:
        s.close()
    assert list(home.iterdir()) == []


def test_weights_list_shows_the_zoo_and_the_cache(server: ZooServer, home: Path, capsys) -> None:
    assert cli(["weights", "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("xception65_coco_voc_trainaug"))
    assert "voc" in row and "deeplabv3plus/xception65" in row and "82.20 val (OS 16, scales 1.0)" in row
    assert "439MB" in row and row.rstrip().endswith("-")
    assert cli(["weights", "fetch", NAME, "--mirror", server.url]) == 0
    capsys.readouterr()
    assert cli(["weights", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(NAME))
    assert row.rstrip().endswith("converted")


def test_eval_with_a_zoo_name_applies_its_setting_and_prints_the_zoo_figure(server: ZooServer, home: Path,
                                                                           tmp_path: Path, capsys) -> None:
    from tests.data_fixtures import make_folder

    classes = "".join(f"c{i} {i} {i} {i}\n" for i in range(21)) + "__ignore__ 255 255 255\n"
    root = make_folder(tmp_path / "data", names=("a", "b"), classes_txt=classes, labels=(0, 15, 255))
    out = tmp_path / "report"
    assert cli(["eval", "--model", NAME, "--mirror", server.url, "--dataset", "folder", "--data-root", str(root),
                "--split", "all", "--out", str(out), "--no-progress", "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"pad_to\s+\[513, 513\]", printed) and re.search(r"output_stride\s+16\n", printed)
    assert "zoo mobilenetv2_coco_voc_trainaug: mIoU 75.32 (val, OS 16, scales 1.0) | ours: " in printed
    assert "not comparable" in printed  # our split is 'all', the zoo's figure is on val


# --------------------------------------------------------------------------- converter tolerance


@pytest.fixture(scope="module")
def mnv2_tensors() -> Dict[str, np.ndarray]:
    with open_checkpoint(MNV2_TARBALL) as source:
        return {name: source.read(name) for name in source.shapes()}


def test_variables_outside_the_model_are_one_warning(mnv2_tensors: Dict[str, np.ndarray]) -> None:
    extra = {"beta1_power": np.float32(0.9), "summaries/x": np.zeros(3, np.float32),
             "learning_rate": np.float32(1e-3), "aspp0/weights/ExponentialMovingAverage": mnv2_tensors["aspp0/weights"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv = convert_source(DictSource({**mnv2_tensors, **extra}), reference_config="mobilenetv2_voc")
    ours = [w for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    for name in ("beta1_power", "summaries/x", "learning_rate", "global_step", "aspp0/weights/Momentum"):
        assert name in message and name in conv.ignored
    assert conv.config is not None and conv.config.num_classes == 21


@pytest.mark.parametrize("name", ["MobilenetV2/extra/weights", "aspp0/extra", "aspp7/weights", "decoder/x"])
def test_an_unknown_variable_inside_a_model_scope_still_fails(mnv2_tensors: Dict[str, np.ndarray], name: str) -> None:
    with pytest.raises(ConversionError, match=rf"(?s)unexpected variables \(1\).*{name}"):
        convert_source(DictSource({**mnv2_tensors, name: np.zeros(3, np.float32)}),
                       reference_config="mobilenetv2_voc")


def test_serve_takes_a_zoo_name(server: ZooServer, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``deeplab serve --model NAME``: the zoo model is fetched once and served; /v1/model names it."""
    pytest.importorskip("fastapi", reason="deeplab serve needs the [serve] extra")
    pytest.importorskip("httpx", reason="the app is driven with httpx")
    from fastapi.testclient import TestClient

    from deeplab.cli import serve as serve_cli

    args = serve_cli.build_parser().parse_args(["--model", NAME, "--mirror", server.url, "--pad-to", "25", "33"])
    app = serve_cli.make_app(args)
    assert args.checkpoint == str(home / f"{NAME}.pt") and len(server.requests) == 1
    with TestClient(app) as client:
        info = client.get("/v1/model").json()
        assert info["num_classes"] == 21 and "person" in info["classes"]
        photo = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 31, 3), dtype=np.uint8)).save(photo, "PNG")
        reply = client.post("/v1/segment", content=photo.getvalue(), headers={"Content-Type": "image/png"})
        assert reply.status_code == 200
        assert Image.open(io.BytesIO(reply.content)).size == (31, 24)
    assert len(server.requests) == 1  # the second source resolution (the app's) was a cache hit
