"""The one downloader of the package: resumable, checksummed, atomic (model zoo, datasets).

>>> from deeplab.download import download
>>> digest = download("http://host/VOCtrainval_11-May-2012.tar", "data/archives/VOCtrainval_11-May-2012.tar",
...                   md5="6cd6e144f989b92b3379bac3b3de84fd")                # doctest: +SKIP

Bytes are streamed (tqdm bar on stderr) into ``DEST.part``; a dropped connection, or a ``.part``
file left by an earlier run, resumes with an HTTP ``Range`` request. When the file is complete its
md5 / sha1 are checked where the publisher gives one, its sha256 is always computed (and returned,
for the caller to record), and only then is it renamed to ``DEST``: ``DEST`` exists only complete
and verified. A file that fails its checksum is deleted and the error names both digests.

Every failure to reach the server is one line naming the URL, the file and the folder to put it
in by hand (after which the caller works with no network).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from ._utils import DeeplabError, atomic_write

PathLike = Union[str, "os.PathLike[str]"]

DOWNLOAD_TIMEOUT_S = 30.0
CHUNK = 1 << 20
# Attempts in a row that bring no new byte before a download gives up (the .part file stays).
MAX_STALLED_ATTEMPTS = 3
# Free space kept on top of what a download needs (the filesystem is not filled to the last byte).
DISK_MARGIN = 256 << 20


class DownloadError(DeeplabError, OSError):
    """A file cannot be had: no network, refused, keeps dropping, wrong checksum, disk full."""


class ChecksumError(DownloadError):
    """The downloaded (or hand-placed) file is not the published one."""


def offline_message(url: str, filename: str, directory: Path, cause: str, mirror_hint: str = "") -> str:
    """One line: what failed, and how to proceed without network."""
    mirror = f" (or from a mirror: {mirror_hint})" if mirror_hint else ""
    return (f"cannot download {url} ({cause}); download {filename} on a machine that can{mirror} and put it in "
            f"{directory}/ - it is then used with no network")


def file_digests(path: PathLike, algorithms: tuple = ("md5", "sha1", "sha256")) -> Dict[str, str]:
    """Hex digests of a file, all in one read (1 MiB chunks)."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def verify(path: PathLike, *, md5: Optional[str] = None, sha1: Optional[str] = None,
           sha256: Optional[str] = None, source: str = "", shown_as: Optional[PathLike] = None) -> str:
    """Check ``path`` against the published digests given; return its sha256.

    Raises:
        ChecksumError: a digest differs (the message names the file, both digests and the source).
    """
    got = file_digests(path)
    for name, want in (("md5", md5), ("sha1", sha1), ("sha256", sha256)):
        if want and got[name] != want.lower():
            origin = f" from {source}" if source else ""
            raise ChecksumError(f"{shown_as or path}{origin}: {name} {got[name]} but the published {name} is {want}; the file is "
                                f"damaged or not the official one - delete it and run again")
    return got["sha256"]


def check_disk_space(directory: PathLike, need: Optional[int], what: str = "") -> None:
    """Raise :class:`DownloadError` when ``directory``'s filesystem has less than ``need`` bytes free."""
    if not need:
        return
    folder = Path(directory)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need + DISK_MARGIN:
        raise DownloadError(f"{directory}: {free / 2**30:.1f} GiB free, {what or 'this download'} needs "
                            f"{(need + DISK_MARGIN) / 2**30:.1f} GiB; free space there or pick another --root")


def _total_size(response: Any, start: int) -> Optional[int]:
    content_range = response.headers.get("Content-Range", "")
    match = re.match(r"bytes (\d+)-(\d+)/(\d+)", content_range)
    if match:
        return int(match.group(3))
    length = response.headers.get("Content-Length")
    return start + int(length) if length is not None and length.isdigit() else None


def download(url: str, dest: PathLike, *, md5: Optional[str] = None, sha1: Optional[str] = None,
             sha256: Optional[str] = None, size: Optional[int] = None, progress: bool = True,
             timeout: float = DOWNLOAD_TIMEOUT_S, opener: Optional[urllib.request.OpenerDirector] = None,
             headers: Optional[Mapping[str, str]] = None, mirror_hint: str = "") -> str:
    """Stream ``url`` to ``dest``, verify it, and return the file's sha256.

    Args:
        url: what to fetch (``http(s)://`` or ``file://``).
        dest: the final path; bytes go to ``dest + ".part"`` until complete and verified.
        md5, sha1, sha256: the published digests, checked where given.
        size: expected size in bytes (for the disk-space check before a fresh download).
        progress: tqdm bar and resume messages on stderr.
        opener: a urllib opener (e.g. one holding a login's cookies); default plain ``urlopen``.
        headers: extra request headers.
        mirror_hint: how to name a mirror in the offline message (``--mirror URL``).

    A server that answers a range request with the whole file (200) restarts the file from byte 0.

    Raises:
        DownloadError: the server cannot be reached or refuses (the message says where to put the
            file by hand), the connection keeps dropping without progress, or the disk is full.
        ChecksumError: the finished file is not the published one (it is deleted).
    """
    from tqdm import tqdm

    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if size:
        check_disk_space(target.parent, size - have, f"{target.name} ({size / 2**30:.2f} GiB)")
    open_url = opener.open if opener is not None else urllib.request.urlopen
    # Attempts in a row that got no further than the best so far (a server without Range that
    # keeps dropping at the same byte restarts from 0 every time: that is no progress either).
    stalled, best = 0, 0
    while True:
        have = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers=dict(headers or {}))
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = open_url(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # the .part is complete or longer than the file: start again
                part.unlink()
                stalled += 1
                if stalled < MAX_STALLED_ATTEMPTS:
                    continue
            raise DownloadError(offline_message(url, target.name, target.parent, f"HTTP {exc.code} {exc.reason}",
                                                mirror_hint)) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            cause = getattr(exc, "reason", None) or exc
            raise DownloadError(offline_message(url, target.name, target.parent, str(cause), mirror_hint)) from exc
        with response:
            resumed = have > 0 and getattr(response, "status", 200) == 206
            if not resumed:
                have = 0  # no Range support (or a fresh start): the body is the whole file
            total = _total_size(response, have)
            with open(part, "ab" if resumed else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                desc=target.name[:40], file=sys.stderr, dynamic_ncols=True,
            ) as bar:
                try:
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        have += len(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException, socket.timeout) as exc:
                    if progress:
                        print(f"connection dropped at {have} bytes ({exc}); resuming", file=sys.stderr)
        if total is None or have == total:
            break
        if have > total:  # the server changed the file under us: start again
            part.unlink()
        stalled = 0 if have > best else stalled + 1
        best = max(best, have)
        if stalled >= MAX_STALLED_ATTEMPTS:
            raise DownloadError(f"download of {url} keeps stopping at {have} of {total} bytes; run again to resume "
                                f"from {part}, or put {target.name} in {target.parent}/ by hand")
        if progress:
            print(f"{url}: {have} of {total} bytes; resuming with a Range request", file=sys.stderr)
    try:
        digest = verify(part, md5=md5, sha1=sha1, sha256=sha256, source=url, shown_as=target)
    except ChecksumError:
        part.unlink(missing_ok=True)  # a wrong file must not be resumed from
        raise
    with atomic_write(target, mode=None) as tmp:  # fsynced, and a crash leaves no complete-looking DEST
        os.replace(part, tmp)
    return digest
