"""Precision: ISA detection, InferenceConfig.precision, exports at fp32/bf16/int8 with stored parity,
runtime precision, and ``auto`` choosing by (mocked) CPU flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch

import deeplab
from deeplab import cpu
from deeplab._utils import ConfigError
from deeplab.checkpoint import save_checkpoint
from deeplab.config import InferenceConfig
from deeplab.deploy.export import export_model, export_torchscript, model_metadata
from deeplab.deploy.format import ExportError, read_metadata
from deeplab.deploy.precision import PrecisionError, parity_within_bound
from deeplab.deploy.quantize import calibration_set
from deeplab.deploy.runtime import AutocastBF16, load_exported, measure_parity
from deeplab.segmenter import PARITY_BOUNDS, Segmenter, choose_precision

from tests.deploy.test_quantize import NORM, write_images

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

AMX_FLAGS = dict.fromkeys(cpu.CPU_FLAGS, True)
AVX2_FLAGS = dict.fromkeys(cpu.CPU_FLAGS, False) | {"avx2": True}
ZEN4_FLAGS = dict.fromkeys(cpu.CPU_FLAGS, False) | {"avx2": True, "avx512f": True, "avx512_bf16": True,
                                                     "avx512_vnni": True}
AVX2_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = deeplab.build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=3).eval()
    # Scale the classifier so logits are decisive (a fresh model's are near-ties everywhere,
    # where any rounding flips the argmax and pixel agreement measures nothing).
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("calib") / "imgs"
    write_images(folder, n=4, size=(48, 64))
    return calibration_set(folder=folder, normalization=NORM, max_side=64)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, calib: Any) -> Dict[str, Path]:
    """One file per (precision, format) of the same tiny model."""
    tmp = tmp_path_factory.mktemp("exports")
    model = tiny_model()
    meta = model_metadata(model, classes=["a", "b", "c"], normalization=NORM)
    files = {}
    for precision, fmt in [("fp32", "onnx"), ("bf16", "onnx"), ("bf16", "torchscript"), ("int8", "onnx")]:
        suffix = "onnx" if fmt == "onnx" else "pt"
        # int8 without the float-layer search: the fixture is about the file, not the search (slow)
        files[f"{precision}-{fmt}"] = export_model(model, tmp / f"{precision}.{suffix}", format=fmt, metadata=meta,
                                                   precision=precision, calibration=calib, calib_method="minmax",
                                                   int8_float_fraction=0.0)
    return files


# --------------------------------------------------------------------------- cpu flags


def test_precision_support_by_flags() -> None:
    assert cpu.precision_support("bf16", AMX_FLAGS) == (True, "amx_bf16")
    assert cpu.precision_support("int8", AMX_FLAGS) == (True, "amx_int8")
    assert cpu.precision_support("bf16", ZEN4_FLAGS) == (True, "avx512_bf16")
    assert cpu.precision_support("int8", ZEN4_FLAGS) == (True, "avx512_vnni")
    ok, why = cpu.precision_support("int8", AVX2_FLAGS)
    assert not ok and "avx512_vnni" in why
    assert cpu.accelerated_precisions(AVX2_FLAGS) == {"fp32": "fp32 runs everywhere"}
    assert set(cpu.accelerated_precisions(dict(AVX2_FLAGS, avx_vnni=True))) == {"fp32", "int8"}
    with pytest.raises(ValueError, match="choose from"):
        cpu.precision_support("fp16", AMX_FLAGS)


def test_parse_cpuinfo_reports_every_flag() -> None:
    info = cpu.parse_cpuinfo(AVX2_CPUINFO)
    assert info["cpu"] == "AMD EPYC 7B12" and set(info["flags"]) == set(cpu.CPU_FLAGS)
    assert info["flags"]["avx2"] and not info["flags"]["avx_vnni"]
    assert set(cpu.cpu_flags()) == set(cpu.CPU_FLAGS)  # this machine's, whatever it has


# --------------------------------------------------------------------------- config


def test_inference_config_precision_is_validated() -> None:
    assert InferenceConfig().precision == "auto"
    assert InferenceConfig(precision="int8").precision == "int8"
    with pytest.raises(ConfigError, match="unknown precision 'fp16'.*choose from"):
        InferenceConfig(precision="fp16")


# --------------------------------------------------------------------------- exports


@pytest.mark.slow  # exports / quantizes a model (~10-40 s on 2 shared cores)
def test_exports_round_trip_with_precision_metadata(exports: Dict[str, Path]) -> None:
    fp32 = read_metadata(exports["fp32-onnx"])
    assert fp32["precision"] == "fp32" and "parity" not in fp32
    for key in ("bf16-onnx", "bf16-torchscript", "int8-onnx"):
        meta = read_metadata(exports[key])
        precision = key.split("-")[0]
        assert meta["precision"] == precision and meta["classes"] == ["a", "b", "c"]
        assert meta["calibration"]["images"] == 3 and meta["calibration"]["held_out"] == ["img_3.png"]
        parity = meta["parity"]
        assert parity["images"] == 1 and parity["inputs"] == "held-out calibration images"
        assert parity["precision"] == precision and parity["reference"] == "fp32 PyTorch"
    quant = read_metadata(exports["int8-onnx"])["quantization"]
    assert quant["method"] == "minmax" and quant["per_channel"] and "logits" in quant["keep_float"]


@pytest.mark.slow  # exports / quantizes a model (~10-40 s on 2 shared cores)
def test_stored_parity_is_the_accuracy_the_file_has(exports: Dict[str, Path], calib: Any) -> None:
    # The contract, on any CPU: the file stores its pseudo-label mIoU delta against fp32 on the
    # held-out images, measured again here it is the same, and the policy reads the bound from it.
    from deeplab.deploy.export import prepare_for_export

    reference = prepare_for_export(tiny_model(), True)
    for key, backend in (("bf16-torchscript", "torchscript"), ("int8-onnx", "onnxruntime")):
        meta = read_metadata(exports[key])
        parity, precision = meta["parity"], meta["precision"]
        assert 0 <= parity["miou_delta"] <= 100 and parity["miou_delta"] == pytest.approx(100 - parity["pseudo_miou"])
        runner = load_exported(exports[key], backend=backend)
        again = measure_parity(reference, runner, calib.parity, sizes=calib.parity_sizes)
        assert again["miou_delta"] == pytest.approx(parity["miou_delta"], abs=1e-6), key
        assert parity_within_bound(parity, precision) == (parity["miou_delta"] <= PARITY_BOUNDS[precision])
    assert read_metadata(exports["bf16-torchscript"])["parity"]["max_logit_diff"] > 0  # it really ran at bf16
    assert PARITY_BOUNDS == {"int8": 1.0, "bf16": 0.3}


def test_int8_export_needs_onnx_and_calibration(tmp_path: Path, calib: Any) -> None:
    model = tiny_model()
    with pytest.raises(ExportError, match="ONNX"):
        export_model(model, tmp_path / "m.pt", format="torchscript", precision="int8", calibration=calib)
    with pytest.raises(ExportError, match="calibration images"):
        export_model(model, tmp_path / "m.onnx", precision="int8")
    with pytest.raises(ValueError, match="choose from"):
        export_model(model, tmp_path / "m.onnx", precision="fp16")


# --------------------------------------------------------------------------- runtime precision


@pytest.mark.slow  # exports / quantizes a model (~10-40 s on 2 shared cores)
def test_runtime_records_and_checks_precision(exports: Dict[str, Path]) -> None:
    assert load_exported(exports["int8-onnx"]).precision == "int8"
    assert load_exported(exports["fp32-onnx"]).precision == "fp32"
    ts = load_exported(exports["bf16-torchscript"])
    assert ts.precision == "bf16" and load_exported(exports["bf16-torchscript"], precision="fp32").precision == "fp32"
    with pytest.raises(ExportError, match="holds int8 weights"):
        load_exported(exports["int8-onnx"], precision="fp32")
    with pytest.raises(ExportError, match="openvino"):
        load_exported(exports["bf16-onnx"], backend="onnxruntime", precision="bf16")
    with pytest.raises(ExportError, match="--precision int8"):
        load_exported(exports["fp32-onnx"], precision="int8")


def test_autocast_bf16_runs_convs_in_bf16() -> None:
    model = tiny_model()
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(x), AutocastBF16(model)(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert 0 < (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert AutocastBF16(model).output_stride == model.output_stride


# --------------------------------------------------------------------------- auto


def _meta(precision: str, delta: float = 0.1, scheme: str = "u8s8") -> Dict[str, Any]:
    return {"precision": precision, "parity": {"miou_delta": delta, "pseudo_miou": 100 - delta},
            "quantization": {"scheme": scheme}}


def test_auto_picks_fp32_on_a_cpu_without_bf16_or_int8() -> None:
    precision, reason = choose_precision(_meta("bf16"), "openvino", flags=AVX2_FLAGS)
    assert precision == "fp32" and "does not accelerate bf16" in reason
    # int8 on AVX2 gains 1.07x (measured): under the 10% that pays; an int8 file has no fp32 weights
    with pytest.raises(PrecisionError, match=r"1\.07x.*export the checkpoint at fp32"):
        choose_precision(_meta("int8", scheme="u8s7"), "onnxruntime", flags=AVX2_FLAGS)
    with pytest.raises(PrecisionError, match="saturate"):
        choose_precision(_meta("int8"), "onnxruntime", flags=AVX2_FLAGS)
    assert choose_precision(_meta("fp32"), "openvino", flags=AMX_FLAGS)[0] == "fp32"
    assert choose_precision(None, "torch", flags=AMX_FLAGS)[0] == "fp32"


def test_auto_picks_the_accelerated_precision_within_bound() -> None:
    precision, reason = choose_precision(_meta("bf16"), "openvino", flags=ZEN4_FLAGS)
    assert precision == "bf16" and "avx512_bf16" in reason and "2.05x" in reason and "pseudo-label mIoU delta 0.10" in reason
    assert choose_precision(_meta("bf16"), "torchscript", flags=AMX_FLAGS)[0] == "bf16"
    assert choose_precision(_meta("bf16"), "onnxruntime", flags=AMX_FLAGS)[0] == "fp32"  # no bf16 in ORT's CPU EP
    precision, reason = choose_precision(_meta("bf16", 0.5), "openvino", flags=AMX_FLAGS)
    assert precision == "fp32" and "out of bound" in reason
    precision, reason = choose_precision(_meta("int8", 0.9), "onnxruntime", flags=ZEN4_FLAGS)
    assert precision == "int8" and "avx512_vnni" in reason


def test_auto_never_picks_an_int8_file_out_of_bound() -> None:
    for flags in (AMX_FLAGS, ZEN4_FLAGS):
        with pytest.raises(PrecisionError, match="out of bound"):
            choose_precision(_meta("int8", 1.5), "onnxruntime", flags=flags)
    # with masks the true delta is the gate (the pseudo-label one is stored beside it)
    meta = _meta("int8", 5.0)
    meta["parity"]["true_miou_delta"] = 0.4
    assert choose_precision(meta, "onnxruntime", flags=AMX_FLAGS)[0] == "int8"
    meta["parity"]["true_miou_delta"] = 1.2
    with pytest.raises(PrecisionError, match="true mIoU delta"):
        choose_precision(meta, "onnxruntime", flags=AMX_FLAGS)
    # files from before the gate was accuracy store pixel agreement only: not trusted
    with pytest.raises(PrecisionError, match="no stored mIoU parity"):
        choose_precision({"precision": "int8", "parity": {"pixel_agreement": 0.99}}, "onnxruntime", flags=AMX_FLAGS)


@pytest.fixture(scope="module")
def bf16_torchscript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript file whose metadata says bf16 with an in-bound parity (written without measuring it)."""
    model = tiny_model()
    meta = model_metadata(model, classes=["a", "b", "c"], normalization=NORM)
    meta.update(precision="bf16", parity={"miou_delta": 0.1, "pseudo_miou": 99.9, "max_logit_diff": 0.1})
    return export_torchscript(model, tmp_path_factory.mktemp("ts") / "bf16.pt", metadata=meta)


