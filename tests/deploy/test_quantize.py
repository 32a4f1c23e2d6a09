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
from deeplab import cpu
from deeplab.deploy.export import export_onnx
from deeplab.deploy.format import ExportError
from deeplab.deploy.quantize import (
    CalibrationError,
    CalibrationSet,
    calibration_set,
    float_node_names,
    pad_to_common,
    prepare_image,
    quantize,
    quantize_onnx,
)
from deeplab.deploy.accuracy import quantize_to_bound, within_bound
from deeplab.deploy.runtime import OnnxRuntimeModel, load_exported, measure_parity

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


AMX_FLAGS = dict.fromkeys(cpu.CPU_FLAGS, True)
AVX2_FLAGS = dict.fromkeys(cpu.CPU_FLAGS, False) | {"avx2": True}


def colour_blocks(folder: Path, n: int = 5, size: tuple = (48, 64)) -> None:
    """``n`` images of flat red / green / blue regions (a stripe and a disc): every pixel's class is
    its colour, with no ambiguous pixels for int8 rounding to flip."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = np.array([[230, 30, 40], [20, 220, 50], [40, 30, 210]], np.uint8)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        ids = np.zeros((h, w), np.int64)
        ids[:, rng.integers(10, w - 10):] = 1
        cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
        ids[((yy - cy) ** 2 + (xx - cx) ** 2) < 36] = 2
        Image.fromarray(colours[(ids + i) % 3]).save(folder / f"img_{i}.png")


class ColourNet(torch.nn.Module):
    """A per-pixel colour classifier built by hand (no training): near-identity convs with small
    random weights, logits ``4 * (relu(x_c) - relu(-x_c))`` apart by several units on every pixel
    of :func:`colour_blocks` - so a faithful int8 file agrees with it exactly, on any CPU."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, 3, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for conv in [*self.body[::2], self.classifier]:
                conv.weight.normal_(0, 0.02, generator=g)
                conv.bias.zero_()
            for c in range(3):
                self.body[0].weight[c, c, 1, 1] += 1.0
                self.body[0].weight[c + 3, c, 1, 1] -= 1.0
                self.classifier.weight[c, c] += 4.0
                self.classifier.weight[c, c + 3] -= 4.0
            for conv in self.body[2::2]:
                k = conv.weight.shape[-1] // 2
                conv.weight[range(16), range(16), k, k] += 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def with_outlier(net: ColourNet, factor: float = 1000.0) -> ColourNet:
    """The same function, made int8-hostile on purpose: channel 0 of ``body.4``'s output x1000 and
    ``body.6``'s weights on it /1000. In float nothing changes; per-tensor uint8 activations of that
    tensor round its 15 other channels to 0."""
    import copy

    bad = copy.deepcopy(net)
    with torch.no_grad():
        bad.body[4].weight[0] *= factor
        bad.body[4].bias[0] *= factor
        bad.body[6].weight[:, 0] /= factor
    return bad


def export_plain_onnx(model: torch.nn.Module, path: Path, example: np.ndarray) -> Path:
    from deeplab.deploy.format import quiet_tracing

    with quiet_tracing():
        torch.onnx.export(model, (torch.from_numpy(example),), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}, "logits": {0: "b", 2: "h", 3: "w"}},
                          dynamo=False)
    return path


@pytest.fixture(scope="module")
def colour_calib(tmp_path_factory: pytest.TempPathFactory) -> CalibrationSet:
    folder = tmp_path_factory.mktemp("colour") / "imgs"
    colour_blocks(folder)
    return calibration_set(folder=folder, normalization=NORM, max_side=64)


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
    info = quantize_onnx(fp32_file, tmp_path / f"{method}.onnx", arrays, method=method)
    runner = OnnxRuntimeModel(tmp_path / f"{method}.onnx", metadata={"precision": "int8", "quantization": info})
    assert runner(torch.from_numpy(arrays[0])).shape == (1, 3, 33, 49)


def test_measure_parity_of_identical_and_of_different_models() -> None:
    model = tiny_model()
    x = [torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0)).numpy()]
    same = measure_parity(model, model, x)
    assert same["pixel_agreement"] == 1.0 and same["max_logit_diff"] == 0.0 and same["images"] == 1
    assert same["pseudo_miou"] == 100.0 and same["miou_delta"] == 0.0 and "true_miou" not in same
    other = measure_parity(model, lambda t: -model(t), x)
    assert other["pixel_agreement"] < 0.9 and other["max_logit_diff"] > 0 and other["miou_delta"] > 10


