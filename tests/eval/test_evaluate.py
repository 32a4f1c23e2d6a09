"""Evaluation loop: exact confusion matrices, modes restored, sharding, gloo all_reduce, report."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deeplab.config import InferenceConfig
from deeplab.eval.evaluate import ShardSampler, evaluate, shard_indices
from deeplab.eval.report import write_report
from deeplab.eval.metrics import ConfusionMatrix

NUM_CLASSES = 5
NUM_SAMPLES = 7  # odd: a padding sampler would evaluate one image twice on 2 ranks


class ToySet(Dataset):
    """Variable-size samples; channel 0 of the image encodes the class the Oracle predicts.

    Masks agree with that class on ~60% of pixels and carry an ignore (255) stripe, so
    the confusion matrix is dense and every sample contributes differently.
    """

    def __init__(self, n: int = NUM_SAMPLES, fixed_size: bool = False) -> None:
        self.n = n
        self.fixed_size = fixed_size

    def __len__(self) -> int:
        return self.n

    def pred_and_mask(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        h, w = (20, 24) if self.fixed_size else (17 + 6 * (i % 3), 19 + 5 * i)
        pred = torch.randint(0, NUM_CLASSES, (h, w), generator=g)
        noise = torch.randint(0, NUM_CLASSES, (h, w), generator=g)
        mask = torch.where(torch.rand(h, w, generator=g) < 0.6, pred, noise)
        mask[:, i % w] = 255
        return pred, mask

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        pred, mask = self.pred_and_mask(i)
        g = torch.Generator().manual_seed(i)
        image = torch.randn(3, *pred.shape, generator=g)
        image[0] = pred.float()
        return image, mask


class Oracle(nn.Module):
    """Predicts the class encoded in channel 0 with a large margin (exact argmax anywhere).

    Pointwise, so OS*k+1 padding, windows and flips leave its predictions unchanged.
    """

    output_stride = 16

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)  # a submodule whose mode we track
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.modes_seen: List[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        label = x[:, 0].round().long().clamp(0, NUM_CLASSES - 1)
        return F.one_hot(label, NUM_CLASSES).permute(0, 3, 1, 2).float() * self.scale


def _expected_matrix(ds: ToySet, indices: List[int]) -> torch.Tensor:
    """Confusion matrix by direct counting, independent of ConfusionMatrix."""
    m = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for i in indices:
        pred, mask = ds.pred_and_mask(i)
        for p, t in zip(pred.flatten().tolist(), mask.flatten().tolist()):
            if t != 255:
                m[t, p] += 1
    return m


def test_evaluate_counts_every_pixel_once() -> None:
    ds = ToySet()
    model = Oracle()
    cm = evaluate(model, DataLoader(ds, batch_size=1), num_classes=NUM_CLASSES, progress=False)
    assert isinstance(cm, ConfusionMatrix)
    assert torch.equal(cm.matrix, _expected_matrix(ds, list(range(len(ds)))))
    assert len(model.modes_seen) == NUM_SAMPLES


def test_inference_options_are_passed_through() -> None:
    ds = ToySet()
    model = Oracle()
    loader = DataLoader(ds, batch_size=1)
    cm = evaluate(model, loader, num_classes=NUM_CLASSES, inference=InferenceConfig(scales=(0.5, 1.0), flip=True),
                  progress=False)
    assert len(model.modes_seen) == NUM_SAMPLES * 4  # 2 scales x 2 flips per image
    # slide mode on the pointwise oracle predicts the same (windows of 9 every 5 px)
    slide = evaluate(model, loader, num_classes=NUM_CLASSES,
                     inference=InferenceConfig(mode="slide", crop_size=9, stride=5), progress=False)
    assert torch.equal(slide.matrix, _expected_matrix(ds, list(range(len(ds)))))
    assert cm.total == slide.total


def test_batches_larger_than_one_and_dict_batches() -> None:
    ds = ToySet(n=6, fixed_size=True)
    expected = _expected_matrix(ds, list(range(6)))
    cm = evaluate(Oracle(), DataLoader(ds, batch_size=4), num_classes=NUM_CLASSES, progress=False)
    assert torch.equal(cm.matrix, expected)
    dict_batches = [{"image": ds[i][0][None], "mask": ds[i][1][None, None]} for i in range(6)]
    cm = evaluate(Oracle(), dict_batches, num_classes=NUM_CLASSES, progress=False)  # (B,1,H,W) masks too
    assert torch.equal(cm.matrix, expected)


def test_eval_mode_during_loop_and_each_module_mode_restored() -> None:
    model = Oracle().train()
    model.bn.eval()  # e.g. frozen BatchNorm while fine-tuning: must stay frozen afterwards
    evaluate(model, DataLoader(ToySet(n=2)), num_classes=NUM_CLASSES, progress=False)
    assert model.modes_seen == [False, False]
    assert model.training and not model.bn.training

    model.eval()
    evaluate(model, DataLoader(ToySet(n=1)), num_classes=NUM_CLASSES, progress=False)
    assert not model.training


def test_modes_restored_when_evaluation_fails() -> None:
    model = Oracle().train()
    with pytest.raises(ValueError, match="num_classes"):
        evaluate(model, DataLoader(ToySet(n=1)), num_classes=3, progress=False)
    assert model.training and model.bn.training


def test_progress_bar_shows_miou(capsys: pytest.CaptureFixture) -> None:
    evaluate(Oracle(), DataLoader(ToySet(n=2)), num_classes=NUM_CLASSES, progress=True)
    err = capsys.readouterr().err
    assert "eval" in err and "mIoU=" in err and "2/2" in err


def test_mask_size_mismatch_is_an_error() -> None:
    batches = [(torch.zeros(1, 3, 17, 17), torch.zeros(1, 16, 16, dtype=torch.long))]
    with pytest.raises(ValueError, match="does not match image"):
        evaluate(Oracle(), batches, num_classes=NUM_CLASSES, progress=False)


# --------------------------------------------------------------------- sharding
def test_shard_indices_partition_without_padding() -> None:
    assert shard_indices(7, 2, 0) == [0, 2, 4, 6]
    assert shard_indices(7, 2, 1) == [1, 3, 5]
    assert shard_indices(2, 3, 2) == []
    for n, world in [(7, 2), (10, 3), (1, 4), (0, 2)]:
        shards = [shard_indices(n, world, r) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    sampler = ShardSampler(ToySet(), num_replicas=2, rank=1)
    assert list(sampler) == [1, 3, 5] and len(sampler) == 3
    assert list(ShardSampler(5)) == [0, 1, 2, 3, 4]  # no process group: everything
    with pytest.raises(ValueError, match="rank 2"):
        shard_indices(7, 2, 2)


def test_padding_distributed_sampler_is_refused() -> None:
    ds = ToySet()
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(ValueError, match="repeats 1 of 7 samples.*ShardSampler"):
        evaluate(Oracle(), DataLoader(ds, sampler=sampler), num_classes=NUM_CLASSES, progress=False)
    # the bug it prevents: the padded index list counts sample 0 twice
    padded = list(range(NUM_SAMPLES)) + [0]
    assert not torch.equal(_expected_matrix(ds, padded), _expected_matrix(ds, list(range(NUM_SAMPLES))))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a small shared machine
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        ds = ToySet()
        model = Oracle()
        loader = DataLoader(ds, batch_size=1, sampler=ShardSampler(ds))
        cm = evaluate(model, loader, num_classes=NUM_CLASSES, inference=InferenceConfig(scales=(0.75, 1.0), flip=True),
                      progress=rank == 0)
        local = len(model.modes_seen) // 4
        torch.save({"matrix": cm.matrix, "local_samples": local}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.spawn
def test_distributed_gloo_matches_single_process_exactly(tmp_path: Path) -> None:
    ds = ToySet()
    single = evaluate(
        Oracle(), DataLoader(ds, batch_size=1), num_classes=NUM_CLASSES,
        inference=InferenceConfig(scales=(0.75, 1.0), flip=True), progress=False,
    )
    # multi-scale blends the encoded labels, so compare with the direct count only in total
    assert single.total == int(_expected_matrix(ds, list(range(NUM_SAMPLES))).sum())

    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["local_samples"] for r in results] == [4, 3]  # unequal shards, no padding
    for r in results:
        assert torch.equal(r["matrix"], single.matrix)  # summed over ranks, on every rank


# --------------------------------------------------------------------- report
def test_write_report(tmp_path: Path) -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 255, 1]))
    names = ["background", "cat", "dog"]
    extra = {"checkpoint": Path("/ckpt/best.pt"), "scales": (0.5, 1.0), "flip": True, "loss": float("nan")}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("old")
    path = write_report(cm, names, tmp_path / "out", extra)

    assert path == tmp_path / "out" / "report.json"
    report = json.loads(path.read_text())
    assert report["config"] == {"checkpoint": "/ckpt/best.pt", "scales": [0.5, 1.0], "flip": True, "loss": None}
    assert report["metrics"]["mIoU"] == pytest.approx(cm.miou)
    assert report["metrics"]["per_class"]["cat"]["iou"] == pytest.approx(1 / 3)
    assert report["class_names"] == names
    assert torch.equal(torch.tensor(report["confusion_matrix"]), cm.matrix)
    assert sorted(p.name for p in path.parent.iterdir()) == ["confusion.png", "report.json"]
    with Image.open(path.parent / "confusion.png") as png:
        assert png.format == "PNG"


# --------------------------------------------------------------------- beyond the paper's table
def _image_iou(pred: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean IoU over the classes in this image's ground truth or prediction, by set counting."""
    valid = mask != 255
    ious = []
    for c in range(NUM_CLASSES):
        p, t = (pred == c) & valid, (mask == c) & valid
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    return sum(ious) / len(ious)