def test_segmenter_auto_falls_back_to_fp32_with_mocked_flags(bf16_torchscript: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    exports = {"bf16-torchscript": bf16_torchscript}
    monkeypatch.setattr(cpu, "cpu_flags", lambda: dict(AVX2_FLAGS))
    seg = Segmenter.from_exported(exports["bf16-torchscript"])
    assert seg.precision == "fp32" and "does not accelerate bf16" in seg.precision_reason
    monkeypatch.setattr(cpu, "cpu_flags", lambda: dict(AMX_FLAGS))
    seg = Segmenter.from_exported(exports["bf16-torchscript"])
    assert seg.precision == "bf16" and seg.model.precision == "bf16" and "amx_bf16" in seg.precision_reason
    assert "precision=bf16" in repr(seg)
    seg = Segmenter.from_exported(exports["bf16-torchscript"], inference=InferenceConfig(precision="fp32"))
    assert seg.precision == "fp32"


@pytest.mark.slow  # exports / quantizes a model (~10-40 s on 2 shared cores)
def test_segmenter_checkpoint_precisions(tmp_path: Path) -> None:
    model = tiny_model()
    ckpt = save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": model.config.to_dict(),
                                               "classes": ["a", "b", "c"], "normalization": NORM})
    auto = Segmenter.from_checkpoint(ckpt)
    assert auto.precision == "fp32" and "checkpoint" in auto.precision_reason
    bf16 = Segmenter.from_checkpoint(ckpt, precision="bf16")  # shorthand of inference=InferenceConfig(precision=...)
    assert bf16.precision == "bf16" and isinstance(bf16.model, AutocastBF16)
    image = (torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    agree = (auto.predict(image) == bf16.predict(image)).mean()
    assert agree >= 0.9  # bf16 autocast really runs the model (near-ties of a random model may flip)
    with pytest.raises(ValueError, match="--precision int8"):
        Segmenter.from_checkpoint(ckpt, inference=InferenceConfig(precision="int8"))


# --------------------------------------------------------------------------- CLI


def _outlier_deeplab() -> torch.nn.Module:
    """:func:`tiny_model` made int8-hostile on purpose, same float function: channel 0 of the decoder's
    first pointwise conv x1000 (BN scale and shift; ReLU commutes) and the next depthwise conv's
    weights on it /1000."""
    model = tiny_model()
    with torch.no_grad():
        bn = model.decoder.fuse[0].pointwise.bn
        bn.weight[0] *= 1000.0
        bn.bias[0] *= 1000.0
        model.decoder.fuse[1].depthwise.conv.weight[0] /= 1000.0
    return model


@pytest.mark.slow  # exports / quantizes a model (~10-40 s on 2 shared cores)
def test_cli_export_refuses_lossy_int8_and_auto_never_runs_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from deeplab.cli.export import main

    monkeypatch.chdir(tmp_path)  # a relative --out: the quantizer works in a temporary folder
    model = _outlier_deeplab()
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), tiny_model()(x), rtol=1e-4, atol=1e-3)  # the same model in float
    ckpt = save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": model.config.to_dict(),
                                               "classes": ["a", "b", "c"], "normalization": NORM})
    write_images(tmp_path / "imgs", n=4, size=(48, 64))
    out = Path("m.int8.onnx")
    code = main(["--checkpoint", str(ckpt), "--out", str(out), "--precision", "int8", "--calib-data", "imgs",
                 "--calib-method", "minmax", "--int8-float-fraction", "0"])
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "calibration: 3 image(s)" in captured.out and "the source has 4 of the 40 asked for" in captured.out
    assert "pseudo-label mIoU" in captured.out
    assert "loses more than 1 mIoU at int8" in captured.err and "Fix:" in captured.err
    assert "--calib-images" in captured.err and "--int8-float-fraction" in captured.err and "--qat" in captured.err
    meta = read_metadata(tmp_path / out)
    assert meta["parity"]["miou_delta"] > PARITY_BOUNDS["int8"] and meta["quantization"]["method"] == "minmax"
    assert not parity_within_bound(meta["parity"], "int8")
    for flags in (AMX_FLAGS, ZEN4_FLAGS, AVX2_FLAGS):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: dict(flags))
        with pytest.raises(PrecisionError):
            choose_precision(meta, "onnxruntime")
        with pytest.raises(PrecisionError, match="precision auto does not run this int8 file"):
            Segmenter.from_exported(tmp_path / out)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: dict(AMX_FLAGS))
    assert Segmenter.from_exported(tmp_path / out, inference=InferenceConfig(precision="int8")).precision == "int8"


