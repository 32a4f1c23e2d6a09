"""int8 quantization: calibration data (folder / dataset, errors), which nodes stay float, ONNX
Runtime QDQ quantization, and the parity measure."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

import deeplab
from deeplab.deploy.export import export_onnx
from deeplab.deploy.quantize import (
    CalibrationError,
    calibration_set,
    float_node_names,
    measure_parity,
    pad_to_common,
    prepare_image,
    quantize,
    quantize_onnx,
)
from deeplab.deploy.runtime import OnnxRuntimeModel, load_exported

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def write_images(folder: Path, n: int = 4, size: tuple = (40, 56)) -> List[Path]:
    """``n`` smooth RGB images (gradients + a blob), so activations look like photos', not noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        cy, cx = rng.integers(5, h - 5), rng.integers(5, w - 5)
        blob = (((yy - cy) ** 2 + (xx - cx) ** 2) < (8 + i) ** 2) * 150
        rgb = np.stack([xx * 255 / w, yy * 255 / h, blob + 50], axis=-1).clip(0, 255).astype(np.uint8)
        path = folder / f"img_{i}.png"
        Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return deeplab.build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=3).eval()


# --------------------------------------------------------------------------- calibration data


def test_prepare_image_pads_to_os_k_plus_1_and_normalises() -> None:
    rgb = np.full((30, 50, 3), 128, dtype=np.uint8)
    x = prepare_image(rgb, NORM, output_stride=16, max_side=None)
    assert x.shape == (1, 3, 33, 65) and x.dtype == np.float32
    expected = (128 - 255 * np.float32(NORM["mean"][0])) / (255 * np.float32(NORM["std"][0]))
    assert np.allclose(x[0, 0, :30, :50], expected, atol=1e-5) and not x[0, :, 30:, :].any()
    small = prepare_image(np.zeros((100, 200, 3), np.uint8), NORM, max_side=64)
    assert small.shape == (1, 3, 33, 65)  # 32 x 64 after the resize, then OS*k+1