def test_evaluate_detailed_per_image_scores_and_worst() -> None:
    from deeplab.eval.evaluate import evaluate_detailed

    ds = ToySet()
    loader = DataLoader(ds, batch_size=1)
    result = evaluate_detailed(Oracle(), loader, num_classes=NUM_CLASSES, progress=False, per_image=True, worst=3,
                               trimap_widths=[1, 3], boundary_tolerance=1)
    # The extras do not change the main matrix.
    assert torch.equal(result.confusion.matrix, _expected_matrix(ds, list(range(NUM_SAMPLES))))
    want = [_image_iou(*ds.pred_and_mask(i)) for i in range(NUM_SAMPLES)]
    assert [s.index for s in result.per_image] == list(range(NUM_SAMPLES))
    assert [s.iou for s in result.per_image] == pytest.approx(want, abs=1e-12)
    worst = sorted(range(NUM_SAMPLES), key=lambda i: want[i])[:3]
    assert [w.score.index for w in result.worst] == worst  # lowest first
    for w in result.worst:
        pred, mask = ds.pred_and_mask(w.score.index)
        assert (w.prediction == pred.numpy()).all() and (w.target == mask.numpy()).all()
    sections = result.sections()
    assert set(sections) == {"trimap", "boundary_f", "per_image"}
    assert [r["width"] for r in sections["trimap"]["widths"]] == [1, 3]


