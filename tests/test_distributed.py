"""Distributed training: sampling, SyncBatchNorm on CPU/Gloo, and DDP == one big batch.

The multi-process tests spawn 2 CPU processes talking Gloo over 127.0.0.1 on a free
port; process-group timeouts are short so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from deeplab import distributed as D
from deeplab.checkpoint import load_checkpoint
from deeplab.config import ModelConfig, TrainConfig
from deeplab.train import sampling as S
from deeplab.train import train
from tests.conftest import ToySegData

# ----------------------------------------------------------------------------- stand-ins


class SegNet(nn.Module):
    """conv-BN-ReLU-conv-BN-ReLU-conv: enough BatchNorm to make SyncBN matter; no dropout
    (ranks share one RNG stream, so dropout masks could not match a single process)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def seg_data() -> ToySegData:
    """16 samples of 10 x 10 whose ignore rows grow by 3 per sample (uneven per-rank valid counts)."""
    return ToySegData(n=16, size=10, seed=1234, ignore_step=3)


def flip_noise(image: torch.Tensor, mask: torch.Tensor, *, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    if float(torch.rand(1, generator=generator)) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    return image + 0.05 * torch.randn(image.shape, generator=generator), mask


def _cfg(run_dir: Path, **kw: Any) -> TrainConfig:
    base = dict(lr=0.05, max_steps=3, batch_size=8, num_workers=0, device="cpu", run_dir=str(run_dir),
                eval_every=0, ckpt_every=0, log_every=1, seed=7)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- single-process


def test_derive_seed_is_pinned() -> None:
    # Resuming old checkpoints depends on these exact numbers: changing the hash
    # changes every augmentation and shuffle after a resume.
    assert S.derive_seed("sample", 0, 0, 0) == S.derive_seed("sample", 0, 0, 0)
    assert S.derive_seed("sample", 0, 0, 0) != S.derive_seed("sample", 0, 0, 1)
    assert S.derive_seed("sample", 0, 1, 0) != S.derive_seed("sample", 0, 0, 1)
    assert S.derive_seed("a", 1) != S.derive_seed("a1")
    assert S.derive_seed("shuffle", 0, 0) == 2602346044445981329
    assert 0 <= S.derive_seed("x", -5) < 2**63
    assert S.epoch_permutation(6, seed=0, epoch=0).tolist() == [3, 5, 0, 1, 4, 2]


def test_sampler_ranks_partition_each_global_batch() -> None:
    n, batch, world, accum = 23, 8, 2, 2
    single = S.DeterministicBatchSampler(n, global_batch_size=batch, seed=3)
    ranks = [S.DeterministicBatchSampler(n, global_batch_size=batch, seed=3, rank=r, world_size=world,
                                         accum_steps=accum) for r in range(world)]
    assert single.steps_per_epoch == 2 and ranks[0].micro_batch_size == 2
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        single_batches = list(single)
        rank_batches = [list(s) for s in ranks]
        assert len(single_batches) == 2 and all(len(b) == 4 for b in rank_batches)
        for step in range(2):
            want = single_batches[step]
            assert all(key[0] == epoch for key in want)
            got: List[Tuple[int, int]] = []
            for r in range(world):
                got += [k for mb in rank_batches[r][step * accum:(step + 1) * accum] for k in mb]
            assert sorted(got) == sorted(want)  # same samples, no duplicates
            # rank r takes every world-th element of the global batch
            for r in range(world):
                mine = [k[1] for mb in rank_batches[r][step * accum:(step + 1) * accum] for k in mb]
                assert mine == [k[1] for k in want][r::world]
    single.set_epoch(0)
    e0 = [k for b in single for k in b]
    single.set_epoch(1)
    e1 = [k[1] for b in single for k in b]
    assert [k[1] for k in e0] != e1  # reshuffled per epoch
    assert len(set(k[1] for k in e0)) == 16  # 23 // 8 * 8, the tail is dropped


def test_sampler_resumes_mid_epoch_and_rejects_bad_sizes() -> None:
    s = S.DeterministicBatchSampler(12, global_batch_size=4, seed=0)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start_step=2)
    assert list(s) == full[2:] and len(s) == 1
    assert s.global_batch(5, 1) == [k[1] for k in full[1]]
    with pytest.raises(ValueError, match="divisible by world_size x accum_steps"):
        S.DeterministicBatchSampler(12, global_batch_size=6, seed=0, world_size=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        S.DeterministicBatchSampler(3, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="start_step"):
        s.set_epoch(0, start_step=4)


def test_init_distributed_env_handling(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in D.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    info = D.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match=r"\['LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'\].*torchrun"):
        D.init_distributed(device="cpu")
    assert D.default_backend("cuda") == "nccl" and D.default_backend("cpu") == "gloo"
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()


def test_convert_sync_batchnorm_keeps_tensors_and_keys() -> None:
    model = SegNet()
    model.body[1].eval()
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    converted = D.convert_sync_batchnorm(model, device="cpu")
    bns = [m for m in converted.modules() if isinstance(m, D.CPUSyncBatchNorm)]
    assert len(bns) == 2 and not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert list(converted.state_dict()) == keys
    for name, p in converted.named_parameters():
        assert p is params[name]  # an optimizer built before conversion still works
    assert bns[0].training is False and bns[1].training is True
    assert not D.native_sync_batchnorm_supported("cpu") and D.native_sync_batchnorm_supported("cuda")


def test_cpu_sync_batchnorm_without_group_is_batchnorm() -> None:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    ref.weight.data.uniform_(0.5, 1.5)
    ref.bias.data.uniform_(-1, 1)
    sync = D.convert_sync_batchnorm(nn.Sequential(ref), device="cpu")[0]
    x = torch.randn(3, 4, 5, 5)
    ref_copy = nn.BatchNorm2d(4)
    ref_copy.load_state_dict(ref.state_dict())
    assert torch.equal(sync(x), ref_copy(x))
    assert torch.equal(sync.running_var, ref_copy.running_var)


# ----------------------------------------------------------------------------- multi-process


def _setup_env(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)  # two processes on two shared cores


def _collectives_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """SyncBN forward/backward vs plain BN on the union batch, plus reduce helpers."""
    result: Dict[str, Any] = {}
    try:
        _setup_env(rank, world, port)
        info = D.init_distributed(device="cpu", timeout_s=60)
        result["info"] = (info.rank, info.world_size, info.backend)
        # torch's own SyncBatchNorm refuses CPU tensors in a multi-process group.
        native = nn.SyncBatchNorm(4)
        try:
            native(torch.randn(2, 4, 3, 3))
            result["native_cpu"] = "ok"
        except ValueError as exc:
            result["native_cpu"] = str(exc)

        torch.manual_seed(0)
        full = torch.randn(4, 4, 5, 5, dtype=torch.float64) * 3 + 1
        gy = torch.randn(4, 4, 5, 5, dtype=torch.float64)
        # uneven local batches: rank 0 has 3 samples, rank 1 has 1
        part = slice(0, 3) if rank == 0 else slice(3, 4)
        bn = D.CPUSyncBatchNorm(4).double()
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, 4))
            bn.bias.copy_(torch.linspace(-1, 1, 4))
        x = full[part].clone().requires_grad_(True)
        y = bn(x)
        y.backward(gy[part])
        result.update(y=y.detach(), gx=x.grad, gw=bn.weight.grad, gb=bn.bias.grad,
                      rm=bn.running_mean.clone(), rv=bn.running_var.clone())

        result["sum"] = D.all_reduce_(torch.tensor([rank + 1.0]), "sum").item()
        result["mean"] = D.all_reduce_(torch.tensor([rank + 1.0]), "mean").item()
        result["max"] = D.all_reduce_(torch.tensor([rank + 1.0]), "max").item()
        result["metrics"] = D.reduce_metrics({"a": float(rank), "b": 2.0 * rank})
        result["obj"] = D.broadcast_object({"from": rank}, src=0)
        D.barrier()
    except Exception:  # report instead of hanging the parent
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        D.cleanup()