def _logits(ids: np.ndarray, classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(ids), classes).permute(2, 0, 1)[None].float()


def test_measure_parity_pseudo_and_true_miou_by_hand() -> None:
    ref_ids = np.zeros((10, 10), np.int64)
    ref_ids[:, 5:] = 1
    ref_ids[0, 0] = 2                      # one stray pixel of class 2: 1% of the pixels
    out_ids = ref_ids.copy()
    out_ids[0, 5:] = 0                     # 5 pixels of class 1 become 0
    out_ids[0, 0] = 0
    x = np.zeros((1, 3, 12, 12), np.float32)  # padded: only the top-left 10x10 counts
    pad = lambda ids: np.pad(ids, ((0, 2), (0, 2)))  # noqa: E731
    ref = lambda t: _logits(pad(ref_ids))  # noqa: E731
    cand = lambda t: _logits(pad(out_ids))  # noqa: E731
    mask = ref_ids.copy()
    mask[0, 0] = 255                       # the ground truth ignores the stray pixel
    parity = measure_parity(ref, cand, [x], sizes=[(10, 10)], masks=[mask], min_class_fraction=0.02)
    # class 2 (1 pixel < 2%) is ignored; class 0: 49 | 49 + 5 -> 49/54; class 1: 45/50
    assert parity["ignored_classes"] == [2]
    assert parity["pseudo_miou"] == pytest.approx(100 * (49 / 54 + 45 / 50) / 2)
    assert parity["miou_delta"] == pytest.approx(100 - parity["pseudo_miou"])
    assert parity["pixel_agreement"] == pytest.approx(94 / 100)
    assert parity["true_miou_fp32"] == pytest.approx(100.0) and parity["masks"] == 1
    assert parity["true_miou_delta"] == pytest.approx(100 - parity["pseudo_miou"])


# --------------------------------------------------------------------------- int8 scheme by ISA


def test_int8_scheme_decision_by_isa() -> None:
    assert cpu.int8_scheme(AMX_FLAGS)[0] == "u8s8"
    assert cpu.int8_scheme(dict(AVX2_FLAGS, avx_vnni=True))[0] == "u8s8"
    scheme, why = cpu.int8_scheme(AVX2_FLAGS)
    assert scheme == "u8s7" and "saturat" in why
    assert cpu.int8_scheme_runs_here("u8s7", AVX2_FLAGS)[0]
    runs, why = cpu.int8_scheme_runs_here("u8s8", AVX2_FLAGS)
    assert not runs and "saturate" in why and "u8s7" in why
    assert cpu.int8_scheme_runs_here("u8s8", AMX_FLAGS)[0]


def _int8_weights(path: Path) -> List[np.ndarray]:
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return [numpy_helper.to_array(i) for i in proto.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("weight_quantized")]


def test_quantizer_uses_the_saturation_safe_scheme_on_a_cpu_without_vnni(
        tmp_path: Path, colour_calib: CalibrationSet, monkeypatch: pytest.MonkeyPatch) -> None:
    src = export_plain_onnx(ColourNet().eval(), tmp_path / "fp32.onnx", colour_calib.arrays[0])
    monkeypatch.setattr(cpu, "cpu_flags", lambda: dict(AVX2_FLAGS))
    info = quantize_onnx(src, tmp_path / "u8s7.onnx", colour_calib.calibration, method="minmax")
    assert info["scheme"] == "u8s7" and "7-bit" in info["weights"]
    weights = _int8_weights(tmp_path / "u8s7.onnx")
    # reduce_range: 7-bit weights, so 2 x 255 x |w| fits vpmaddubsw's int16 (|w| <= 64)
    assert weights and max(int(np.abs(w).max()) for w in weights) <= 64
    monkeypatch.setattr(cpu, "cpu_flags", lambda: dict(AMX_FLAGS))
    info = quantize_onnx(src, tmp_path / "u8s8.onnx", colour_calib.calibration, method="minmax")
    assert info["scheme"] == "u8s8"
    assert max(int(np.abs(w).max()) for w in _int8_weights(tmp_path / "u8s8.onnx")) == 127  # per-channel full range
    # the 8-bit file is refused where it would saturate; the 7-bit one runs
    monkeypatch.setattr(cpu, "cpu_flags", lambda: dict(AVX2_FLAGS))
    with pytest.raises(ExportError, match="saturate"):
        OnnxRuntimeModel(tmp_path / "u8s8.onnx", metadata={"precision": "int8", "quantization": {"scheme": "u8s8"}})
    runner = OnnxRuntimeModel(tmp_path / "u8s7.onnx", metadata={"precision": "int8", "quantization": {"scheme": "u8s7"}})
    x = torch.from_numpy(colour_calib.parity[0])
    assert measure_parity(ColourNet().eval(), runner, [x])["miou_delta"] <= 1.0


