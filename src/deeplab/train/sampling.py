"""Deterministic sampling for training: seeds derived from names, the epoch permutation, and the
batch sampler that gives every rank its share of each global batch (the same run on 1 or N ranks)."""

from __future__ import annotations

import hashlib
import struct
from typing import Iterator, List, Tuple, Union

import torch
from torch.utils.data import Sampler

__all__ = ["DeterministicBatchSampler", "derive_seed", "epoch_permutation"]



def derive_seed(*parts: Union[int, str]) -> int:
    """A stable 63-bit seed from a tuple such as ``("sample", seed, epoch, index)``.

    Stable across processes, platforms and Python hash randomisation (unlike ``hash``),
    and well mixed, so neighbouring indices get unrelated generators.
    """
    hasher = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, str):
            raw = part.encode("utf-8")
            hasher.update(b"s" + struct.pack("<Q", len(raw)) + raw)
        else:
            hasher.update(b"i" + struct.pack("<q", int(part)))
    return int.from_bytes(hasher.digest(), "little") & ((1 << 63) - 1)


def epoch_permutation(num_samples: int, *, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Sample order of one epoch: a permutation seeded by ``(seed, epoch)`` only."""
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator()
    generator.manual_seed(derive_seed("shuffle", seed, epoch))
    return torch.randperm(num_samples, generator=generator)


class DeterministicBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Yields this rank's micro-batches of ``(epoch, index)`` keys, resumable mid-epoch.

    One optimizer step consumes one global batch of ``global_batch_size`` samples:
    consecutive positions of the epoch permutation. Rank ``r`` of ``W`` takes every
    ``W``-th of them starting at ``r`` and yields them as ``accum_steps`` micro-batches
    of ``global_batch_size // (W * accum_steps)``. The incomplete last global batch of
    an epoch is dropped, so all ranks always run the same number of steps (DDP would
    otherwise hang) and BatchNorm never sees a tiny batch.

    Keys carry the epoch so a :class:`deeplab.train.loader.SeededDataset` derives each
    sample's augmentation seed from ``(seed, epoch, index)`` in whichever worker
    process it lands - results do not depend on ``num_workers``.

    Args:
        num_samples: dataset length.
        global_batch_size: samples per optimizer step over all ranks and micro-batches.
        seed: shuffling seed.
        rank, world_size: this process's place in the job.
        accum_steps: micro-batches per optimizer step.
        shuffle: ``False`` keeps dataset order (still sharded and batched).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        global_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        shuffle: bool = True,
    ) -> None:
        if global_batch_size % (world_size * accum_steps):
            raise ValueError(
                f"global batch size {global_batch_size} must be divisible by world_size x accum_steps = "
                f"{world_size} x {accum_steps}; change batch_size, the number of processes or accum_steps"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch_size}; "
                "lower batch_size or check the dataset split"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.accum_steps = int(accum_steps)
        self.shuffle = bool(shuffle)
        self.micro_batch_size = global_batch_size // (world_size * accum_steps)
        self.steps_per_epoch = num_samples // global_batch_size
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch and the step inside it at which the next iteration starts."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def global_batch(self, epoch: int, step: int) -> List[int]:
        """Dataset indices of global batch ``step`` of ``epoch`` (all ranks together)."""
        perm = epoch_permutation(self.num_samples, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        start = step * self.global_batch_size
        return perm[start : start + self.global_batch_size].tolist()

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        perm = epoch_permutation(self.num_samples, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle).tolist()
        m = self.micro_batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch_size
            mine = perm[start : start + self.global_batch_size][self.rank :: self.world_size]
            for a in range(self.accum_steps):
                yield [(self.epoch, index) for index in mine[a * m : (a + 1) * m]]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps
