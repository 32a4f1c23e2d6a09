"""A real ``deeplab serve`` process on 127.0.0.1 for the browser and load tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

from deeplab.distributed import find_free_port


class Server:
    """``python -m deeplab.cli.main serve --checkpoint CKPT ...`` started and waited for.

    Use as a context manager: the process is stopped (SIGTERM, then SIGKILL) on exit.
    """

    def __init__(self, checkpoint: Path, *extra: str, log: Optional[Path] = None, ready_s: float = 120.0) -> None:
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command: List[str] = [sys.executable, "-m", "deeplab.cli.main", "serve", "--checkpoint", str(checkpoint),
                                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *extra]
        self.log = log
        self.ready_s = ready_s
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Server":
        out = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed in __exit__)
        self._out = out
        self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"deeplab serve exited with {self.process.returncode}: {self.log_text()[-2000:]}")
            try:
                self.get("/healthz")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"deeplab serve did not answer /healthz within {self.ready_s} s: {self.log_text()[-2000:]}")

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._out is not subprocess.DEVNULL:
            self._out.close()

    def log_text(self) -> str:
        return self.log.read_text() if self.log and self.log.is_file() else ""

    def get(self, path: str) -> Dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, data: bytes, timeout: float = 60.0) -> Dict[str, Any]:
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")


def voc_photo() -> Path:
    """A real PASCAL VOC photo: the demo data (fetched, checksummed, on first use)."""
    from deeplab.data.demo_data import demo_data_root, fetch_demo_data, is_complete

    root = demo_data_root()
    if not is_complete(root):
        root = fetch_demo_data(progress=False)
    return sorted((root / "images").glob("*.jpg"))[0]
