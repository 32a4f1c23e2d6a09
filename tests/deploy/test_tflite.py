"""LiteRT (TFLite): the file contract, the ``tflite`` runtime backend and ``deeplab export --format tflite``.

Three kinds of tests:

* quick ones (default run): the image-pooling form the converter needs gives the same values,
  and the runtime's int8 (de)quantization;
* ``slow`` ones in the main environment: a LiteRT file written by TensorFlow's own converter
  (the test extra has TensorFlow, not litert-torch) carries our metadata and runs through the
  ``tflite`` backend, padded to its one input size;
* ``tflite`` ones: the real conversion with litert-torch, which needs an environment of its own
  (.ci/run builds one; ``pip install -e '.[tflite]' pytest`` then ``python -m pytest -m tflite``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from deeplab._utils import DeeplabError
from deeplab.cli import main as cli
from deeplab.deploy.format import ExportError, is_onnx, read_metadata, sniff_format
from deeplab.deploy.runtime import _dequantized, _quantized
from deeplab.models.aspp import ImagePooling

from tests.data_fixtures import make_voc
from tests.helpers import NORM, small_model

# --------------------------------------------------------------------------- quick


def test_image_pooling_multiply_form_gives_the_same_values() -> None:
    model = small_model(num_classes=5)
    x = torch.randn(2, 3, 65, 97, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expanded = model(x)
        for module in model.modules():
            if isinstance(module, ImagePooling):
                module.broadcast_by_multiply = True
        multiplied = model(x)
    assert torch.equal(expanded, multiplied)  # y * 1 is y exactly


def test_int8_tensor_io_round_trip() -> None:
    detail = {"dtype": np.int8, "quantization": (0.05, -3)}
    x = np.linspace(-8.0, 8.0, 321, dtype=np.float32).reshape(1, 1, 1, -1)
    q = _quantized(x, detail)
    assert q.dtype == np.int8 and q.min() == -128 and q.max() == 127  # saturates at the int8 range
    back = _dequantized(q, detail)
    inside = (x >= (-128 + 3) * 0.05) & (x <= (127 + 3) * 0.05)
    assert np.abs(back - x)[inside].max() <= 0.05 / 2 + 1e-6  # half a step
    float_detail = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert _quantized(x, float_detail) is x and _dequantized(x, float_detail).dtype == np.float32


# --------------------------------------------------------------------------- a LiteRT file from TensorFlow

H, W, K = 17, 23, 4


def tf_litert_file(path: Path, weights: np.ndarray, bias: np.ndarray) -> Path:
    """A LiteRT file of a 1x1 conv, NCHW in and out like ours, written by TensorFlow's converter,
    with deeplab metadata for a 4-class model."""
    tf = pytest.importorskip("tensorflow")
    from deeplab.deploy.tflite import add_metadata

    kernel = weights.T[None, None].astype(np.float32)  # (1, 1, 3, K)

    @tf.function(input_signature=[tf.TensorSpec([1, 3, H, W], tf.float32)])
    def logits(x: Any) -> Any:
        y = tf.nn.conv2d(tf.transpose(x, [0, 2, 3, 1]), kernel, 1, "SAME") + bias.astype(np.float32)
        return tf.transpose(y, [0, 3, 1, 2])

    data = tf.lite.TFLiteConverter.from_concrete_functions([logits.get_concrete_function()], logits).convert()
    meta = {"format": "deeplab-export", "version": 1, "num_classes": K, "classes": [f"c{i}" for i in range(K)],
            "palette": [[i, i, i] for i in range(K)], "normalization": dict(NORM), "output_stride": 16,
            "align_corners": False, "config": None, "precision": "fp32", "input_size": [H, W]}
    path.write_bytes(add_metadata(bytes(data), meta))
    return path


@pytest.fixture(scope="module")
def conv_file(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    pytest.importorskip("ai_edge_litert")
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(size=(K, 3)), rng.normal(size=K)
    path = tf_litert_file(tmp_path_factory.mktemp("litert") / "conv.tflite", weights, bias)
    return {"path": path, "weights": weights, "bias": bias}


def conv_reference(x: torch.Tensor, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.einsum("kc,bchw->bkhw", weights, x.double().numpy()) + bias[None, :, None, None]


@pytest.mark.slow
def test_litert_file_carries_metadata_and_runs_through_the_tflite_backend(conv_file: Dict[str, Any]) -> None:
    from deeplab.deploy.runtime import TFLiteModel, auto_backend, load_exported
    from deeplab.deploy.tflite import add_metadata

    path = conv_file["path"]
    assert sniff_format(path) == "tflite" and not is_onnx(path)
    renamed = path.with_suffix(".bin")  # told apart by content too (the TFL3 identifier)
    renamed.write_bytes(path.read_bytes())
    assert sniff_format(renamed) == "tflite"
    meta = read_metadata(path)
    assert meta["num_classes"] == K and meta["input_size"] == [H, W] and meta["classes"][1] == "c1"
    assert auto_backend(path, "fp32") == "tflite"
    runner = load_exported(path)
    assert isinstance(runner, TFLiteModel) and runner.input_size == (H, W) and runner.num_classes == K
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    got = runner(x).double().numpy()
    want = conv_reference(x, conv_file["weights"], conv_file["bias"])
    # three float32 products and a bias per output, all O(1): float32 rounding is below 1e-5
    assert got.shape == (2, K, H, W) and np.abs(got - want).max() < 1e-5
    with pytest.raises(ValueError, match=f"takes {H}x{W} inputs"):
        runner(torch.zeros(1, 3, H - 1, W))
    # the metadata entry is replaced, not duplicated, and the file still runs
    again = path.parent / "again.tflite"
    again.write_bytes(add_metadata(path.read_bytes(), {**meta, "classes": ["a", "b", "c", "d"]}))
    assert read_metadata(again)["classes"] == ["a", "b", "c", "d"]
    assert np.abs(load_exported(again)(x).double().numpy() - want).max() < 1e-5
    with pytest.raises(ExportError, match="run with backend 'tflite'"):
        load_exported(path, backend="onnxruntime")


@pytest.mark.slow
def test_open_model_pads_to_the_one_input_size(conv_file: Dict[str, Any]) -> None:
    from deeplab.deploy.open import open_model

    runner, card = open_model(conv_file["path"])
    assert card.kind == "tflite" and card.backend == "tflite" and card.exported["input_size"] == [H, W]
    x = torch.randn(1, 3, 10, 11, generator=torch.Generator().manual_seed(2))
    got = runner(x).double().numpy()
    padded = torch.nn.functional.pad(x, (0, W - 11, 0, H - 10))
    want = conv_reference(padded, conv_file["weights"], conv_file["bias"])[..., :10, :11]
    assert got.shape == (1, K, 10, 11) and np.abs(got - want).max() < 1e-5
    with pytest.raises(DeeplabError, match="--input-size H W") as raised:
        runner(torch.zeros(1, 3, H + 1, W))
    assert isinstance(raised.value, ValueError)  # a per-image error: predict goes on with the other images


@pytest.mark.slow
def test_predict_skips_an_image_too_large_for_the_graph_and_does_the_rest(conv_file: Dict[str, Any], tmp_path: Path,
                                                                          capsys) -> None:
    from PIL import Image

    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 255, (H + 8, W, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    # whole-image inference pads to OS*k+1 (OS 16): 13 x 17 stays 17 x 17, inside the 17 x 23 graph
    Image.fromarray(rng.integers(0, 255, (H - 4, 17, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    out = tmp_path / "pred"
    code = cli.main(["predict", "--checkpoint", str(conv_file["path"]), str(tmp_path / "big.png"),
                     str(tmp_path / "small.png"), "--out", str(out), "--no-progress"])
    assert code == 1 and (out / "small.png").is_file() and not (out / "big.png").exists()
    captured = capsys.readouterr()
    assert f"--mode slide --crop-size {min(H, W)}" in captured.err and "done: 1, failed: 1" in captured.out


# --------------------------------------------------------------------------- real conversion (litert-torch)

SIZE = 65  # OS 16 * 4 + 1


def voc_checkpoint(path: Path) -> Path:
    """A 21-class checkpoint (random weights, non-trivial BN) for the VOC-layout test data."""
    from deeplab.checkpoint import save_checkpoint
    from deeplab.data.palettes import VOC_CLASSES

    model = small_model(num_classes=21)
    return save_checkpoint(path, {"model": model.state_dict(), "config": model.config.to_dict(),
                                  "classes": list(VOC_CLASSES), "normalization": dict(NORM)})


def run_eval(model_file: Path, data: Path, out: Path, extra: List[str]) -> Dict[str, Any]:
    argv = ["eval", "--checkpoint", str(model_file), "--data-root", str(data), "--num-workers", "0",
            "--no-progress", "--device", "cpu", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.tflite
def test_export_tflite_fp32_matches_pytorch_and_evaluates_like_the_checkpoint(tmp_path: Path, capsys) -> None:
    pytest.importorskip("litert_torch")
    ckpt = voc_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "model.tflite"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--input-size", str(SIZE), str(SIZE),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"(1, 3, {SIZE}, {SIZE})" in printed and "parity OK" in printed
    meta = read_metadata(out)
    assert meta["precision"] == "fp32" and meta["input_size"] == [SIZE, SIZE] and meta["classes"][15] == "person"
    # logits against PyTorch, each image of a batch of 2 (BN folded: float32 reassociation only)
    from deeplab.checkpoint import load_model
    from deeplab.deploy.runtime import load_exported

    model, _ = load_model(ckpt)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).double()
    got = load_exported(out)(x).double()
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    # deeplab eval of the file = the checkpoint evaluated at the same padding
    data = make_voc(tmp_path / "voc", {"val": ["v0", "v1", "v2"]}, labels=(0, 1, 15, 255))
    ref = run_eval(ckpt, data, tmp_path / "pt", ["--pad-to", str(SIZE), str(SIZE)])
    lite = run_eval(out, data, tmp_path / "lite", [])
    # a pixel whose two best logits are closer than the ~1e-5 logit error may flip: allow 1 % of them
    ma, mb = np.array(ref["confusion_matrix"]), np.array(lite["confusion_matrix"])
    assert ma.sum() == mb.sum() and np.abs(ma - mb).sum() / 2 <= 0.01 * ma.sum()
    assert abs(ref["metrics"]["mIoU"] - lite["metrics"]["mIoU"]) <= 0.01
    assert lite["config"]["backend"] == "tflite" and lite["config"]["input_size"] == [SIZE, SIZE]


@pytest.mark.tflite
def test_export_tflite_int8_measures_and_stores_its_parity_and_auto_follows_the_gate(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("litert_torch")
    from deeplab import cpu
    from deeplab.deploy.open import open_model
    from deeplab.deploy.precision import PrecisionError, parity_within_bound
    from deeplab.deploy.tflite import add_metadata

    ckpt = voc_checkpoint(tmp_path / "model.pt")
    data = make_voc(tmp_path / "voc", {"val": [f"v{i}" for i in range(5)]}, labels=(0, 1, 15, 255))
    out = tmp_path / "model.int8.tflite"
    code = cli.main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--precision", "int8",
                     "--input-size", str(SIZE), str(SIZE), "--dataset", "voc", "--data-root", str(data),
                     "--split", "val", "--out", str(out)])
    meta = read_metadata(out)
    parity = meta["parity"]
    assert meta["precision"] == "int8" and meta["quantization"]["scheme"] == "s8s8"
    assert parity["backend"] == "tflite" and parity["images"] >= 1 and 0 <= parity["pseudo_miou"] <= 100
    assert code == (0 if parity_within_bound(parity, "int8") else 1)  # the gate decides the exit status
    amx = dict.fromkeys(cpu.CPU_FLAGS, True)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: amx)
    # in bound on a CPU that accelerates int8: auto runs it; out of bound: auto refuses it
    good = tmp_path / "good.tflite"
    good.write_bytes(add_metadata(out.read_bytes(), {**meta, "parity": {**parity, "miou_delta": 0.2,
                                                                         "true_miou_delta": 0.1}}))
    runner, card = open_model(good, precision="auto")
    assert card.precision == "int8"
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(add_metadata(out.read_bytes(), {**meta, "parity": {**parity, "miou_delta": 7.0,
                                                                       "true_miou_delta": 5.0}}))
    with pytest.raises(PrecisionError, match="out of bound"):
        open_model(bad, precision="auto")


def test_export_tflite_without_the_converter_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys) -> None:
    import deeplab.deploy.tflite as tflite

    monkeypatch.setattr(tflite, "optional_import", lambda name: None)
    ckpt = voc_checkpoint(tmp_path / "model.pt")
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.tflite")]) == 2
    err = capsys.readouterr().err
    assert "litert-torch" in err and "deeplab[tflite]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.tflite").exists()
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--input-size", "65", "65",
                     "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--input-size applies to --format tflite" in capsys.readouterr().err


@pytest.mark.tflite
def test_bench_times_the_litert_paths_against_their_own_limits() -> None:
    pytest.importorskip("litert_torch")
    from deeplab.deploy import bench

    assert "tflite" in bench.PATHS and "tflite" not in bench.DEFAULT_PATHS  # asked for by name only
    report = bench.run_bench(backbones=["mobilenet_v2"], size=SIZE, paths=["tflite", "tflite_int8"], warmup=1,
                             repeat=2, gemm_size=64, log=lambda s: None)
    rows = {r["path"]: r for r in report["results"]}
    assert set(rows) == {"tflite", "tflite_int8"}
    for path, precision in (("tflite", "fp32"), ("tflite_int8", "int8")):
        row = rows[path]
        assert "error" not in row and row["precision"] == precision and row["median_s"] > 0
        # never above the limit of its own precision (or the limit is reported as underestimated)
        assert row["fraction_of_limit"] is None or 0 < row["fraction_of_limit"] <= 1
    json.dumps(report)
