"""The training loop: schedule, optimizer groups, loss, AMP, exact resume, logs, kills.

Stand-ins (a tiny conv net with BatchNorm and dropout, random tensors) keep this fast and
independent of the real models; the behaviour under test is the loop's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
import warnings
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deeplab._utils import ConfigError
from deeplab.config import ModelConfig, RunSettings, TrainConfig, TrainRecipe
from deeplab.losses import segmentation_loss
from deeplab.train import (
    PolyLR,
    SeededDataset,
    amp_settings,
    build_optimizer,
    build_train_loader,
    freeze_batchnorm,
    poly_lr,
    train,
)
from deeplab.train.resume import RESUME_FREE, RESUME_MUST_MATCH
from deeplab.train.sampling import DeterministicBatchSampler

from tests.conftest import ToySegData

MODEL_CONFIG = ModelConfig(num_classes=3, backbone="mobilenet_v2")
THIS_FILE = Path(__file__).resolve()

# ----------------------------------------------------------------------------- stand-ins


class DropNet(nn.Module):
    """conv-BN-ReLU-dropout-conv: BatchNorm buffers and dropout exercise the RNG/BN state."""

    def __init__(self, num_classes: int = 3, p: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout2d(p)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))))


def jitter(image: torch.Tensor, mask: torch.Tensor, *, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flip, roll and noise, all drawn from the given generator (the transform contract)."""
    if float(torch.rand(1, generator=generator)) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    shift = int(torch.randint(0, 4, (1,), generator=generator))
    image, mask = image.roll(shift, -2), mask.roll(shift, -2)
    return image + 0.1 * torch.randn(image.shape, generator=generator), mask


def make_cfg(run_dir: Path, **kw: Any) -> TrainConfig:
    base: Dict[str, Any] = dict(lr=0.05, max_steps=7, batch_size=4, num_workers=0, device="cpu",
                                run_dir=str(run_dir), eval_every=0, ckpt_every=0, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg: TrainConfig, *, model_seed: int = 0, data: Optional[ToySegData] = None, p: float = 0.3,
        **kw: Any) -> Tuple[Any, nn.Module]:
    torch.manual_seed(model_seed)
    model = DropNet(p=p)
    kw.setdefault("model_config", MODEL_CONFIG)
    result = train(model, data if data is not None else ToySegData(), cfg, transform=jitter, progress=False, **kw)
    return result, model


def assert_identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key].double() - b[key].double()).abs().max()}"


def assert_optimizer_identical(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])


# ----------------------------------------------------------------------------- pieces


def test_poly_lr_schedule_and_state_round_trip(tmp_path: Path) -> None:
    assert poly_lr(0.007, 0, 100) == 0.007
    assert poly_lr(0.007, 50, 100) == pytest.approx(0.007 * 0.5**0.9)
    assert poly_lr(0.007, 100, 100) == 0.0 and poly_lr(0.007, 150, 100) == 0.0
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01, momentum=0.9)
    sched = PolyLR(opt, max_steps=10)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([poly_lr(0.01, k, 10) for k in range(4)], rel=1e-12)
    save_checkpoint(tmp_path / "s.pt", {"model": {}, "config": {}, "scheduler": sched.state_dict()})
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
    sched2 = PolyLR(opt2, max_steps=10)
    sched2.load_state_dict(load_checkpoint(tmp_path / "s.pt")["scheduler"])
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(poly_lr(0.01, 5, 10))


def test_build_optimizer_decays_conv_and_linear_weights_only() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True),       # 0: weight decayed, bias not
        nn.BatchNorm2d(4),                   # 1: not decayed
        nn.Conv2d(4, 4, 3, groups=4, bias=False),  # 2: depthwise
        nn.GroupNorm(2, 4),                  # 3: not decayed
        nn.Flatten(),
        nn.Linear(4, 2),                     # 5: weight decayed, bias not
    )
    names = {id(p): n for n, p in model.named_parameters()}

    def groups(opt: torch.optim.Optimizer) -> Dict[str, List[str]]:
        return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}

    opt = build_optimizer(model, lr=0.1, weight_decay=1e-4)
    assert groups(opt) == {
        "decay": ["0.weight", "2.weight", "5.weight"],
        "no_decay": ["0.bias", "1.bias", "1.weight", "3.bias", "3.weight", "5.bias"],
    }
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert opt.defaults["momentum"] == 0.9
    assert groups(build_optimizer(model, lr=0.1, decay_depthwise=False))["decay"] == ["0.weight", "5.weight"]
    assert groups(build_optimizer(model, lr=0.1, decay_norm_and_bias=True))["no_decay"] == []
    freeze_batchnorm(model)
    assert "1.weight" not in groups(build_optimizer(model, lr=0.1))["no_decay"]


