"""The one way a converter turns its jobs into files: a progress bar, worker processes for
large sets, and the ``*.partial`` folder renamed into place only when every job is done."""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence


def convert_into_place(convert: Callable[[Any], Any], jobs: Sequence[Any], partial: Path, out: Path, *,
                       desc: str, workers: int, progress: bool, chunksize: int = 16) -> None:
    """Run ``convert`` on every job (in ``workers`` processes when there are more than 64; a
    module-level function, as worker processes need), then replace ``out`` with ``partial``."""
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc=desc, unit="mask", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        if workers > 0 and len(jobs) > 64:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(convert, jobs, chunksize=chunksize):
                    bar.update(1)
        else:
            for job in jobs:
                convert(job)
                bar.update(1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
