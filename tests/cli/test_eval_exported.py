"""`deeplab eval` of exported models (ONNX Runtime, OpenVINO IR, TorchScript) equals the
checkpoint's evaluation on the same data, with the same inference options applied around the
runtime; the report says which file, backend and precision were measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from torch import nn

import deeplab
from deeplab._utils import DeeplabError
from deeplab.checkpoint import save_checkpoint
from deeplab.cli import main as cli
from deeplab.deploy.open import FixedInputModel
from deeplab.data.palettes import VOC_CLASSES
from deeplab.deploy.export import export_onnx, export_torchscript, model_metadata

from tests.data_fixtures import make_voc

try:
    import openvino as ov

    HAVE_OPENVINO = True
except ImportError:  # optional extra
    HAVE_OPENVINO = False

NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# Logit parity of an export is ~1e-4 (BN folded, other kernels); a pixel whose two best logits
# are closer than that may flip its argmax. On these 3 x 20 x 30 = 1800 pixels we allow 1% of
# the pixels to move between confusion cells (measured: 0 on AVX-512), and mIoU within 0.01.
MAX_MOVED = 0.01
MIOU_TOL = 0.01


def voc_model() -> nn.Module:
    torch.manual_seed(0)
    model = deeplab.build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=21)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BN statistics, so that folding changes the weights
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
    return model.eval()


class Files(dict):
    """The data, the checkpoint and, made on first use, its exported files."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.model = voc_model()
        self["voc"] = make_voc(root / "voc", {"val": ["v0", "v1", "v2"]})
        self["pt"] = save_checkpoint(root / "model.pt", {
            "model": self.model.state_dict(), "config": self.model.config.to_dict(), "classes": list(VOC_CLASSES),
            "normalization": dict(NORM), "dataset": {"dataset": "voc"},
        })
        self.reports: Dict[str, Dict[str, Any]] = {}

    def __missing__(self, kind: str) -> Path:
        meta = model_metadata(self.model, classes=list(VOC_CLASSES), normalization=NORM)
        if kind == "onnx":
            path = export_onnx(self.model, self.root / "model.onnx", metadata=meta)
        elif kind == "ts":
            path = export_torchscript(self.model, self.root / "model.ts", metadata=meta)
        else:  # OpenVINO IR, saved from the ONNX file (its rt_info keeps our metadata)
            path = self.root / "model.xml"
            ov.save_model(ov.Core().read_model(str(self["onnx"])), str(path))
        self[kind] = path
        return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("exported"))


def run_eval(files: Files, kind: str, out: Path, extra: List[str]) -> Dict[str, Any]:
    key = kind + " ".join(extra)
    if kind == "pt" and key in files.reports:
        return files.reports[key]  # the checkpoint's evaluation is the same for every backend
    argv = ["eval", "--checkpoint", str(files[kind]), "--data-root", str(files["voc"]), "--num-workers", "0",
            "--no-progress", "--device", "cpu", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    files.reports[key] = report
    return report


def assert_same_evaluation(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    ma, mb = np.array(a["confusion_matrix"]), np.array(b["confusion_matrix"])
    assert ma.sum() == mb.sum()
    moved = np.abs(ma - mb).sum() / 2
    assert moved <= MAX_MOVED * ma.sum(), f"{moved} of {ma.sum()} pixels changed class"
    assert abs(a["metrics"]["mIoU"] - b["metrics"]["mIoU"]) <= MIOU_TOL


@pytest.mark.parametrize("kind,backend", [
    ("onnx", "onnxruntime"),
    pytest.param("ts", "torchscript", marks=pytest.mark.slow),
    pytest.param("xml", "openvino", marks=[pytest.mark.slow, pytest.mark.skipif(
        not HAVE_OPENVINO, reason="openvino not installed (pip install 'deeplab[openvino]')")]),
])
def test_exported_model_evaluates_like_its_checkpoint(files: Files, tmp_path: Path, kind: str,
                                                      backend: str, capsys: pytest.CaptureFixture) -> None:
    # Multi-scale + flip + trimap: the inference options run around the runtime.
    flags = ["--scales", "0.75", "1.0", "--flip", "--trimap", "1", "3"]
    ref = run_eval(files, "pt", tmp_path / "pt", flags)
    got = run_eval(files, kind, tmp_path / kind, flags)
    assert_same_evaluation(ref, got)
    config = got["config"]
    assert config["model_file"] == str(files[kind]) and config["backend"] == backend
    assert config["precision"] == "fp32" and config["input_size"] == "dynamic"
    assert config["arch"] == "deeplabv3plus" and config["scales"] == [0.75, 1.0] and config["flip"] is True
    assert "backend" not in ref["config"]  # a checkpoint's report keeps its old keys
    assert got["metrics"]["per_class"]["person"]["gt_pixels"] == ref["metrics"]["per_class"]["person"]["gt_pixels"]
    assert [r["pixels"] for r in got["trimap"]["widths"]] == [r["pixels"] for r in ref["trimap"]["widths"]]
    assert f"measured: {files[kind]}" in capsys.readouterr().out


def test_exported_model_flag_errors(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "--data-root", str(files["voc"]), "--num-workers", "0", "--no-progress", "--out", str(tmp_path)]
    assert cli.main([*base, "--checkpoint", str(files["onnx"]), "--output-stride", "8"]) == 2
    assert "drop --output-stride" in capsys.readouterr().err
    assert cli.main([*base, "--checkpoint", str(files["onnx"]), "--backend", "torchscript"]) == 2
    assert "ONNX file" in capsys.readouterr().err
    assert cli.main([*base, "--checkpoint", str(files["pt"]), "--backend", "onnxruntime"]) == 2
    assert "--backend is for exported files" in capsys.readouterr().err


class Runner(nn.Module):
    """Stands in for an ExportedModel whose graph accepts 8 x 12 inputs only."""

    output_stride, align_corners, num_classes = 4, False, 2
    path = Path("fixed.onnx")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[-2:]) == (8, 12)
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)


