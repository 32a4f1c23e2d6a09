"""Distributed training: the same `deeplab train` command under torchrun, and the exactness of
DDP + SyncBatchNorm gradients on the real model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from deeplab import build_model
from deeplab.checkpoint import load_checkpoint
from deeplab.train import distributed as D

from .data_fixtures import make_voc


def _model_and_batch():
    torch.manual_seed(0)
    model = build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=5, dropout=0.0).double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 33, 33, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 33, 33), generator=g)
    y[0, :10] = 255  # uneven valid-pixel counts per rank
    return model, x, y


def _grad_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.init_distributed(device="cpu")
    try:
        model, x, y = _model_and_batch()
        model = D.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        valid = (y != 255).sum().double()
        logits = ddp(x[rank:rank + 1])
        # The engine's normalisation: local sum / (global valid count / world size).
        loss = torch.nn.functional.cross_entropy(logits, y[rank:rank + 1], ignore_index=255, reduction="sum")
        (loss / (valid / 2)).backward()
        if rank == 0:
            torch.save({k: p.grad.clone() for k, p in model.named_parameters()}, out)
    finally:
        D.cleanup()


@pytest.mark.slow
def test_real_model_ddp_syncbn_gradients_are_exact(tmp_path: Path) -> None:
    """In float64 (no rounding noise), 2 ranks x 1 image give the 1 x 2 gradients of the real
    DeepLabv3+ MobileNetV2, image-pooling BN included."""
    model, x, y = _model_and_batch()
    torch.nn.functional.cross_entropy(model(x), y, ignore_index=255).backward()
    reference = {k: p.grad.clone() for k, p in model.named_parameters()}
    out = tmp_path / "grads.pt"
    mp.spawn(_grad_worker, args=(D.find_free_port(), str(out)), nprocs=2)
    grads = torch.load(out)
    # float64 summation-order noise only. Some gradients are zero in exact arithmetic (a BN
    # shift followed by another BN) and come out as +-1e-14, so the scale is the model's.
    scale = max(float(g.abs().max()) for g in reference.values())
    for key, ref in reference.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-7, atol=1e-10 * scale, msg=key)


@pytest.mark.slow
def test_torchrun_runs_the_same_command(tmp_path: Path) -> None:
    """2 CPU processes (gloo, SyncBatchNorm) vs 1 process, same global batch.

    In float32 the two runs differ by summation order only; a randomly initialised net on
    noise amplifies that chaotically (and image-pooling BN over 2 values is ill-conditioned),
    so this uses ImageNet weights, no image pooling and 2 steps: agreement to ~1e-2 shows the
    wiring (sharding, SyncBN, gradient averaging, rank-0 I/O); exactness is the float64 test above.
    """
    root = make_voc(tmp_path / "voc", {"train": [f"t{i}" for i in range(4)], "val": ["v0", "v1", "v2"]})
    args = ["train", "--data-root", str(root), "--backbone", "mobilenet_v2", "--pretrained-backbone", "imagenet",
            "--crop-size", "33", "--batch-size", "2", "--max-steps", "2", "--eval-every", "2", "--num-workers", "0",
            "--device", "cpu", "--no-progress", "--dropout", "0", "--no-image-pooling"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "deeplab.cli.main", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.run([*launcher, "-m", "deeplab.cli.main", *args, "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "world_size           2" in multi.stdout  # resolved config printed by rank 0 ...
    assert multi.stdout.count("finished at step 2") == 1  # ... and only by rank 0
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "last.pt")
    assert one["model"].keys() == two["model"].keys()  # SyncBN keeps BatchNorm's keys
    for key, value in one["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(two["model"][key], value, rtol=0, atol=2e-2, msg=key)
    # Distributed evaluation sums the shards' confusion matrices.
    assert two["metrics"]["mIoU"] == pytest.approx(one["metrics"]["mIoU"], abs=0.02)