@pytest.mark.spawn
def test_cpu_sync_batchnorm_matches_batchnorm_on_union_batch(tmp_path: Path) -> None:
    port = D.find_free_port()
    mp.spawn(_collectives_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in res:
        assert "error" not in r, r.get("error")
    assert res[0]["info"] == (0, 2, "gloo") and res[1]["info"] == (1, 2, "gloo")
    # Finding for torch 2.13: nn.SyncBatchNorm does not work on CPU, hence CPUSyncBatchNorm.
    assert "expected input tensor to be on GPU" in res[0]["native_cpu"]

    torch.manual_seed(0)
    full = (torch.randn(4, 4, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    gy = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    ref = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2.0, 4))
        ref.bias.copy_(torch.linspace(-1, 1, 4))
    y = ref(full)
    y.backward(gy)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat([res[0]["y"], res[1]["y"]]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([res[0]["gx"], res[1]["gx"]]), full.grad, **tol)
    # parameter grads stay local; their sum over ranks is the full-batch gradient
    torch.testing.assert_close(res[0]["gw"] + res[1]["gw"], ref.weight.grad, **tol)
    torch.testing.assert_close(res[0]["gb"] + res[1]["gb"], ref.bias.grad, **tol)
    for r in res:
        torch.testing.assert_close(r["rm"], ref.running_mean, **tol)
        torch.testing.assert_close(r["rv"], ref.running_var, **tol)

    assert [r["sum"] for r in res] == [3.0, 3.0]
    assert [r["mean"] for r in res] == [1.5, 1.5]
    assert [r["max"] for r in res] == [2.0, 2.0]
    assert res[1]["metrics"] == {"a": 0.5, "b": 1.0}
    assert res[1]["obj"] == {"from": 0}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    result: Dict[str, Any] = {}
    try:
        _setup_env(rank, world, port)
        D.init_distributed(device="cpu", timeout_s=60)
        for name, accum in (("accum1", 1), ("accum2", 2)):
            torch.manual_seed(0)
            model = SegNet()

            def eval_fn(m: nn.Module) -> Dict[str, float]:
                # like deeplab.eval.evaluate: every rank takes part in an all-reduce
                total = D.all_reduce_(torch.tensor([1.0]), "sum")
                return {"mIoU": float(total.item()) / 10}

            res = train(model, seg_data(), _cfg(Path(out_dir) / name, accum_steps=accum, eval_every=2),
                        transform=flip_noise, eval_fn=eval_fn, model_config=ModelConfig(num_classes=3),
                        progress=False)
            result[name] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                            "step": res.step, "best": res.best_metric,
                            "syncbn": sum(isinstance(m, D.CPUSyncBatchNorm) for m in model.modules())}
        torch.manual_seed(0)
        model = SegNet()
        train(model, seg_data(), _cfg(Path(out_dir) / "qat", qat=True, freeze_bn=True), transform=flip_noise,
              model_config=ModelConfig(num_classes=3), progress=False)
        result["qat"] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                         "qat": load_checkpoint(Path(out_dir) / "qat" / "last.pt")["qat"]}
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, Path(out_dir) / f"ddp_rank{rank}.pt")
        D.cleanup()


