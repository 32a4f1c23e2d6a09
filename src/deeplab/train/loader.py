"""The training data pipeline: per-sample seeded augmentation and the DataLoader.

Which samples a step sees is decided by
:class:`~deeplab.train.sampling.DeterministicBatchSampler`; how each is augmented by
:class:`SeededDataset`, from ``(seed, epoch, index)`` alone. So the batches are the same
for any ``num_workers``, rank or resume point.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from deeplab.train.sampling import DeterministicBatchSampler, derive_seed

__all__ = ["SeededDataset", "build_train_loader", "close_loader"]


class SeededDataset(Dataset):
    """Wraps a dataset so each sample is augmented by its own seeded ``torch.Generator``.

    Keys are ``(epoch, index)`` pairs (as yielded by
    :class:`~deeplab.train.sampling.DeterministicBatchSampler`) or plain indices
    (epoch 0). Sample ``index`` of ``epoch`` is transformed with a generator seeded from
    ``(seed, epoch, index)``: the same crop and flip whichever worker process, rank or
    resume point loads it, and nothing touches the global RNGs.

    Args:
        dataset: returns raw ``(image, mask)`` for an integer index. If it has its own
            ``transform`` and ``transform`` here is ``None``, it is asked for
            ``dataset[(index, sample_seed)]`` instead (the ``deeplab.data`` protocol).
        transform: called as ``transform(image, mask, generator=g)``; ``None`` passes
            samples through.
        seed: base seed.
    """

    def __init__(self, dataset: Any, transform: Optional[Callable[..., Any]] = None, *, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self._dataset_transforms = transform is None and getattr(dataset, "transform", None) is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_seed(self, epoch: int, index: int) -> int:
        """Seed of sample ``index``'s augmentation generator in ``epoch``."""
        return derive_seed("sample", self.seed, epoch, index)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Any:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))
        if self._dataset_transforms:
            return self.dataset[(index, self.sample_seed(epoch, index))]
        sample = self.dataset[index]
        if self.transform is None:
            return sample
        generator = torch.Generator()
        generator.manual_seed(self.sample_seed(epoch, index))
        image, mask = sample
        return self.transform(image, mask, generator=generator)


def _seed_worker(worker_id: int) -> None:
    # Transforms must use the generator they are given; this only keeps a careless
    # numpy/random call from returning the same numbers in every forked worker.
    worker_seed = torch.initial_seed() % (2**32)
    random.seed(worker_seed)
    try:
        import numpy as np

        np.random.seed(worker_seed)
    except ImportError:
        pass


def build_train_loader(
    dataset: SeededDataset,
    batch_sampler: DeterministicBatchSampler,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Optional[Callable[..., Any]] = None,
) -> DataLoader:
    """DataLoader over ``batch_sampler``'s ``(epoch, index)`` keys.

    Workers are persistent (no respawn per epoch) and the loader has its own generator:
    left alone, a DataLoader draws its worker base seed from the global torch RNG each
    time an iterator is created, which would shift dropout masks after a resume.
    """
    generator = torch.Generator()
    generator.manual_seed(derive_seed("loader", dataset.seed))
    kwargs: Dict[str, Any] = {}
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
        **kwargs,
    )


def close_loader(loader: DataLoader) -> None:
    """Stop ``loader``'s persistent worker processes now.

    They otherwise live until garbage collection; a following run (or test) should not
    compete with idle processes for CPU and memory.
    """
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None
