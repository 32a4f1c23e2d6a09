"""Checkpoints: weights_only round trips, atomic writes, errors for people, load_model."""

from __future__ import annotations

import dataclasses
import random
import signal
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch
from torch import nn

import deeplab.models
from deeplab import checkpoint as C
from deeplab.config import ModelConfig, TrainConfig
from deeplab.train import PolyLR, build_optimizer


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


def _full_payload(num_classes: int = 3) -> Dict[str, Any]:
    """A payload with every key training writes, with real optimizer/scheduler state."""
    torch.manual_seed(0)
    model = TinyNet(num_classes)
    opt = build_optimizer(model, lr=0.1)
    sched = PolyLR(opt, max_steps=10)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # an enabled scaler has real state
    return {
        "model": model.state_dict(),
        "config": ModelConfig(num_classes=num_classes, backbone="mobilenet_v2").to_dict(),
        "classes": [f"c{i}" for i in range(num_classes)],
        "palette": [[i, i, i] for i in range(num_classes)],
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "step": 1,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": C.capture_rng_state(),
        "train_config": TrainConfig().to_dict(),
        "metrics": C.to_plain({"mIoU": np.float64(0.5), "iou": np.array([0.1, 0.9])}),
    }


# ----------------------------------------------------------------------------- round trip


def test_full_payload_round_trips_with_weights_only(tmp_path: Path) -> None:
    payload = _full_payload()
    path = C.save_checkpoint(tmp_path / "sub" / "last.pt", payload)
    assert path == tmp_path / "sub" / "last.pt"
    raw = torch.load(path, weights_only=True)  # the promise: plain torch.load works
    assert raw["format"] == C.CHECKPOINT_FORMAT and raw["version"] == C.CHECKPOINT_VERSION
    ckpt = C.load_checkpoint(path, required_keys=C.RESUME_KEYS)
    for key, value in payload["model"].items():
        assert torch.equal(ckpt["model"][key], value)
    assert ckpt["scheduler"]["last_epoch"] == 1 and ckpt["scaler"]["scale"] == payload["scaler"]["scale"]
    assert ckpt["metrics"] == {"mIoU": 0.5, "iou": [0.1, 0.9]}
    assert ckpt["optimizer"]["param_groups"][0]["name"] == "decay"
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left


def test_rng_state_round_trip_restores_all_generators(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = C.capture_rng_state()
    C.save_checkpoint(tmp_path / "r.pt", {"model": {}, "config": {}, "rng": state})
    expected = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    C.restore_rng_state(C.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_unsafe_payload_is_refused_before_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    C.save_checkpoint(path, {"model": {}, "config": {}, "step": 1})
    for bad, where in (
        ({"metrics": {"mIoU": np.float64(0.3)}}, "payload['metrics']['mIoU']"),
        ({"train_config": TrainConfig()}, "payload['train_config']"),
        ({"extra": [1, lambda: 0]}, "payload['extra'][1]"),
    ):
        with pytest.raises(TypeError, match=r"would not load with torch.load\(weights_only=True\)") as info:
            C.save_checkpoint(path, {"model": {}, "config": {}, **bad})
        assert where in str(info.value)
    assert C.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ----------------------------------------------------------------------------- atomicity


def test_failed_write_keeps_previous_file_and_cleans_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    C.save_checkpoint(path, {"model": {}, "config": {}, "step": 1})

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(C.CheckpointError, match=r"could not write checkpoint .*last.pt.*untouched"):
        C.save_checkpoint(path, {"model": {}, "config": {}, "step": 2})
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.spawn
def test_sigkill_during_write_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    """A process killed half-way through torch.save leaves the old file loadable."""
    path = tmp_path / "last.pt"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, torch
        from deeplab.checkpoint import save_checkpoint
        path = {str(path)!r}
        save_checkpoint(path, {{"model": {{"w": torch.ones(1000)}}, "config": {{}}, "step": 1}})
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            f.flush()
            size = f.tell()
            f.truncate(size // 2)          # half the bytes are on disk ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... when the job dies
        torch.save = dying_save
        save_checkpoint(path, {{"model": {{"w": torch.zeros(1000)}}, "config": {{}}, "step": 2}})
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = C.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(1000))
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].name.startswith(".last.pt.")
    # the half-written temp is not a checkpoint ...
    with pytest.raises(C.CheckpointError, match="truncated, corrupt"):
        C.load_checkpoint(stale[0])
    # ... and the next save of the same file removes it
    C.save_checkpoint(path, {"model": {}, "config": {}, "step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "writer.py"]


# ----------------------------------------------------------------------------- errors


def test_missing_file_error_names_file_and_lists_siblings(tmp_path: Path) -> None:
    C.save_checkpoint(tmp_path / "best.pt", {"model": {}, "config": {}})
    with pytest.raises(C.CheckpointNotFoundError, match=r"checkpoint not found: .*lats.pt \(.* has: best.pt\)"):
        C.load_checkpoint(tmp_path / "lats.pt")
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        C.load_checkpoint(tmp_path / "nope" / "x.pt")
    with pytest.raises(C.CheckpointError, match="is a directory; pass the .pt file"):
        C.load_checkpoint(tmp_path)


def test_corrupt_truncated_and_foreign_files(tmp_path: Path) -> None:
    good = C.save_checkpoint(tmp_path / "good.pt", _full_payload())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty):
        with pytest.raises(C.CheckpointError, match=r"cannot read checkpoint .*: it is truncated, corrupt") as info:
            C.load_checkpoint(bad)
        assert bad.name in str(info.value)

    bare = tmp_path / "bare.pt"
    torch.save(TinyNet().state_dict(), bare)
    with pytest.raises(C.CheckpointError, match=r"bare.pt is a bare state_dict.*save_checkpoint"):
        C.load_checkpoint(bare)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "net": {}}, other)
    with pytest.raises(C.CheckpointError, match=r"not a deeplab checkpoint .*\['epoch', 'net'\]"):
        C.load_checkpoint(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": C.CHECKPOINT_FORMAT, "version": 1, "model": TinyNet(), "config": {}}, pickled)
    with pytest.raises(C.CheckpointError, match=r"refusing to load .*pickled.pt: it contains Python objects"):
        C.load_checkpoint(pickled)
    newer = tmp_path / "newer.pt"
    torch.save({"format": C.CHECKPOINT_FORMAT, "version": 99, "model": {}, "config": {}}, newer)
    with pytest.raises(C.CheckpointError, match="version 99, newer .* upgrade deeplab"):
        C.load_checkpoint(newer)


def test_missing_keys_error_says_what_to_do(tmp_path: Path) -> None:
    path = C.save_checkpoint(tmp_path / "best.pt", {"model": {}, "config": {}})
    with pytest.raises(C.CheckpointError, match=r"best.pt lacks \['step', 'optimizer'.*resume from RUN_DIR/last.pt"):
        C.load_checkpoint(path, required_keys=C.RESUME_KEYS)
    headless = C.save_checkpoint(tmp_path / "h.pt", {"model": {}})
    with pytest.raises(C.CheckpointError, match=r"h.pt lacks \['config'\]"):
        C.load_checkpoint(headless)


# ----------------------------------------------------------------------------- load_model


@pytest.fixture
def fake_build_model(monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    calls: Dict[str, Any] = {}

    # load_model builds through the one builder, build_model_from_config(config, **kwargs);
    # record the config's fields and the keywords as one dict.
    def build_model_from_config(config: ModelConfig, **kwargs: Any) -> nn.Module:
        calls.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, **kwargs)
        return TinyNet(calls["num_classes"])

    monkeypatch.setattr(deeplab.models, "build_model_from_config", build_model_from_config)
    return calls


def test_load_model_rebuilds_and_loads_strictly(tmp_path: Path, fake_build_model: Dict[str, Any]) -> None:
    payload = _full_payload()
    # written from a DDP-wrapped model: keys carry "module."
    payload["model"] = OrderedDict(("module." + k, v) for k, v in payload["model"].items())
    path = C.save_checkpoint(tmp_path / "m.pt", payload)
    model, ckpt = C.load_model(path, num_classes=3, backbone="mobilenet_v2", output_stride=8)
    assert fake_build_model["num_classes"] == 3 and fake_build_model["pretrained_backbone"] is None
    assert fake_build_model["output_stride"] == 8  # override for OS-8 evaluation
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, payload["model"]["module." + key])
    assert ckpt["classes"] == ["c0", "c1", "c2"]