def test_calibration_set_from_folder_holds_out_a_quarter(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", n=4)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    calib = calibration_set(folder=tmp_path / "imgs", count=8, normalization=NORM)
    assert calib.names == ["img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    assert calib.held_out == 1 and len(calib.calibration) == 3 and len(calib.parity) == 1
    info = calib.describe()
    assert info["images"] == 3 and info["held_out"] == ["img_3.png"] and info["source"] == str(tmp_path / "imgs")
    assert all(a.shape[2] % 16 == 1 and a.shape[3] % 16 == 1 for a in calib.arrays)
    one = calibration_set(folder=tmp_path / "imgs", count=1, normalization=NORM)
    assert one.held_out == 0 and len(one.calibration) == 1 and len(one.parity) == 1  # parity then not held out


def test_calibration_set_from_a_dataset(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_images(root / "images", n=3)
    (root / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((40, 56), np.uint8)).save(root / "masks" / f"img_{i}.png")
    (root / "classes.txt").write_text("background\nthing\n")
    calib = calibration_set(dataset="folder", data_root=root, count=3, normalization=NORM)
    assert len(calib.arrays) == 3 and calib.source == f"folder:{root}" and calib.held_out == 1


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "has no image files"),
    ("file", "is a file, not a folder"),
    ("neither", "pass --calib-data DIR or --dataset"),
    ("both", "(one of them)"),
    ("held_out", "leave none to calibrate"),
    ("count", "at least 1"),
    ("corrupt", "cannot be read"),
    ("no_root", "needs --data-root"),
])
def test_calibration_errors_are_clear(tmp_path: Path, case: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.png").write_bytes(b"x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    kwargs = {
        "missing": dict(folder=tmp_path / "nope"),
        "empty": dict(folder=tmp_path / "empty"),
        "file": dict(folder=tmp_path / "file.png"),
        "neither": dict(),
        "both": dict(folder=tmp_path / "empty", dataset="folder", data_root=tmp_path),
        "held_out": dict(folder=tmp_path / "empty", count=2, held_out=2),
        "count": dict(folder=tmp_path / "empty", count=0),
        "corrupt": dict(folder=tmp_path / "bad"),
        "no_root": dict(dataset="folder"),
    }[case]
    with pytest.raises(CalibrationError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        calibration_set(normalization=NORM, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_pad_to_common() -> None:
    out = pad_to_common([np.ones((1, 3, 17, 33), np.float32), np.ones((1, 3, 33, 17), np.float32)])
    assert [a.shape for a in out] == [(1, 3, 33, 33)] * 2 and out[0][0, 0, 17:].sum() == 0


# --------------------------------------------------------------------------- quantization


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("q") / "fp32.onnx"
    return export_onnx(tiny_model(), path)


def test_float_node_names_find_the_layer_groups(fp32_file: Path) -> None:
    proto = onnx.load(str(fp32_file))
    assert float_node_names(proto, ("logits",)) == ["/classifier/Conv"]
    pool = float_node_names(proto, ("image_pool",))
    assert "/aspp/image_pool/conv/Conv" in pool and all("/image_pool/" in n for n in pool)
    resizes = float_node_names(proto, ("resize",))
    assert resizes and all(n.endswith("Resize") for n in resizes)
    depthwise = float_node_names(proto, ("depthwise",))
    assert depthwise and "/classifier/Conv" not in depthwise
    with pytest.raises(ValueError, match="choose from"):
        float_node_names(proto, ("classifier",))


def test_quantize_onnx_writes_qdq_with_float_logits(tmp_path: Path, fp32_file: Path) -> None:
    write_images(tmp_path / "imgs", n=3)
    calib = calibration_set(folder=tmp_path / "imgs", normalization=NORM, max_side=64)
    out = tmp_path / "int8.onnx"
    info = quantize_onnx(fp32_file, out, calib.calibration, method="minmax")
    assert info["format"] == "QDQ" and info["per_channel"] and "/classifier/Conv" in info["float_nodes"]
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    producers = {o: n for n in proto.graph.node for o in n.output}
    classifier = next(n for n in proto.graph.node if n.name == "/classifier/Conv")
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in classifier.input[1:])
    # weights stored as int8: the file shrinks to about a quarter
    assert out.stat().st_size < 0.45 * fp32_file.stat().st_size
    assert not any(p.name.endswith("augmented_model.onnx") for p in tmp_path.iterdir())  # no stray calibrator files


def test_quantize_rejects_unknown_method(tmp_path: Path, fp32_file: Path) -> None:
    with pytest.raises(ValueError, match="choose from"):
        quantize(fp32_file, tmp_path / "x.onnx", [np.zeros((1, 3, 33, 33), np.float32)], method="kl")


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_accept_images_of_different_sizes(tmp_path: Path, fp32_file: Path, method: str) -> None:
    g = torch.Generator().manual_seed(0)
    arrays = [torch.randn(1, 3, 33, 49, generator=g).numpy(), torch.randn(1, 3, 49, 33, generator=g).numpy()]
    quantize_onnx(fp32_file, tmp_path / f"{method}.onnx", arrays, method=method)
    runner = OnnxRuntimeModel(tmp_path / f"{method}.onnx", metadata={"precision": "int8"})
    assert runner(torch.from_numpy(arrays[0])).shape == (1, 3, 33, 49)


def test_measure_parity_of_identical_and_of_different_models() -> None:
    model = tiny_model()
    x = [torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0)).numpy()]
    same = measure_parity(model, model, x)
    assert same["pixel_agreement"] == 1.0 and same["max_logit_diff"] == 0.0 and same["images"] == 1
    other = measure_parity(model, lambda t: -model(t), x)
    assert other["pixel_agreement"] < 0.9 and other["max_logit_diff"] > 0


def test_int8_loads_in_onnxruntime_and_openvino(tmp_path: Path, fp32_file: Path) -> None:
    pytest.importorskip("openvino")
    write_images(tmp_path / "imgs", n=3)
    calib = calibration_set(folder=tmp_path / "imgs", normalization=NORM, max_side=64)
    out = tmp_path / "int8.onnx"
    quantize_onnx(fp32_file, out, calib.calibration, method="minmax")
    from deeplab.deploy.export import write_onnx_metadata
    from deeplab.deploy.format import read_metadata

    write_onnx_metadata(out, {**read_metadata(fp32_file), "precision": "int8"})
    x = torch.from_numpy(calib.arrays[0])
    ort_out = load_exported(out, backend="onnxruntime")(x)
    ov_out = load_exported(out, backend="openvino")(x)
    assert ort_out.shape == ov_out.shape == (1, 3, *x.shape[2:])
    # Both run the same int8 graph; rounding of requantization differs between their kernels
    # by at most a few quantization steps, far below the logits' spread.
    spread = ort_out.abs().max().item()
    assert (ort_out - ov_out).abs().max().item() <= 0.25 * spread
