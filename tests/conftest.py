"""Shared test data: the toy segmentation dataset of the training and distributed tests.

``ToySegData`` is importable (``from tests.conftest import ToySegData``) for tests that build it
with their own options, and offered as the ``toy_seg_data`` fixture with the defaults. The
on-disk layouts (``make_voc``, ``make_cityscapes``, ...) stay in ``tests/data_fixtures.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest
import torch


class ToySegData(torch.utils.data.Dataset):
    """``n`` random images with random masks whose ignore region varies per sample.

    Sample ``i`` has its first ``(i * ignore_step) % size`` rows set to ``ignore_index``, so
    valid-pixel counts differ a lot between samples (and between ranks that hold them): a
    per-batch or per-rank mean loss would be wrong where a global mean is asked for.
    Tensors are drawn once from a generator seeded with ``seed``: same data in every process.

    Args:
        n: number of samples.
        size: images are ``(3, size, size)``, masks ``(size, size)``.
        seed: seed of the data generator.
        ignore_step: rows of ignore added per sample index (mod ``size``).
        num_classes: labels are drawn from ``0 .. num_classes - 1``.
        ignore_index: the ignore label.
        delay: seconds each ``__getitem__`` sleeps (slow loading, to kill a run mid-way).
        nan: fill the images with NaN (a diverging run).
    """

    def __init__(self, n: int = 10, size: int = 12, *, seed: int = 99, ignore_step: int = 5, num_classes: int = 3,
                 ignore_index: int = 255, delay: float = 0.0, nan: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.masks = torch.randint(0, num_classes, (n, size, size), generator=g)
        for i in range(n):
            self.masks[i, : (i * ignore_step) % size] = ignore_index
        if nan:
            self.images.fill_(float("nan"))
        self.delay = delay

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        return self.images[i], self.masks[i]


@pytest.fixture
def toy_seg_data() -> ToySegData:
    """A fresh default :class:`ToySegData` (10 samples of 12 x 12, 3 classes)."""
    return ToySegData()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, restored after.

    Results compared with runs in subprocesses that use one thread: thread count can
    change float summation order in conv kernels.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-class checkpoint (tests.helpers.make_checkpoint), one per test module."""
    from tests.helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")