# --------------------------------------------------------------------------- accuracy-aware int8


def test_int8_of_a_decisive_model_meets_the_accuracy_contract(tmp_path: Path, colour_calib: CalibrationSet) -> None:
    net = ColourNet().eval()
    src = export_plain_onnx(net, tmp_path / "fp32.onnx", colour_calib.arrays[0])
    info, parity = quantize_to_bound(src, tmp_path / "int8.onnx", colour_calib, net, bound=1.0, method="minmax")
    assert within_bound(parity, 1.0) and parity["miou_delta"] <= 1.0 and info["sensitive_float"] == []
    # the stored figure is what the file does, measured again
    runner = OnnxRuntimeModel(tmp_path / "int8.onnx", metadata={"precision": "int8", "quantization": info})
    again = measure_parity(net, runner, colour_calib.parity, sizes=colour_calib.parity_sizes)
    assert again["miou_delta"] == pytest.approx(parity["miou_delta"])


def test_int8_made_lossy_on_purpose_is_out_of_bound(tmp_path: Path, colour_calib: CalibrationSet) -> None:
    bad = with_outlier(ColourNet()).eval()
    x = torch.from_numpy(colour_calib.parity[0])
    with torch.no_grad():  # the same function in float ...
        assert (bad(x) - ColourNet().eval()(x)).abs().max().item() < 1e-3
    src = export_plain_onnx(bad, tmp_path / "fp32.onnx", colour_calib.arrays[0])
    # ... but int8 of every layer (no search) loses it
    info, parity = quantize_to_bound(src, tmp_path / "int8.onnx", colour_calib, bad, bound=1.0, method="minmax",
                                     max_float_fraction=0.0)
    assert not within_bound(parity, 1.0) and parity["miou_delta"] > 10 and len(info["attempts"]) == 1


def test_mixed_precision_keeps_the_sensitive_layer_float(tmp_path: Path, colour_calib: CalibrationSet) -> None:
    bad = with_outlier(ColourNet()).eval()
    src = export_plain_onnx(bad, tmp_path / "fp32.onnx", colour_calib.arrays[0])
    lines: List[str] = []
    info, parity = quantize_to_bound(src, tmp_path / "int8.onnx", colour_calib, bad, bound=1.0, method="minmax",
                                     report=lines.append)
    assert within_bound(parity, 1.0)
    # the conv reading the outlier tensor ranks first, and it stays float with its producer
    assert info["sensitivity"][0]["node"] == "/body/body.6/Conv"
    assert set(info["sensitive_float"]) == {"/body/body.6/Conv", "/body/body.4/Conv"}
    assert "/body/body.6/Conv" in info["float_nodes"] and "/body/body.0/Conv" not in info["float_nodes"]
    assert info["attempts"][0]["miou_delta"] > 10 and info["float_cost"]["slowdown"] > 0
    assert len(lines) == len(info["attempts"]) and "sensitive layer(s) float" in lines[-1]


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


# --------------------------------------------------------------------------- NNCF accuracy control


