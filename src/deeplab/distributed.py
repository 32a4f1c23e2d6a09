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

import contextlib
import inspect
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from deeplab._utils import DeeplabError, one_line, unwrap_model
from deeplab.config import TrainConfig
from deeplab.nn.sync_batchnorm import (
    CPUSyncBatchNorm,
    convert_sync_batchnorm,
    native_sync_batchnorm_supported,
)

__all__ = [
    "DEFAULT_DIST_TIMEOUT_S",
    "ENV_VARS",
    "SIGNAL_GRACE_S",
    "HardExitOnSignal",
    "PeerFailureError",
    "CPUSyncBatchNorm",
    "DistInfo",
    "all_reduce_",
    "barrier",
    "broadcast_object",
    "cleanup",
    "convert_sync_batchnorm",
    "default_backend",
    "find_free_port",
    "generation_store",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "is_peer_failure",
    "native_sync_batchnorm_supported",
    "reduce_metrics",
    "resolve_device",
    "restart_count",
    "unwrap_model",
    "wrap_ddp",
]

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Collective timeout. A peer that dies (process killed, node lost) is noticed at once: its
# sockets close and the next collective fails with "Connection reset/closed by peer". The
# timeout only bounds the other failure, a peer that stops answering (wedged, SIGSTOPped,
# network partition). It must stay above the longest legitimate wait of one rank for the
# others: rank 0 fetching pretrained weights while the rest wait at a barrier, rank 0 writing
# an R101 checkpoint to a slow shared filesystem, uneven evaluation shards. 10 minutes covers
# those with room and is a third of torch's gloo default (30 min), which let a wedged job burn
# half an hour per hang.
DEFAULT_DIST_TIMEOUT_S = TrainConfig.dist_timeout  # 600 s, the --dist-timeout default
# How long SIGTERM/SIGINT may take before the process exits hard (see HardExitOnSignal);
# torchrun escalates to SIGKILL after 30 s, and every second here delays the restart.
SIGNAL_GRACE_S = 5.0


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
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S,
) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and a
    single-process :class:`DistInfo` is returned, so the same script runs both ways.

    Args:
        device: see :func:`resolve_device`; CUDA processes get ``cuda:LOCAL_RANK``.
        backend: override the default (``nccl`` on CUDA, ``gloo`` otherwise).
        timeout_s: collective timeout (see :data:`DEFAULT_DIST_TIMEOUT_S`); a rank whose
            peer stops answering fails after this long instead of hanging. Keep it above
            the longest wait of one rank for another (downloads, checkpoint writes).

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
        timeout = timedelta(seconds=timeout_s)
        store = None
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Under torchrun every generation of workers shares the agent's TCPStore (see
            # generation_store): give this generation keys of its own.
            store = generation_store(env["MASTER_ADDR"], int(env["MASTER_PORT"]), rank=rank,
                                     world_size=world_size, timeout_s=timeout_s)
        kwargs: Dict[str, Any] = {"store": store} if store is not None else {"init_method": "env://"}
        dist.init_process_group(
            backend=backend or default_backend(dev.type),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            **kwargs,
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


def restart_count() -> int:
    """How many times torchrun's agent has restarted this job's workers (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


# --------------------------------------------------------------------------- elastic restarts

_GEN_PREFIX = "deeplab/generation/"


def generation_store(host: str, port: int, *, rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """A view of torchrun's agent store that no earlier generation of workers has written to.

    Why: with the c10d rendezvous (``--standalone`` and ``--rdzv-backend c10d``) torchrun
    hands every generation of workers the *same* TCPStore (``MASTER_PORT`` is the agent's,
    ``TORCHELASTIC_USE_AGENT_STORE=True``), and ``init_process_group`` uses the same keys
    in it every time (``default_pg/0//cpu/...``). After a restart the new ranks find the
    dead generation's keys: Gloo reads a dead peer's address and fails with
    ``connectFullMesh failed ... Connection refused`` when it connects first, or the store
    barrier counts the old generation's arrivals and the group hangs until its timeout -
    which rank starts first decides, so a restart failed or hung at random. (torch's
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, set for torchrun itself, avoids it too: rank
    0 then hosts a fresh store per generation.)

    Fix: rank 0 draws a fresh token and every rank prefixes its keys with it. The token
    reaches the others race-free although stale keys are around: rank ``r`` posts a fresh
    nonce under ``ask/r``, rank 0 answers every nonce it sees under ``ans/r/<nonce>`` (a key
    only this generation can wait for) until rank ``r`` acknowledges under ``ack/<token>/r``.
    Restart counts cannot serve as the token: they differ between nodes once one agent is
    restarted.

    Raises:
        PeerFailureError: not every rank showed up within ``timeout_s``.
    """
    base = dist.TCPStore(host, port, world_size=world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    store = dist.PrefixStore(_GEN_PREFIX, base)
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        token = uuid.uuid4().hex
        pending = set(range(1, world_size))
        answered: Dict[int, set] = {r: set() for r in pending}
        while pending:
            for r in sorted(pending):
                if store.check([f"ack/{token}/{r}"]):
                    pending.discard(r)
                elif store.check([f"ask/{r}"]):
                    nonce = store.get(f"ask/{r}").decode()
                    if nonce not in answered[r]:
                        store.set(f"ans/{r}/{nonce}", token)
                        answered[r].add(nonce)
            if pending:
                if time.monotonic() > deadline:
                    raise PeerFailureError(
                        f"rank 0: ranks {sorted(pending)} did not join the process group within "
                        f"--dist-timeout {timeout_s:g} s; check that every node was started, or raise --dist-timeout"
                    )
                time.sleep(0.01)
    else:
        nonce = uuid.uuid4().hex
        store.set(f"ask/{rank}", nonce)
        try:
            token = store.get(f"ans/{rank}/{nonce}").decode()  # waits up to the store timeout
        except (RuntimeError, dist.DistError) as exc:
            raise PeerFailureError(
                f"rank {rank}: rank 0 did not start the process group within --dist-timeout {timeout_s:g} s "
                f"({one_line(exc)}); check that every node was started, or raise --dist-timeout"
            ) from exc
        store.set(f"ack/{token}/{rank}", "1")
    return dist.PrefixStore(f"{token}/", base)


class PeerFailureError(DeeplabError, RuntimeError):
    """Another rank died or stopped answering; the message is one line for the launcher's log."""


# What Gloo, NCCL and the store say when a peer's process or node is gone or wedged.
_PEER_FAILURE_MARKERS = (
    "connection reset by peer", "connection closed by peer", "connection refused", "broken pipe",
    "timed out waiting", "gloo", "nccl", "unhandled system error", "read error", "watchdog",
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (raised inside a collective or the store) means a peer failed."""
    if isinstance(exc, PeerFailureError):
        return True
    dist_error = getattr(dist, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


def peer_failure_message(exc: BaseException, *, rank: int, step: Optional[int], timeout_s: float,
                         checkpoint: Optional[str]) -> str:
    """The one line a rank prints when a peer failed: what, where, and what happens next."""
    text = one_line(exc)
    if len(text) > 240:
        text = text[:240] + "..."
    what = ("a peer stopped answering (timed out after --dist-timeout "
            f"{timeout_s:g} s)") if "timed out" in text.lower() or "timeout" in text.lower() else "a peer process failed"
    where = f" after step {step}" if step is not None else ""
    after = (f"; torchrun restarts the job from {checkpoint} if --max-restarts allows"
             if checkpoint else "; torchrun restarts the job if --max-restarts allows")
    return f"rank {rank}: {what}{where} ({text}){after}"


class HardExitOnSignal:
    """Exit within ``grace_s`` of SIGTERM/SIGINT even while blocked in a collective.

    A Python signal handler only runs when the main thread executes Python code, and a rank
    blocked in a Gloo/NCCL collective whose peer is gone never does until the collective
    times out (:data:`DEFAULT_DIST_TIMEOUT_S`); torchrun's agent would wait for it and then
    SIGKILL it 30 s later, delaying every restart. Python's C-level handler, however, still
    writes the signal number to the ``signal.set_wakeup_fd`` descriptor; a daemon thread
    waiting on it gives the normal handler (the training loop's stop-at-step-boundary, which
    writes ``last.pt``) ``grace_s`` seconds, then flushes stdout/stderr, prints one line and
    calls ``os._exit(128 + signum)``. Checkpoints are written atomically, so exiting
    mid-write leaves the previous one intact.

    Enabled only in the main thread of the main interpreter, and only if nobody else owns the
    wakeup fd (e.g. an asyncio loop); forked children (DataLoader workers) drop it.
    """

    def __init__(self, *, grace_s: float = SIGNAL_GRACE_S, enabled: bool = True, label: str = "") -> None:
        self.grace_s = float(grace_s)
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.label = label
        self._fds: Optional[Tuple[int, int]] = None
        self._previous_fd = -1
        self._closed = threading.Event()

    def __enter__(self) -> "HardExitOnSignal":
        if not self.enabled:
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:
            os.close(read_fd)
            os.close(write_fd)
            return self
        if self._previous_fd != -1:  # someone else's; leave theirs in place
            signal.set_wakeup_fd(self._previous_fd)
            os.close(read_fd)
            os.close(write_fd)
            return self
        self._fds = (read_fd, write_fd)
        global _AT_FORK_REGISTERED
        if not _AT_FORK_REGISTERED:  # hooks cannot be unregistered: once per process
            os.register_at_fork(after_in_child=_drop_wakeup_fd)
            _AT_FORK_REGISTERED = True
        threading.Thread(target=self._watch, args=(read_fd,), name="deeplab-signal-watchdog", daemon=True).start()
        return self

    def _watch(self, read_fd: int) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([read_fd], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            hits = [b for b in data if b in (signal.SIGTERM, signal.SIGINT)]
            if not hits:
                continue
            if self._closed.wait(self.grace_s):
                return  # the process finished on its own
            signum = hits[0]
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            line = (f"{self.label}got {signal.Signals(signum).name} and did not stop within {self.grace_s:g} s "
                    "(blocked in a collective with a lost peer?); exiting now\n")
            with contextlib.suppress(Exception):
                os.write(2, line.encode())
            os._exit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        self._closed.set()
        if self._fds is not None:
            with contextlib.suppress(Exception):
                signal.set_wakeup_fd(-1)
            for fd in self._fds:
                with contextlib.suppress(Exception):
                    os.close(fd)
            self._fds = None


_AT_FORK_REGISTERED = False


def _drop_wakeup_fd() -> None:
    with contextlib.suppress(Exception):
        signal.set_wakeup_fd(-1)


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