def test_load_model_mismatch_errors(tmp_path: Path, fake_build_model: Dict[str, Any]) -> None:
    path = C.save_checkpoint(tmp_path / "m.pt", _full_payload())
    with pytest.raises(C.CheckpointError, match=r"m.pt is a deeplabv3plus / mobilenet_v2 model for 3 classes, but num_classes=21"):
        C.load_model(path, num_classes=21)
    with pytest.raises(C.CheckpointError, match=r"but arch='deeplabv3' was asked"):
        C.load_model(path, arch="deeplabv3")
    broken = _full_payload()
    del broken["model"]["head.bias"]
    broken_path = C.save_checkpoint(tmp_path / "broken.pt", broken)
    with pytest.raises(C.CheckpointError, match=r"weights in .*broken.pt do not fit .*head.bias"):
        C.load_model(broken_path)
    for empty in ({}, None):
        no_config = _full_payload()
        no_config["config"] = empty
        with pytest.raises(C.CheckpointError, match=r"has no model config .*cannot rebuild"):
            C.load_model(C.save_checkpoint(tmp_path / "nc.pt", no_config))
    headless = _full_payload()
    headless["config"] = {"num_classes": 3, "bogus": 1}
    with pytest.raises(C.CheckpointError, match=r"unusable model config.*bogus"):
        C.load_model(C.save_checkpoint(tmp_path / "h.pt", headless))


def test_load_model_with_the_real_builder(tmp_path: Path) -> None:
    """Integration with deeplab.models.build_model: a checkpoint rebuilds its own model."""
    config = ModelConfig(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=4,
                         aspp_channels=8, decoder_channels=8, low_level_channels=8)
    torch.manual_seed(0)
    from deeplab.models import build_model

    model = build_model(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    path = C.save_checkpoint(tmp_path / "real.pt", {"model": model.state_dict(), "config": config.to_dict()})
    loaded, _ = C.load_model(path, num_classes=4)
    assert type(loaded) is type(model)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_strip_prefixes_only_when_all_keys_have_them() -> None:
    sd = OrderedDict([("module._orig_mod.a", 1), ("module._orig_mod.b", 2)])
    assert list(C.strip_state_dict_prefixes(sd)) == ["a", "b"]
    mixed = OrderedDict([("module.a", 1), ("b", 2)])
    assert list(C.strip_state_dict_prefixes(mixed)) == ["module.a", "b"]