def test_nncf_accuracy_control_keeps_the_sensitive_layer_float(tmp_path: Path, colour_calib: CalibrationSet) -> None:
    pytest.importorskip("nncf")
    from deeplab.deploy.precision import gate_delta

    bad = with_outlier(ColourNet()).eval()
    src = export_plain_onnx(bad, tmp_path / "fp32.onnx", colour_calib.arrays[0])
    # NNCF's plain int8 (no search) loses the function, as ONNX Runtime's does
    info, parity = quantize_to_bound(src, tmp_path / "plain.onnx", colour_calib, bad, bound=1.0, method="nncf",
                                     max_float_fraction=0.0)
    assert not within_bound(parity, 1.0) and info["tool"].startswith("nncf")
    lines: List[str] = []
    info, parity = quantize_to_bound(src, tmp_path / "int8.onnx", colour_calib, bad, bound=1.0, method="nncf",
                                     report=lines.append)
    delta, which = gate_delta(parity)
    assert which == "pseudo-label mIoU delta" and delta is not None and delta <= 1.0
    # NNCF reverted the conv reading the outlier tensor, and it is float in the file
    assert "/body/body.6/Conv" in info["sensitive_float"] and "/body/body.6/Conv" in info["float_nodes"]
    assert info["attempts"][0]["float_ops"] == 0 and info["attempts"][0]["miou_delta"] > 10
    assert info["attempts"][-1]["miou_delta"] <= 1.0 and info["float_cost"]["slowdown"] > 0
    if info["float_cost"].get("openvino"):  # where NNCF's files are meant to run
        assert info["float_cost"]["openvino"]["slowdown"] > 0
    assert info["accuracy_control"]["max_drop"] == pytest.approx(1.0 - info["accuracy_control"]["fp32_file_delta"])
    assert len(lines) == len(info["attempts"]) and "reverted to float" in lines[-1]
    # the stored figure is what the written file does, measured as the other methods measure it
    runner = OnnxRuntimeModel(tmp_path / "int8.onnx", metadata={"precision": "int8", "quantization": info})
    again = measure_parity(bad, runner, colour_calib.parity, sizes=colour_calib.parity_sizes)
    assert again["miou_delta"] == pytest.approx(parity["miou_delta"])


class _Constant(torch.nn.Module):
    """Logits that say class 0 everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 3, x.shape[2], x.shape[3])
        logits[:, 0] = 1.0
        return logits + 0 * x[:, :1]


@pytest.mark.parametrize("with_masks", [False, True])
def test_nncf_validation_function_is_the_gate(tmp_path: Path, colour_calib: CalibrationSet, with_masks: bool) -> None:
    pytest.importorskip("nncf")
    from deeplab.deploy.nncf_control import GateValidation, gate_metric

    net = ColourNet().eval()
    with torch.no_grad():  # the reference's own classes: its true mIoU on these masks is 100
        labels = [net(torch.from_numpy(a)).argmax(1)[0, :h, :w].numpy()
                  for a, (h, w) in zip(colour_calib.arrays, colour_calib.sizes)]
    calib = CalibrationSet(arrays=colour_calib.arrays, names=colour_calib.names, source="test",
                           held_out=colour_calib.held_out, sizes=colour_calib.sizes,
                           masks=labels if with_masks else [None] * len(labels))
    validate = GateValidation(net, calib, {"precision": "int8", "quantization": {"scheme": "u8s8"}}, tmp_path)
    fp32 = onnx.load(str(export_plain_onnx(net, tmp_path / "fp32.onnx", colour_calib.arrays[0])))
    constant = onnx.load(str(export_plain_onnx(_Constant(), tmp_path / "constant.onnx", colour_calib.arrays[0])))
    items = list(range(len(calib.parity)))
    assert validate(fp32, items) == pytest.approx(100.0)
    # class 0 everywhere: IoU of class 0 is its share of the pixels, 0 for the other two
    ref = np.concatenate([m.ravel() for m in labels[len(labels) - calib.held_out:]])
    assert set(np.unique(ref)) == {0, 1, 2}
    expected = 100.0 * float(np.mean(ref == 0)) / 3
    assert validate(constant, items) == pytest.approx(expected)
    # ... which is what the gate reads: 100 - the true delta with masks, the pseudo-label mIoU without
    parity = validate.parity(constant)
    assert gate_metric(parity) == pytest.approx(expected)
    assert (parity["true_miou"] if with_masks else parity["pseudo_miou"]) == pytest.approx(expected)


def test_nncf_missing_is_one_clear_error(tmp_path: Path, colour_calib: CalibrationSet,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    net = ColourNet().eval()
    src = export_plain_onnx(net, tmp_path / "fp32.onnx", colour_calib.arrays[0])
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf -> ImportError
    with pytest.raises(ExportError, match=r"--calib-method nncf needs NNCF: pip install 'deeplab\[openvino\]'"):
        quantize_to_bound(src, tmp_path / "int8.onnx", colour_calib, net, bound=1.0, method="nncf")
