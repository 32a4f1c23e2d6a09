"""Distributed training: the same `deeplab train` command under torchrun, and the exactness of
DDP + SyncBatchNorm gradients on the real model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from deeplab import build_model
from deeplab.checkpoint import load_checkpoint, save_checkpoint
from deeplab.config import ModelConfig
from deeplab.models.deeplab import build_model_from_config
from deeplab.nn.sync_batchnorm import convert_sync_batchnorm
from deeplab import distributed as D

from tests.data_fixtures import save_mask


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
        model = convert_sync_batchnorm(model)
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


@pytest.mark.spawn  # ~6 s: under the ~10 s line for `slow`
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


def _write_voc(root: Path, n_train: int = 4, h: int = 96, w: int = 128) -> Path:
    """A VOC layout whose images differ in brightness and contrast from one to the next.

    Per-image channel statistics then differ, so BatchNorm over one rank's half of the
    batch is measurably not BatchNorm over the whole batch (a run without SyncBatchNorm
    fails the comparison), and at 96 x 128 the 65-pixel crops need no padding.
    """
    voc = root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for split, ids in {"train": [f"t{i}" for i in range(n_train)], "val": ["v0", "v1"]}.items():
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for j, name in enumerate(ids):
            rng = np.random.default_rng(j + (0 if split == "train" else 50))
            smooth = np.kron(rng.normal(size=(h // 16, w // 16, 3)), np.ones((16, 16, 1)))
            image = 128 + 40 * (0.5 + 0.5 * (j % 3)) * smooth + rng.normal(scale=20, size=(h, w, 3)) + 25 * (j - 1.5)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
            labels = (smooth[..., 0] > 0).astype(np.int64) * 15
            labels[: 4 + 6 * j] = 255  # uneven ignore regions: uneven valid-pixel counts per rank
            save_mask(voc / "SegmentationClass" / f"{name}.png", labels)
    return root


def _relative_change(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor],
                     keys: List[str]) -> float:
    """``||b - a|| / ||a - init||`` over ``keys``: the disagreement as a fraction of the update."""
    diff = sum(float((b[k].double() - a[k].double()).norm() ** 2) for k in keys) ** 0.5
    update = sum(float((a[k].double() - init[k].double()).norm() ** 2) for k in keys) ** 0.5
    assert update > 0, "training did not change these tensors"
    return diff / update


@pytest.mark.slow
@pytest.mark.spawn
def test_torchrun_runs_the_same_command(tmp_path: Path) -> None:
    """2 CPU processes (gloo, SyncBatchNorm) vs 1 process: one step on the same global batch.

    The two runs differ by float32 summation order only (batch-4 vs batch-2 conv kernels,
    the all-reduce, SyncBatchNorm's float64 statistics), and the comparison is made well
    conditioned: ImageNet weights, no image pooling, 65-pixel crops (BatchNorm statistics
    over >= 50 values per channel and rank, none over a handful), and a single optimizer
    step, so nothing compounds. What is compared is the *update*, not the weights: the
    difference of the two runs relative to the change one step made, for the parameters
    (driven by the averaged gradients) and the BatchNorm buffers (by the synced statistics)
    separately.

    Tolerances: on the machine that wrote this (2 shared cores) the disagreement was
    5.1e-3 of the update (parameters) and 1.9e-6 (buffers): float32 rounding (eps 6e-8)
    amplified by the network's conditioning. Other CPUs' kernels round differently, so
    the bounds leave 10x (parameters) and 500x (buffers). Breaking the wiring lands far
    above them (measured): DDP left out, so gradients are never averaged: parameters 1.6;
    the loss normalised without ``/ world_size``, so the average is half the gradient:
    parameters 0.50; BatchNorm not synchronised: parameters 2.0, buffers 0.40.
    Exactness is the float64 test above.
    """
    root = _write_voc(tmp_path / "voc")
    config = ModelConfig(backbone="mobilenet_v2", num_classes=21, dropout=0.0, image_pooling=False)
    torch.manual_seed(0)
    init_model = build_model_from_config(config, pretrained_backbone="imagenet")
    init = {k: v.clone() for k, v in init_model.state_dict().items()}
    save_checkpoint(tmp_path / "init.pt", {"model": init, "config": config.to_dict()})
    params = {k for k, _ in init_model.named_parameters()}
    args = ["train", "--data-root", str(root), "--backbone", "mobilenet_v2", "--pretrained-backbone", "none",
            "--init-from", str(tmp_path / "init.pt"), "--crop-size", "65", "--scale-range", "0.75", "1.25",
            "--batch-size", "4", "--lr", "0.001", "--max-steps", "1", "--eval-every", "1", "--num-workers", "0",
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
    assert multi.stdout.count("finished at step 1") == 1  # ... and only by rank 0
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "last.pt")
    assert one["model"].keys() == two["model"].keys() == init.keys()  # SyncBN keeps BatchNorm's keys
    floats = [k for k, v in one["model"].items() if v.is_floating_point()]
    for key in one["model"]:
        if key not in floats:
            assert torch.equal(two["model"][key], one["model"][key]), key  # num_batches_tracked
    param_change = _relative_change(one["model"], two["model"], init, [k for k in floats if k in params])
    buffer_change = _relative_change(one["model"], two["model"], init, [k for k in floats if k not in params])
    assert param_change < 5e-2, f"parameters: 2 ranks differ from 1 process by {param_change:.3g} of the update"
    assert buffer_change < 1e-3, f"BN statistics: 2 ranks differ from 1 process by {buffer_change:.3g} of the update"
    for key in floats:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=0, atol=2e-2, msg=key)
    # Distributed evaluation sums the shards' confusion matrices.
    assert two["metrics"]["mIoU"] == pytest.approx(one["metrics"]["mIoU"], abs=0.02)