def test_segmentation_loss_is_mean_over_valid_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(segmentation_loss(logits, target), ref)
    valid = int((target != 255).sum())
    torch.testing.assert_close(segmentation_loss(logits, target, normalizer=valid / 2), ref * 2)
    empty = torch.full((2, 4, 4), 255)
    loss = segmentation_loss(logits, empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    # bf16 logits are scored in float32
    assert segmentation_loss(logits.detach().bfloat16(), target).dtype == torch.float32


def test_amp_settings_per_device() -> None:
    off = amp_settings("cuda", enabled=False)
    assert (off.enabled, off.dtype, off.use_scaler) == (False, None, False)
    cpu = amp_settings("cpu", enabled=True)
    assert (cpu.enabled, cpu.dtype, cpu.use_scaler) == (True, torch.bfloat16, False)
    with pytest.raises(ValueError, match="not supported on CPU"):
        amp_settings("cpu", enabled=True, dtype="fp16")
    ampere = amp_settings("cuda", enabled=True, bf16_supported=True)
    assert (ampere.dtype, ampere.use_scaler) == (torch.bfloat16, False)
    volta = amp_settings("cuda", enabled=True, bf16_supported=False)
    assert (volta.dtype, volta.use_scaler) == (torch.float16, True)
    forced = amp_settings("cuda", enabled=True, dtype="fp16", bf16_supported=True)
    assert (forced.dtype, forced.use_scaler) == (torch.float16, True)
    with pytest.raises(ValueError, match="does not support bf16"):
        amp_settings("cuda", enabled=True, dtype="bf16", bf16_supported=False)


def test_seeded_dataset_augmentation_ignores_workers_and_process_state() -> None:
    data = SeededDataset(ToySegData(), jitter, seed=5)
    a = data[(2, 7)]
    torch.manual_seed(123)  # global RNG state must not matter
    b = data[(2, 7)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(data[(3, 7)][0], a[0])  # another epoch, another augmentation
    assert not torch.equal(SeededDataset(ToySegData(), jitter, seed=6)[(2, 7)][0], a[0])

    def batches(workers: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        sampler = DeterministicBatchSampler(10, global_batch_size=4, seed=5)
        sampler.set_epoch(1)
        loader = build_train_loader(data, sampler, num_workers=workers)
        return list(loader)

    for (x0, y0), (x2, y2) in zip(batches(0), batches(2)):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)

    class SelfTransforming(ToySegData):
        """A deeplab.data-style dataset: own transform, accepts (index, sample_seed) keys."""

        transform = "set"

        def __getitem__(self, key: Any) -> Any:
            index, sample_seed = key
            return jitter(self.images[index], self.masks[index], generator=torch.Generator().manual_seed(sample_seed))

    wrapped = SeededDataset(SelfTransforming(), None, seed=5)
    expected = jitter(ToySegData().images[7], ToySegData().masks[7],
                      generator=torch.Generator().manual_seed(data.sample_seed(2, 7)))
    assert torch.equal(wrapped[(2, 7)][0], expected[0]) and torch.equal(wrapped[(2, 7)][0], a[0])


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_identical(tmp_path: Path, num_workers: int) -> None:
    """MUST-HAVE: stop at step 3 (mid-epoch), resume, finish at 7 == never stopping.

    Exercises data order (2.5 steps per epoch: resume lands inside epoch 1), per-sample
    augmentation seeds, dropout RNG, BN buffers, momentum, the poly schedule - and that
    evaluation (which here consumes the global RNG) does not perturb training.
    """
    rng_eval = lambda m: {"mIoU": float(torch.rand(1))}  # noqa: E731 - consumes global RNG on purpose
    ref_result, ref = run(make_cfg(tmp_path / "ref", num_workers=num_workers))
    assert ref_result.step == 7 and ref_result.reason == "finished"

    first, _ = run(make_cfg(tmp_path / "split", num_workers=num_workers, eval_every=2), eval_fn=rng_eval, stop_at=3)
    assert (first.step, first.reason) == (3, "stop_at")
    mid = load_checkpoint(tmp_path / "split" / "last.pt")
    assert mid["step"] == 3 and mid["data"] == {"epoch": 1, "step_in_epoch": 1, "steps_per_epoch": 2,
                                                "num_samples": 10, "world_size": 1}
    # a different initialisation proves the weights come from the checkpoint
    second, resumed = run(make_cfg(tmp_path / "split", num_workers=num_workers, eval_every=2,
                                   resume_from=str(tmp_path / "split" / "last.pt")), model_seed=1, eval_fn=rng_eval)
    assert (second.step, second.reason) == (7, "finished")
    assert_identical(resumed.state_dict(), ref.state_dict())
    assert_optimizer_identical(load_checkpoint(tmp_path / "split" / "last.pt")["optimizer"],
                               load_checkpoint(tmp_path / "ref" / "last.pt")["optimizer"])
    assert not torch.equal(mid["model"]["conv.weight"], ref.state_dict()["conv.weight"])
    lines = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [l["kind"] for l in lines if l["kind"] in ("start", "resume")] == ["start", "resume"]
    assert [l["step"] for l in lines if l["kind"] == "train"] == [1, 2, 3, 4, 5, 6, 7]


def test_resume_with_amp_bf16_on_cpu(tmp_path: Path) -> None:
    dtypes = []

    def spy(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        dtypes.append(output.dtype)

    torch.manual_seed(0)
    model = DropNet()
    model.conv.register_forward_hook(spy)
    cfg = make_cfg(tmp_path / "amp", amp=True, max_steps=4)
    result = train(model, ToySegData(), cfg, transform=jitter, model_config=MODEL_CONFIG, progress=False, stop_at=2)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # autocast really ran in bf16
    assert math.isfinite(result.train_loss)
    assert load_checkpoint(tmp_path / "amp" / "last.pt")["scaler"] == {}  # bf16 needs no scaler
    _, resumed = run(dataclasses.replace(cfg, resume_from="auto"))
    _, ref = run(make_cfg(tmp_path / "amp_ref", amp=True, max_steps=4))
    assert_identical(resumed.state_dict(), ref.state_dict())


def test_fp16_scaler_path_state_is_saved_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA fp16 path's GradScaler logic, run on CPU (bf16 autocast + an enabled scaler)."""
    import deeplab.train.loop as T
    from deeplab.train.optim import AmpSettings

    monkeypatch.setattr(T, "amp_settings", lambda *a, **k: AmpSettings(True, torch.bfloat16, True))
    cfg = make_cfg(tmp_path / "fp16", amp=True, max_steps=5)
    run(cfg, stop_at=2)
    scaler = load_checkpoint(tmp_path / "fp16" / "last.pt")["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 2  # two unskipped steps
    _, resumed = run(dataclasses.replace(cfg, resume_from="auto"))
    assert load_checkpoint(tmp_path / "fp16" / "last.pt")["scaler"]["_growth_tracker"] == 5
    _, ref = run(make_cfg(tmp_path / "fp16_ref", amp=True, max_steps=5))
    assert_identical(resumed.state_dict(), ref.state_dict())


def test_gradient_accumulation_matches_one_big_batch_and_freeze_bn(tmp_path: Path) -> None:
    """accum_steps=2 x 2 == 1 x 4 when BN is frozen (and BN really stays frozen)."""
    results = {}
    for accum in (1, 2):
        torch.manual_seed(0)
        model = DropNet(p=0.0)
        bn_before = {k: v.clone() for k, v in model.bn.state_dict().items()}
        modes = []

        def eval_fn(m: nn.Module) -> Dict[str, float]:
            return {"mIoU": 0.0}

        train(model, ToySegData(), make_cfg(tmp_path / f"a{accum}", accum_steps=accum, freeze_bn=True, max_steps=5,
                                            eval_every=2),
              transform=jitter, eval_fn=eval_fn, model_config=MODEL_CONFIG, progress=False)
        modes.append(model.bn.training)
        for k, v in model.bn.state_dict().items():
            assert torch.equal(v, bn_before[k]), f"frozen BN {k} changed"
        assert not model.bn.weight.requires_grad and not modes[0]
        assert model.training  # the rest of the model is back in train mode after eval
        results[accum] = model.state_dict()
    for key in results[1]:
        torch.testing.assert_close(results[1][key], results[2][key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(results[1]["conv.weight"], DropNet().conv.weight)  # it trained


# ----------------------------------------------------------------------------- logs & files


def test_metrics_checkpoints_best_and_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scalars: List[Tuple[str, float, int]] = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            assert log_dir.endswith("tb")

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def close(self) -> None:
            scalars.append(("closed", 0.0, 0))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    scores = iter([0.2, 0.5, 0.4])
    cfg = make_cfg(tmp_path, max_steps=6, eval_every=2, ckpt_every=4, log_every=3)
    result, _ = run(cfg, eval_fn=lambda m: {"mIoU": next(scores), "pixel_acc": 0.9, "iou": [0.1, 0.2]},
                    classes=["a", "b", "c"], palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]],
                    normalization={"mean": [0.5] * 3, "std": [0.25] * 3})
    assert result.best_metric == 0.5 and result.best_checkpoint == tmp_path / "best.pt"
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 4 and best["metrics"]["mIoU"] == 0.5
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 6 and last["best"] == {"metric": "mIoU", "value": 0.5, "step": 4}
    assert last["classes"] == ["a", "b", "c"] and last["palette"][2] == [2, 2, 2]
    assert last["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert last["config"] == MODEL_CONFIG.to_dict() and last["train_config"] == cfg.to_dict()

    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if l["kind"] == "train"]
    assert [l["step"] for l in train_lines] == [3, 4, 6]  # log_every=3, plus the checkpoint step 4
    for l in train_lines:
        assert {"step", "epoch", "loss", "lr", "img_per_s", "time", "elapsed"} <= set(l)
        assert math.isfinite(l["loss"]) and l["img_per_s"] > 0
    assert train_lines[0]["lr"] == pytest.approx(poly_lr(0.05, 2, 6))  # LR used by step 3
    evals = [l for l in lines if l["kind"] == "eval"]
    assert [(l["step"], l["mIoU"]) for l in evals] == [(2, 0.2), (4, 0.5), (6, 0.4)]
    assert evals[0]["iou"] == [0.1, 0.2]
    tags = {t for t, _, _ in scalars}
    assert {"train/loss", "train/lr", "train/img_per_s", "eval/mIoU", "eval/pixel_acc", "closed"} <= tags
    assert "eval/iou" not in tags  # only scalars go to TensorBoard


def test_progress_bar_shows_loss_lr_and_throughput(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    train(DropNet(), ToySegData(), make_cfg(tmp_path, max_steps=2), transform=jitter, model_config=MODEL_CONFIG)
    err = capsys.readouterr().err
    assert "train" in err and "loss=" in err and "lr=" in err and "img_s=" in err


def test_trains_and_reloads_the_real_model(tmp_path: Path) -> None:
    """Integration with deeplab.models.build_model: train 2 steps, load_model gives the same net."""
    from deeplab.checkpoint import load_model
    from deeplab.models import build_model

    config = ModelConfig(backbone="mobilenet_v2", num_classes=3, aspp_channels=8, decoder_channels=8,
                         low_level_channels=8)
    torch.manual_seed(0)
    model = build_model(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    data = ToySegData(n=4, size=33)
    result = train(model, data, make_cfg(tmp_path, max_steps=2, batch_size=2), model_config=config,
                   classes=["a", "b", "c"], progress=False)
    assert math.isfinite(result.train_loss)
    loaded, ckpt = load_model(tmp_path / "last.pt", num_classes=3)
    assert ckpt["classes"] == ["a", "b", "c"]
    model.eval()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_refuses_to_overwrite_a_run_and_auto_resumes(tmp_path: Path) -> None:
    run(make_cfg(tmp_path, max_steps=4), stop_at=2)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"last.pt already exists; refusing .*resume_from="):
        run(make_cfg(tmp_path, max_steps=4))
    assert (tmp_path / "last.pt").read_bytes() == before
    result, _ = run(make_cfg(tmp_path, max_steps=4, resume_from="auto"))
    assert result.step == 4 and load_checkpoint(tmp_path / "last.pt")["step"] == 4
    fresh, _ = run(make_cfg(tmp_path / "new", max_steps=2, resume_from="auto"))  # nothing to resume: start
    assert fresh.step == 2


def test_resume_rejects_changed_recipe_and_inference_checkpoints(tmp_path: Path) -> None:
    run(make_cfg(tmp_path, max_steps=6), stop_at=2)
    last = str(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"cannot resume .*seed=3 in the checkpoint but 4 now"):
        run(make_cfg(tmp_path, max_steps=6, seed=4, resume_from=last))
    with pytest.raises(CheckpointError, match=r"max_steps=6 in the checkpoint but 9 now"):
        run(make_cfg(tmp_path, max_steps=9, resume_from=last))
    with pytest.raises(CheckpointError, match=r"another model config \(differs in \['output_stride'\]\)"):
        run(make_cfg(tmp_path, max_steps=6, resume_from=last),
            model_config=dataclasses.replace(MODEL_CONFIG, output_stride=8))
    with pytest.warns(UserWarning, match=r"changed settings \(lr: 0.05 -> 0.1\)"):
        run(make_cfg(tmp_path, max_steps=6, lr=0.1, resume_from=last), stop_at=3)
    slim = tmp_path / "slim.pt"
    ckpt = load_checkpoint(last)
    save_checkpoint(slim, {"model": ckpt["model"], "config": ckpt["config"]})
    with pytest.raises(CheckpointError, match=r"slim.pt lacks \['step', 'optimizer'"):
        run(make_cfg(tmp_path / "other", max_steps=6, resume_from=str(slim)))


def test_train_config_is_a_recipe_and_run_settings() -> None:
    cfg = TrainConfig(lr=0.01, max_steps=7, loss="ohem", class_weights=[1, 2], run_dir="r", eval_every=3)
    recipe, settings = cfg.recipe, cfg.run
    assert isinstance(recipe, TrainRecipe) and isinstance(settings, RunSettings)
    assert (recipe.lr, recipe.max_steps, recipe.class_weights) == (0.01, 7, (1.0, 2.0))
    assert (settings.run_dir, settings.eval_every) == ("r", 3)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert names == [f.name for f in dataclasses.fields(TrainRecipe)] + [f.name for f in dataclasses.fields(RunSettings)]
    assert not {f.name for f in dataclasses.fields(TrainRecipe)} & {f.name for f in dataclasses.fields(RunSettings)}
    assert TrainConfig.compose(recipe, settings) == cfg
    assert TrainConfig.compose(recipe) == dataclasses.replace(cfg, run_dir="runs/deeplab", eval_every=2000)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # checkpoints keep the flat form
    assert set(RESUME_FREE) == {f.name for f in dataclasses.fields(RunSettings)}
    assert not set(RESUME_MUST_MATCH) & set(RESUME_FREE)
    with pytest.raises(ConfigError, match=r"invalid TrainConfig: lr must be > 0, got -1; log_every must be >= 1"):
        TrainConfig(lr=-1, log_every=0)
    with pytest.raises(ConfigError, match=r"invalid RunSettings: num_workers must be >= 0"):
        RunSettings(num_workers=-1)
    with pytest.raises(ConfigError, match=r"invalid TrainRecipe: batch_size=6 \(global\) must be divisible"):
        TrainRecipe(batch_size=6, accum_steps=4)


def test_resume_may_change_run_settings_exactly(tmp_path: Path) -> None:
    """Every RunSettings field may change on resume without a warning, and the weights stay exact."""
    _, whole = run(make_cfg(tmp_path / "whole", max_steps=4))
    run(make_cfg(tmp_path / "split", max_steps=4), stop_at=2)
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "split" / "last.pt").rename(moved / "start.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, resumed = run(make_cfg(moved, max_steps=4, resume_from=str(moved / "start.pt"), eval_every=1,
                                  ckpt_every=3, log_every=2, dist_timeout=30.0))
    assert_identical(whole.state_dict(), resumed.state_dict())


def test_bad_labels_and_nan_loss_fail_clearly_without_losing_work(tmp_path: Path) -> None:
    data = ToySegData()
    data.masks[:, 0, 0] = 7
    with pytest.raises(ValueError, match=r"masks contain label 7 but the model predicts 3 classes"):
        run(make_cfg(tmp_path / "labels"), data=data)
    with pytest.raises(ValueError, match="3 class names given but model_config.num_classes=21"):
        run(make_cfg(tmp_path / "meta"), model_config=ModelConfig(num_classes=21), classes=["a", "b", "c"])

    cfg = make_cfg(tmp_path / "nan", max_steps=8, ckpt_every=2)
    run(cfg, stop_at=2)
    good = (tmp_path / "nan" / "last.pt").read_bytes()
    with pytest.raises(FloatingPointError, match=r"loss became nan by step 3.*last.pt"):
        run(dataclasses.replace(cfg, resume_from="auto"), data=ToySegData(nan=True))
    assert (tmp_path / "nan" / "last.pt").read_bytes() == good


# ----------------------------------------------------------------------------- killed runs

_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo_root!r})  # the tests package: the helpers import from tests.conftest
import tests.train.test_train as helpers
from deeplab.config import TrainConfig
from deeplab.train import train
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
torch.manual_seed(0)
result = train(helpers.DropNet(), helpers.ToySegData(delay={delay}), cfg, transform=helpers.jitter,
               model_config=helpers.MODEL_CONFIG, progress=False)
print("RESULT", result.reason, result.step, flush=True)
"""


def _start_child(tmp_path: Path, cfg: TrainConfig, delay: float) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo_root=str(THIS_FILE.parents[2]), delay=delay))
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg.to_dict())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_steps(run_dir: Path) -> List[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return steps


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(_logged_steps(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"child did not reach step {step} in {timeout}s")


@pytest.mark.spawn
def test_sigkilled_run_resumes_from_last_checkpoint(tmp_path: Path, one_thread: None) -> None:
    """MUST-HAVE: SIGKILL mid-run loses at most ckpt_every steps; resuming is exact."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, max_steps=40, ckpt_every=3)  # ~5 s of margin to kill it
    proc = _start_child(tmp_path, cfg, delay=0.03)
    _wait_for_step(proc, run_dir, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    reached = max(_logged_steps(run_dir))
    ckpt = load_checkpoint(run_dir / "last.pt")  # loads: never half-written
    saved = ckpt["step"]
    assert saved % 3 == 0 and reached - 3 <= saved <= reached < 40

    result, resumed = run(dataclasses.replace(cfg, resume_from="auto"), model_seed=1)
    assert result.step == 40
    _, ref = run(make_cfg(tmp_path / "ref", max_steps=40, ckpt_every=3))
    assert_identical(resumed.state_dict(), ref.state_dict())


@pytest.mark.spawn
def test_sigterm_stops_at_a_step_boundary_after_saving(tmp_path: Path, one_thread: None) -> None:
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, max_steps=40, ckpt_every=100)  # no periodic checkpoint at all
    proc = _start_child(tmp_path, cfg, delay=0.03)
    _wait_for_step(proc, run_dir, 4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    reason, step = out.split("RESULT")[1].split()
    assert reason == "signal" and 4 <= int(step) < 40
    assert load_checkpoint(run_dir / "last.pt")["step"] == int(step) == max(_logged_steps(run_dir))
    _, resumed = run(dataclasses.replace(cfg, resume_from="auto"))
    _, ref = run(make_cfg(tmp_path / "ref", max_steps=40))
    assert_identical(resumed.state_dict(), ref.state_dict())