def test_fixed_input_size_graphs_are_padded_and_cropped() -> None:
    fixed = FixedInputModel(Runner(), (8, 12))  # type: ignore[arg-type]
    x = torch.randn(1, 3, 5, 9)
    logits = fixed(x)
    assert logits.shape == (1, 2, 5, 9) and torch.equal(logits[:, 0], x[:, 0])
    with pytest.raises(DeeplabError, match="--mode slide --crop-size 8 "):
        fixed(torch.randn(1, 3, 9, 9))


def test_a_fixed_size_onnx_file_opens_padded_everywhere(tmp_path: Path) -> None:
    """An ONNX file whose input has one size (as static-shape tools write them) opens wrapped by default:
    smaller images run padded (= the checkpoint at --pad-to that size), larger ones are refused with
    the way out, and ``fixed_input=False`` hands over the raw runtime."""
    import onnx

    from deeplab import InferenceConfig, Segmenter
    from deeplab.deploy.open import open_model
    from deeplab.deploy.runtime import InputSizeError

    model = voc_model()
    path = export_onnx(model, tmp_path / "dyn.onnx", metadata=model_metadata(model, classes=VOC_CLASSES,
                                                                             normalization=NORM))
    proto = onnx.load(str(path))
    for value, channels in ((proto.graph.input[0], 3), (proto.graph.output[0], 21)):
        for dim, size in zip(value.type.tensor_type.shape.dim, (1, channels, 49, 65)):
            dim.Clear()
            dim.dim_value = size
    fixed_path = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed_path))
    runner, card = open_model(fixed_path)
    assert isinstance(runner, FixedInputModel) and runner.size == (49, 65)
    assert card.exported is not None and card.exported["input_size"] == [49, 65]
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    padded = Segmenter.from_checkpoint(_checkpoint(tmp_path, model), inference=InferenceConfig(pad_to=(49, 65)))
    labels = Segmenter.open(fixed_path).predict(image)
    agree = (labels == padded.predict(image)).mean()
    assert labels.shape == (40, 50) and agree >= 1 - MAX_MOVED
    with pytest.raises(InputSizeError, match="exported for 49x65 inputs only"):
        Segmenter.open(fixed_path).predict(np.zeros((60, 50, 3), np.uint8))
    raw, _ = open_model(fixed_path, fixed_input=False)
    assert not isinstance(raw, FixedInputModel)
    with pytest.raises(Exception, match="(?i)dimension"):  # ONNX Runtime itself takes one size only
        raw(torch.zeros(1, 3, 40, 50))


def _checkpoint(tmp_path: Path, model: nn.Module) -> Path:
    return save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": model.config.to_dict(),
                                               "classes": list(VOC_CLASSES), "normalization": NORM})