def _dist_detailed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from deeplab.eval.evaluate import evaluate_detailed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        ds = ToySet()
        result = evaluate_detailed(Oracle(), DataLoader(ds, batch_size=1, sampler=ShardSampler(ds)),
                                   num_classes=NUM_CLASSES, progress=False, per_image=True, worst=2,
                                   trimap_widths=[0, 2], trimap_source="boundary", boundary_tolerance=1)
        assert result.trimap is not None and result.boundary_f is not None
        torch.save({"trimap": [cm.matrix for cm in result.trimap.matrices], "bf": result.boundary_f.per_class,
                    "per_image": [(s.index, s.iou) for s in result.per_image],
                    "worst": [w.score.index for w in result.worst]}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.spawn
def test_distributed_trimap_boundary_f_and_worst_match_single_process(tmp_path: Path) -> None:
    from deeplab.eval.evaluate import evaluate_detailed

    ds = ToySet()
    single = evaluate_detailed(Oracle(), DataLoader(ds, batch_size=1), num_classes=NUM_CLASSES, progress=False,
                               per_image=True, worst=2, trimap_widths=[0, 2], trimap_source="boundary",
                               boundary_tolerance=1)
    assert single.trimap is not None and single.boundary_f is not None
    mp.spawn(_dist_detailed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for a, b in zip(got["trimap"], single.trimap.matrices):
            assert torch.equal(a, b.matrix)
        # Sums of per-image scores in another order: equal to float64 rounding.
        torch.testing.assert_close(got["bf"], single.boundary_f.per_class, rtol=0, atol=1e-12, equal_nan=True)
        assert got["per_image"] == [(s.index, s.iou) for s in single.per_image]
        assert got["worst"] == [w.score.index for w in single.worst]
