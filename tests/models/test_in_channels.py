"""N-channel inputs: the stem inflation rule, N-channel data, a training step and ONNX export.

Inflation rule (``deeplab.models.backbones.base.inflate_stem``): RGB kernels kept, every extra
channel = mean RGB kernel * 3 / N. So an input whose extra channels are 0 after normalisation
gives exactly the RGB model's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab._utils import ConfigError
from deeplab.checkpoint import load_checkpoint, load_model
from deeplab.cli import main as cli
from deeplab.config import ModelConfig
from deeplab.data import FolderSegmentation, TrainTransform
from deeplab.models import build_backbone, build_model
from deeplab.models.backbones.base import inflate_stem


@pytest.mark.parametrize("name,stem", [("mobilenet_v2", "features.0.0"), ("resnet50", "conv1"),
                                       ("xception65", "stem.0.conv")])
def test_inflation_rule_on_every_stem(name: str, stem: str) -> None:
    torch.manual_seed(0)
    body = build_backbone(name)
    before = dict(body.named_modules())[stem].weight.detach().clone()
    new = inflate_stem(body, 5)
    assert dict(body.named_modules())[stem] is new and new.in_channels == 5
    w = new.weight.detach()
    torch.testing.assert_close(w[:, :3], before, rtol=0, atol=0)
    for extra in (3, 4):
        torch.testing.assert_close(w[:, extra], before.mean(dim=1) * 3 / 5)


def test_grey_input_deflation_keeps_activations() -> None:
    torch.manual_seed(0)
    rgb = build_backbone("resnet50").conv1
    body = build_backbone("resnet50")
    body.conv1.load_state_dict(rgb.state_dict())
    inflate_stem(body, 1)
    x = torch.randn(1, 1, 17, 17, dtype=torch.float64)
    torch.testing.assert_close(body.conv1.double()(x), rgb.double()(x.expand(1, 3, 17, 17)))


def test_four_channel_model_equals_rgb_model_when_the_extra_channel_is_zero() -> None:
    torch.manual_seed(0)
    rgb = build_model(backbone="mobilenet_v2", num_classes=3).double().eval()
    torch.manual_seed(0)
    rgbd = build_model(backbone="mobilenet_v2", num_classes=3, in_channels=4).double().eval()
    x = torch.randn(1, 3, 33, 33, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rgbd(torch.cat([x, torch.zeros_like(x[:, :1])], 1)), rgb(x), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(rgbd(torch.cat([x, torch.ones_like(x[:, :1])], 1)), rgb(x))
    assert rgbd.normalization.mean == (0.485, 0.456, 0.406, 0.5)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        rgbd(x)


def test_normalisation_needs_one_value_per_channel() -> None:
    cfg = ModelConfig(backbone="mobilenet_v2", in_channels=4, input_mean=[0.1, 0.2, 0.3, 0.4], input_std=(1, 1, 1, 2))
    assert cfg.input_mean == (0.1, 0.2, 0.3, 0.4) and cfg.input_std == (1.0, 1.0, 1.0, 2.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="input_mean must be 4"):
        ModelConfig(in_channels=4, input_mean=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="input_std"):
        ModelConfig(in_channels=3, input_std=(0.5, 0.0, 0.5))


def write_npy_folder(root: Path, n: int = 3, channels: int = 4, size: int = 24) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(root / "images" / f"s{i}.npy", rng.integers(0, 65535, (size, size + 4, channels), dtype=np.uint16))
        mask = np.zeros((size, size + 4), np.uint8)
        mask[: size // 2] = 1
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


def test_folder_reads_npy_and_transform_normalises_n_channels(tmp_path: Path) -> None:
    root = write_npy_folder(tmp_path / "ms")
    ds = FolderSegmentation(root)
    image, mask = ds[0]
    assert isinstance(image, np.ndarray) and image.shape == (24, 28, 4) and image.dtype == np.uint16
    t = TrainTransform(crop_size=16, scale_range=(1.0, 1.0), mean=(0.5,) * 4, std=(0.25,) * 4, flip=False)
    x, y = t(image, mask, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 16, 16) and y.shape == (16, 16)
    # scale 1: the crop is a window of (pixel / 65535 - 0.5) / 0.25
    ref = (image.astype(np.float64) / 65535 - 0.5) / 0.25
    found = any(np.allclose(x.numpy().transpose(1, 2, 0), ref[i:i + 16, j:j + 16], atol=1e-5)
                for i in range(9) for j in range(13))
    assert found
    t2 = TrainTransform(crop_size=16, mean=(0.5,) * 4, std=(0.25,) * 4)
    x2, _ = t2(image, mask, generator=torch.Generator().manual_seed(3))  # rescaled path
    assert x2.shape == (4, 16, 16) and torch.isfinite(x2).all()


@pytest.mark.slow
def test_four_channel_model_trains_a_step_and_exports_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from deeplab.deploy.export import export_onnx

    root = write_npy_folder(tmp_path / "rgbd")
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-root", str(root), "--train-split", "all",
                     "--val-split", "all", "--max-steps", "1", "--in-channels", "4", "--backbone", "mobilenet_v2",
                     "--pretrained-backbone", "none", "--crop-size", "17", "--batch-size", "2", "--num-workers",
                     "0", "--device", "cpu", "--no-progress", "--log-every", "1", "--out", str(run),
                     # frozen BN: one step at batch 2 on 17x17 crops would leave running stats so
                     # degenerate that export's BN folding fails its own parity check (RGB models too)
                     "--freeze-bn"]) == 0
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["in_channels"] == 4
    assert len(ckpt["normalization"]["mean"]) == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" for r in records)
    assert (run / "curves.png").is_file()  # redrawn at every eval
    model, _ = load_model(run / "last.pt")
    path = export_onnx(model, tmp_path / "m.onnx")
    x = torch.randn(1, 4, 33, 49)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_segmenter_predicts_an_n_channel_array_and_npy_file(tmp_path: Path) -> None:
    from deeplab.segmenter import Segmenter

    torch.manual_seed(0)
    model = build_model(backbone="mobilenet_v2", num_classes=2, in_channels=4).eval()
    seg = Segmenter(model, classes=["a", "b"], normalization=model.normalization.to_dict())
    arr = np.random.default_rng(0).integers(0, 255, (20, 24, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", arr)
    x = seg.preprocess(arr)
    ref = (torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None] / 255
           - torch.tensor(model.normalization.mean).view(1, 4, 1, 1)) / torch.tensor(model.normalization.std).view(1, 4, 1, 1)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    assert seg.predict(str(tmp_path / "x.npy")).shape == (20, 24)
    with pytest.raises(ValueError, match="4"):
        seg.preprocess(np.zeros((8, 8, 3), np.float32))
