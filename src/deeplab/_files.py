"""File helpers shared by the weight and data fetchers (standard library only)."""

from __future__ import annotations

import hashlib
import os
from typing import Union


def sha256_of(path: Union[str, "os.PathLike[str]"]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