@pytest.mark.parametrize("argv, message", [
    (["--precision", "int8"], "needs calibration images"),
    (["--precision", "int8", "--calib-data", "{tmp}/nope"], "does not exist"),
    (["--calib-data", "{tmp}"], "add --precision int8"),
    (["--precision", "bf16", "--calib-method", "minmax", "--calib-data", "{tmp}"], "int8 only"),
    (["--precision", "bf16", "--int8-scheme", "u8s7", "--calib-data", "{tmp}"], "int8 only"),
])
def test_cli_export_calibration_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list,
                                       message: str) -> None:
    from deeplab.cli.export import main

    model = tiny_model()
    ckpt = save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": model.config.to_dict()})
    code = main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx")] + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "deeplab export: error: " in err and message in err
    assert "Traceback" not in err and not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------- bench


def test_bench_paths_declare_their_precision_and_filter_by_it(capsys: pytest.CaptureFixture[str]) -> None:
    from deeplab.cli import bench as bench_cli
    from deeplab.deploy import bench

    by_precision = {p: [k for k, s in bench.PATH_SPECS.items() if s.precision == p] for p in bench.PRECISIONS}
    assert {"eager_bf16", "openvino_bf16"} <= set(by_precision["bf16"])
    assert {"onnxruntime_int8", "openvino_int8"} <= set(by_precision["int8"])
    assert set(bench.PATHS) == set(bench.PATH_SPECS)
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--paths", "eager", "--precision", "int8"])
    assert exit_info.value.code == 2 and "no path of --paths runs at --precision int8" in capsys.readouterr().err
    # a row is divided by the limit of its own precision
    limits = {"fp32": {"peak": 100.0}, "bf16": {"peak": 200.0}, "int8": {"peak": None}}
    assert bench.fraction_of_limit({"path": "openvino_bf16", "gflops": 50.0}, limits) == 0.25
    assert bench.fraction_of_limit({"path": "openvino_int8", "gflops": 50.0}, limits) is None