def _assert_states_close(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], atol: float) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key].double(), b[key].double(), rtol=0, atol=atol, msg=key)


@pytest.mark.spawn
def test_ddp_two_ranks_equal_one_process_with_double_batch(tmp_path: Path) -> None:
    """MUST-HAVE: 2 ranks x batch 4 (SyncBN, Gloo) == 1 process x batch 8 after 3 steps.

    Same samples (global-batch sharding), same augmentation seeds (per (seed, epoch,
    index)), masks with uneven ignore regions (global valid-pixel normalisation), and
    with accum_steps=2 on both sides (micro-batches line up through SyncBN too).
    """
    port = D.find_free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"ddp_rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert "error" not in r, r.get("error")

    for name, accum in (("accum1", 1), ("accum2", 2)):
        torch.manual_seed(0)
        model = SegNet()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        single = train(model, seg_data(), _cfg(tmp_path / f"single_{name}", accum_steps=accum),
                       transform=flip_noise, model_config=ModelConfig(num_classes=3), progress=False)
        assert single.step == ranks[0][name]["step"] == 3
        assert ranks[0][name]["syncbn"] == 2
        # DDP keeps replicas identical (BN buffers included: SyncBN statistics agree)
        _assert_states_close(ranks[0][name]["state"], ranks[1][name]["state"], atol=0)
        _assert_states_close(ranks[0][name]["state"], model.state_dict(), atol=1e-5)
        # and training really moved the weights, far more than the tolerance
        moved = (model.state_dict()["body.0.weight"] - initial["body.0.weight"]).abs().max()
        assert moved > 1e-3
        assert ranks[0][name]["best"] == pytest.approx(0.2)  # eval_fn ran on both ranks

    # --qat: every rank rounds with the range of the whole global batch (all-reduced), so the ranges
    # and the weights are those of one process with the double batch
    torch.manual_seed(0)
    model = SegNet()
    train(model, seg_data(), _cfg(tmp_path / "single_qat", qat=True, freeze_bn=True), transform=flip_noise,
          model_config=ModelConfig(num_classes=3), progress=False)
    single_qat = load_checkpoint(tmp_path / "single_qat" / "last.pt")["qat"]
    assert len(single_qat["ranges"]) == 3  # the three convs of SegNet
    for name, (lo, hi) in single_qat["ranges"].items():
        assert ranks[0]["qat"]["qat"]["ranges"][name] == pytest.approx([lo, hi], rel=1e-6, abs=1e-7)
    _assert_states_close(ranks[0]["qat"]["state"], ranks[1]["qat"]["state"], atol=0)
    _assert_states_close(ranks[0]["qat"]["state"], model.state_dict(), atol=1e-5)

    # the two accumulation settings differ (BN sees other micro-batches), so equality
    # above is not vacuous
    diff = (ranks[0]["accum1"]["state"]["body.0.weight"] - ranks[0]["accum2"]["state"]["body.0.weight"]).abs().max()
    assert diff > 1e-6
