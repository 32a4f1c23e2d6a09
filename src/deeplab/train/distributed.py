"""Data-parallel training: process groups from torchrun, SyncBatchNorm, DDP, sampling.

Launch with ``torchrun --nproc_per_node=N ...``; :func:`init_distributed` reads the
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` variables it sets
and picks NCCL on CUDA, Gloo on CPU. Without them everything degrades to one process.

Data order is defined once for every world size: each epoch is a permutation seeded by
``(seed, epoch)``, cut into consecutive *global* batches; in every global batch rank
``r`` takes elements ``r, r + W, r + 2W, ...`` and splits them into its accumulation
micro-batches. So 2 processes x batch 8 see exactly the samples 1 process x batch 16
sees, and a resumed run restarts at ``(epoch, step)`` without replaying data.

SyncBatchNorm (including the CPU/Gloo one torch lacks) lives in
:mod:`deeplab.nn.sync_batchnorm`; its names are re-exported here for the training code.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from deeplab._utils import unwrap_model
from deeplab.nn.sync_batchnorm import (
    CPUSyncBatchNorm,
    convert_sync_batchnorm,
    native_sync_batchnorm_supported,
)

__all__ = [
    "ENV_VARS",
    "CPUSyncBatchNorm",
    "DeterministicBatchSampler",
    "DistInfo",
    "all_reduce_",
    "barrier",
    "broadcast_object",
    "cleanup",
    "convert_sync_batchnorm",
    "default_backend",
    "derive_seed",
    "epoch_permutation",
    "find_free_port",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "native_sync_batchnorm_supported",
    "reduce_metrics",
    "resolve_device",
    "unwrap_model",
    "wrap_ddp",
]

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 in single-process runs).
        world_size: number of processes.
        local_rank: rank on this machine; selects the CUDA device.
        device: the device this process trains on.
        backend: process-group backend, ``None`` when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0


def default_backend(device_type: str) -> str:
    """NCCL for CUDA tensors, Gloo for everything else (CPU)."""
    return "nccl" if device_type == "cuda" else "gloo"


def resolve_device(spec: Union[str, torch.device, None] = "auto", local_rank: int = 0) -> torch.device:
    """Turn ``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"`` into a device.

    ``"auto"`` and a bare ``"cuda"`` pick ``cuda:local_rank`` so each torchrun process
    gets its own GPU.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available; use device='cpu' or 'auto'")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "launch at most that many processes per node (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in single-process runs)."""
    return get_rank() == 0


def init_distributed(
    *,
    device: Union[str, torch.device, None] = "auto",
    backend: Optional[str] = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and a
    single-process :class:`DistInfo` is returned, so the same script runs both ways.

    Args:
        device: see :func:`resolve_device`; CUDA processes get ``cuda:LOCAL_RANK``.
        backend: override the default (``nccl`` on CUDA, ``gloo`` otherwise).
        timeout_s: collective timeout; evaluation runs on every rank between steps, so
            keep it above the evaluation time.

    Returns:
        This process's :class:`DistInfo`.

    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` but other variables are missing or malformed.
    """
    env = os.environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise RuntimeError(f"malformed distributed environment variable: {exc}; launch with torchrun") from exc
    if world_size <= 1:
        return DistInfo(device=resolve_device(device, local_rank))
    missing = [name for name in ENV_VARS if name not in env]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {missing} are not set; launch with "
            "`torchrun --nproc_per_node=N <script> ...`, which sets all of "
            f"{list(ENV_VARS)}, or set them yourself"
        )
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        # Before init so NCCL binds this process to its own GPU, not all to cuda:0.
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or default_backend(dev.type),
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=dist.get_backend(),
    )


def cleanup() -> None:
    """Destroy the default process group if one exists (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process; no-op when not distributed."""
    if is_distributed():
        dist.barrier()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for local multi-process jobs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- collectives

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "mean": "SUM"}


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"``, ``"mean"``, ``"max"``, ``"min"``); identity alone.

    Every rank must call it in the same order, as with any collective.
    """
    if op not in _OPS:
        raise ValueError(f"unknown reduce op {op!r}; choose from {sorted(_OPS)}")
    if is_distributed():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
        if op == "mean":
            tensor.div_(dist.get_world_size())
    return tensor


def reduce_metrics(metrics: Mapping[str, float], op: str = "mean", device: Optional[torch.device] = None) -> Dict[str, float]:
    """All-reduce a flat dict of numbers in one collective; keys must match on all ranks."""
    keys = sorted(metrics)
    if not keys:
        return {}
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_(values, op)
    return {k: float(v) for k, v in zip(keys, values.tolist())}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank; identity alone."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------- DDP


def wrap_ddp(
    model: nn.Module,
    device: torch.device,
    *,
    find_unused_parameters: bool = False,
    sync_buffers: bool = True,
) -> nn.Module:
    """Wrap ``model`` (already on ``device``) in DistributedDataParallel.

    DDP averages gradients over ranks; :func:`deeplab.losses.segmentation_loss`
    normalises by the global valid-pixel count times ``1/world_size`` so the average
    equals the gradient of the mean over the whole global batch. Returns ``model``
    unchanged when not distributed.

    Args:
        model: the model, already on ``device`` (SyncBatchNorm converted if wanted).
        device: this process's device; CUDA models get ``device_ids=[index]``.
        find_unused_parameters: needed only if some parameters get no gradient.
        sync_buffers: copy rank 0's buffers (BN running stats) to all ranks before each
            forward; with SyncBatchNorm they already agree.
    """
    if not is_distributed():
        return model
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    kwargs: Dict[str, Any] = {}
    if not sync_buffers:
        # torch 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers;
        # the default (sync) needs neither, so only the opt-out touches the API.
        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=device_ids,
        find_unused_parameters=find_unused_parameters,
        **kwargs,
    )


# --------------------------------------------------------------------------- sampling


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
