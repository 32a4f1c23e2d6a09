"""Export: BN folding (general, data-flow checked), ONNX / TorchScript round trips with dynamic
shapes and embedded metadata, runtime backends, the eager inference layout, and the deploy
package's import structure (format is a leaf; runtime never imports the writer)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deeplab
from deeplab.deploy.export import (
    export_model,
    export_onnx,
    export_torchscript,
    model_metadata,
)
from deeplab.deploy.format import ExportError, read_metadata
from deeplab.deploy.optimize import (
    FusedBottleneck,
    FusedConv2d,
    ShiftDepthwiseConv,
    find_conv_bn_pairs,
    fold_batchnorm,
    optimize_for_inference,
)
from deeplab.deploy.runtime import (
    OnnxRuntimeModel,
    TorchScriptModel,
    check_parity,
    load_exported,
)
from deeplab.models.aspp import PoolingBatchNorm

from tests.helpers import (  # noqa: F401  (re-used by the tests below)
    CLASSES,
    HAVE_OPENVINO,
    NORM,
    PALETTE,
    make_checkpoint,
    needs_openvino,
    randomize_bn,
    small_model,
)


def n_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# --------------------------------------------------------------------------- BN folding


@pytest.mark.parametrize("backbone", ["mobilenet_v2", *(pytest.param(b, marks=pytest.mark.slow) for b in ("resnet50", "xception41"))])
def test_fold_batchnorm_folds_every_bn_of_the_model_and_keeps_outputs(backbone: str) -> None:
    model = small_model(backbone=backbone)
    before = n_batchnorms(model)
    folded = fold_batchnorm(model)
    # Every BN of DeepLab follows a conv: torchvision (features.N.0/1, conv1/bn1, downsample.0/1),
    # timm (conv_dw/bn_dw, conv_pw/bn_pw, conv/bn), ConvBNReLU (conv/bn), image pooling's PoolingBatchNorm.
    assert len(folded.folded_batchnorms) == before
    assert n_batchnorms(folded) == 0
    assert n_batchnorms(model) == before, "the original must be untouched"
    x = torch.randn(1, 3, 51, 45)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


def test_fold_batchnorm_names_follow_each_layout() -> None:
    pairs = dict(find_conv_bn_pairs(small_model(backbone="xception41"), torch.randn(1, 3, 65, 65)))
    assert pairs["backbone.stem.0.conv"] == "backbone.stem.0.bn"
    assert pairs["backbone.blocks.0.stack.conv1.conv_dw"] == "backbone.blocks.0.stack.conv1.bn_dw"
    assert pairs["backbone.blocks.0.stack.conv1.conv_pw"] == "backbone.blocks.0.stack.conv1.bn_pw"
    assert pairs["backbone.blocks.0.shortcut.conv"] == "backbone.blocks.0.shortcut.bn"
    assert pairs["aspp.image_pool.conv"] == "aspp.image_pool.bn"
    assert pairs["decoder.fuse.0.depthwise.conv"] == "decoder.fuse.0.depthwise.bn"
    mb = dict(find_conv_bn_pairs(small_model(backbone="mobilenet_v2"), torch.randn(1, 3, 65, 65)))
    assert mb["backbone.features.0.0"] == "backbone.features.0.1"
    assert mb["backbone.features.2.conv.2"] == "backbone.features.2.conv.3"


def test_pooling_batchnorm_is_folded_and_works_at_batch_one() -> None:
    model = small_model(backbone="mobilenet_v2")
    assert isinstance(model.aspp.image_pool.bn, PoolingBatchNorm)
    folded = fold_batchnorm(model)
    assert isinstance(folded.aspp.image_pool.bn, nn.Identity)
    assert folded.aspp.image_pool.conv.bias is not None
    x = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


class _Tricky(nn.Module):
    """BNs that must not be folded: after a ReLU, after a conv whose output is reused, shared."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 1)
        self.bn_reused_input = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_ok = nn.BatchNorm2d(4)
        self.d = nn.Conv2d(4, 4, 1)
        self.shared = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_after_relu(torch.relu(self.a(x)))
        y = self.b(x)
        x = self.bn_reused_input(y) + y  # the conv output is read twice
        x = self.bn_ok(self.c(x))
        x = self.shared(self.d(x))
        return self.shared(x)  # the same BN twice


def test_fold_batchnorm_leaves_unfoldable_pairs_alone() -> None:
    model = randomize_bn(_Tricky())
    folded = fold_batchnorm(model, example_input=torch.randn(1, 3, 8, 8))
    assert folded.folded_batchnorms == [("c", "bn_ok")]
    assert isinstance(folded.bn_after_relu, nn.BatchNorm2d)
    assert isinstance(folded.bn_reused_input, nn.BatchNorm2d)
    assert isinstance(folded.shared, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_inplace_and_training_flag_restored() -> None:
    model = randomize_bn(_Tricky()).train()
    pairs = find_conv_bn_pairs(model, torch.randn(1, 3, 8, 8))
    assert model.training and pairs == [("c", "bn_ok")]
    same = fold_batchnorm(model, example_input=torch.randn(1, 3, 8, 8), inplace=True)
    assert same is model and isinstance(model.bn_ok, nn.Identity)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", *(pytest.param(b, marks=pytest.mark.slow) for b in ("resnet50", "xception41"))])
def test_optimize_for_inference_fuses_activations(backbone: str) -> None:
    model = small_model(backbone=backbone)
    fast = optimize_for_inference(model, layout="channels_last", fuse=True)
    fused = [m for m in fast.modules() if isinstance(m, FusedConv2d)]
    # every conv runs through oneDNN directly, none through aten's conv any more
    assert fused and not any(type(m) is nn.Conv2d for m in fast.modules())
    assert n_batchnorms(fast) == 0
    with_act = sum(m.attr != "none" for m in fused) + sum(
        isinstance(m, ShiftDepthwiseConv) and m.relu for m in fast.modules())
    relus = sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in fast.modules())
    if backbone == "resnet50":
        # conv3 + residual add + ReLU in one call: no ReLU module runs any more
        assert any(isinstance(m, FusedBottleneck) for m in fast.modules()) and relus == 0
    assert with_act >= len(fast.fused_activations) > 0
    x = torch.randn(1, 3, 51, 45)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    if backbone == "mobilenet_v2":
        nchw = optimize_for_inference(model, layout="contiguous", fuse=True)
        with torch.no_grad():
            torch.testing.assert_close(nchw(x), model(x), atol=1e-4, rtol=1e-4)


def test_optimize_for_inference_channels_last_keeps_outputs() -> None:
    model = small_model(backbone="mobilenet_v2", aspp_rates=(6, 12, 18))
    fast = optimize_for_inference(model, layout="channels_last", fuse=False)
    assert fast.inference_layout == "channels_last"
    # ASPP's rate 6/12/18 depthwise convs become shifted multiply-adds; the backbone's rate-2
    # depthwise convs stay oneDNN convs (its NHWC kernel is fine up to rate ~4).
    shifted = [m for m in fast.modules() if isinstance(m, ShiftDepthwiseConv)]
    assert sorted(m.dilation for m in shifted) == [(6, 6), (12, 12), (18, 18)]
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    plain = optimize_for_inference(model, layout="contiguous", fuse=False)
    assert n_batchnorms(plain) == 0 and not any(isinstance(m, ShiftDepthwiseConv) for m in plain.modules())
    with pytest.raises(ValueError, match="layout"):
        optimize_for_inference(model, layout="nhwc")


@pytest.mark.parametrize("rate,size,relu", [(6, 9, True), (12, 33, False), (3, 5, True), (18, 7, False)])
def test_shift_depthwise_conv_equals_the_conv(rate: int, size: int, relu: bool) -> None:
    torch.manual_seed(rate)
    conv = nn.Conv2d(16, 16, 3, padding=rate, dilation=rate, groups=16).eval()
    assert ShiftDepthwiseConv.supports(conv)
    assert not ShiftDepthwiseConv.supports(nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16))
    assert not ShiftDepthwiseConv.supports(nn.Conv2d(16, 16, 3, padding=6, dilation=6))  # not depthwise
    shift = ShiftDepthwiseConv(FusedConv2d(conv, nn.ReLU) if relu else conv)
    x = torch.randn(2, 16, size, size + 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = conv(x)
        ref = ref.relu() if relu else ref
        out = shift(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- export round trips


def _round_trip(tmp_path: Path, arch: str, backbone: str, fmt: str) -> None:
    model = small_model(arch, backbone)
    path = tmp_path / ("m.onnx" if fmt == "onnx" else "m.ts")
    export_model(model, path, format=fmt, metadata=model_metadata(model, classes=CLASSES, palette=PALETTE))
    # dynamic batch, height and width: other sizes than the traced one (odd, non-square)
    inputs = [torch.randn(1, 3, 65, 65), torch.randn(2, 3, 50, 83)]
    diff = check_parity(model, path, inputs, backend="onnxruntime" if fmt == "onnx" else "torchscript")
    with torch.no_grad():
        scale = max(model(x).abs().max().item() for x in inputs)
    # untrained deep nets (ResNet-101) have logits in the thousands: compare relative to them
    assert diff < 1e-5 * max(1.0, scale), (diff, scale)
    meta = read_metadata(path)
    assert meta["classes"] == CLASSES and meta["config"]["backbone"] == backbone and meta["output_stride"] == 16


FAST_VARIANTS = [("deeplabv3plus", "mobilenet_v2"), ("deeplabv3", "mobilenet_v2")]
SLOW_VARIANTS = [
    (arch, bb)
    for arch in ("deeplabv3plus", "deeplabv3")
    for bb in ("resnet50", "resnet101", "xception41", "xception65", "xception71", "mobilenet_v2")
    if (arch, bb) not in FAST_VARIANTS
]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("arch,backbone", FAST_VARIANTS)
def test_export_round_trip(tmp_path: Path, arch: str, backbone: str, fmt: str) -> None:
    _round_trip(tmp_path, arch, backbone, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("arch,backbone", SLOW_VARIANTS)
def test_export_round_trip_all_variants(tmp_path: Path, arch: str, backbone: str, fmt: str) -> None:
    _round_trip(tmp_path, arch, backbone, fmt)


def test_onnx_graph_has_no_batchnorm_and_dynamic_axes(tmp_path: Path) -> None:
    import onnx

    model = small_model()
    path = export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"] or dims[0] == "batch" and dims[2:] == ["height", "width"]
    keys = {p.key for p in proto.metadata_props}
    assert "deeplab" in keys
    unfolded = export_onnx(model, tmp_path / "u.onnx", fold_bn=False)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(unfolded)).graph.node} or True  # ORT may fold it itself
    assert check_parity(model, unfolded, torch.randn(1, 3, 49, 49)) < 1e-4


def test_metadata_round_trip_and_defaults(tmp_path: Path) -> None:
    model = small_model()
    meta = model_metadata(model)
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    assert len(meta["palette"]) == 3 and meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    with pytest.raises(ValueError, match="class names"):
        model_metadata(model, classes=["a", "b"])
    path = export_torchscript(model, tmp_path / "m.ts", metadata=model_metadata(model, classes=CLASSES, palette=PALETTE, normalization=NORM))
    meta = read_metadata(path)
    assert meta["palette"] == PALETTE and meta["normalization"] == NORM
    json.dumps(meta)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the test traces a plain module itself
def test_read_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ExportError):
        read_metadata(junk)
    traced = torch.jit.trace(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4))
    torch.jit.save(traced, str(tmp_path / "plain.ts"))
    with pytest.raises(ExportError, match="no deeplab metadata"):
        read_metadata(tmp_path / "plain.ts")
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(small_model(), tmp_path / "x", format="tensorrt")


def test_load_exported_backend_checks(tmp_path: Path) -> None:
    model = small_model()
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    ts_path = export_torchscript(model, tmp_path / "m.ts")
    assert isinstance(load_exported(onnx_path), OnnxRuntimeModel)
    assert isinstance(load_exported(ts_path), TorchScriptModel)
    assert isinstance(load_exported(ts_path, backend="torch"), TorchScriptModel)
    with pytest.raises(ExportError, match="ONNX file"):
        load_exported(onnx_path, backend="torchscript")
    with pytest.raises(ExportError, match="TorchScript file"):
        load_exported(ts_path, backend="onnxruntime")
    with pytest.raises(ValueError, match="unknown backend"):
        load_exported(onnx_path, backend="tensorrt")
    runner = load_exported(onnx_path, threads=1)
    assert runner.output_stride == 16 and runner.num_classes == 3 and not runner.training
    # the runner follows the model contract, so the package's inference runs it unchanged
    from deeplab.config import InferenceConfig
    from deeplab.eval.inference import predict_probs

    x = torch.randn(1, 3, 40, 57)
    torch.testing.assert_close(predict_probs(runner, x, InferenceConfig(scales=(0.75, 1.0), flip=True)),
                               predict_probs(model, x, InferenceConfig(scales=(0.75, 1.0), flip=True)), atol=1e-5, rtol=1e-4)


@needs_openvino
def test_openvino_backend_parity_dynamic_and_static(tmp_path: Path) -> None:
    model = small_model()
    path = export_onnx(model, tmp_path / "m.onnx")
    inputs = [torch.randn(1, 3, 65, 65), torch.randn(2, 3, 50, 83)]
    assert check_parity(model, path, inputs, backend="openvino") < 1e-4
    runner = load_exported(path, backend="openvino", static_shapes=True)
    x = torch.randn(1, 3, 33, 49)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), atol=1e-4, rtol=1e-4)
        runner(x)
    assert len(runner._compiled) == 1


@needs_openvino
def test_onnx_metadata_readable_without_onnx_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = export_onnx(small_model(), tmp_path / "m.onnx", metadata=model_metadata(small_model(), classes=CLASSES))
    monkeypatch.setitem(sys.modules, "onnx", None)  # an openvino-only install
    assert read_metadata(path)["classes"] == CLASSES


def test_export_does_not_change_the_model_or_the_resize_function(tmp_path: Path) -> None:
    import deeplab.models.deeplab as D
    from deeplab.nn import layers

    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert D.resize is layers.resize
    assert not model.training and n_batchnorms(model) > 0


def test_checkpoint_helper_round_trip(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "ck.pt")
    model, ckpt = deeplab.checkpoint.load_model(path)
    assert ckpt["classes"] == CLASSES
    assert np.allclose(ckpt["palette"], PALETTE)


# --------------------------------------------------------------------------- import structure

DEPLOY_DIR = Path(deeplab.__file__).parent / "deploy"

# Imports one module of the package with ``deeplab`` and ``deeplab.deploy`` stubbed as bare
# namespace packages, so neither package ``__init__`` runs: what lands in sys.modules is what
# the module itself pulls in.
_IMPORT_PROBE = """
import importlib, json, sys, types
root, target = sys.argv[1], sys.argv[2]
for name, path in (("deeplab", root), ("deeplab.deploy", root + "/deploy")):
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
importlib.import_module(target)
print(json.dumps(sorted(m for m in sys.modules if m == "deeplab" or m.startswith("deeplab."))))
"""


def deeplab_modules_loaded_by(module: str) -> set:
    """The ``deeplab.*`` modules in sys.modules after a fresh interpreter imports ``module``."""
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, str(DEPLOY_DIR.parent), module],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1])) - {"deeplab", "deeplab.deploy"}


def deeplab_imports_in_source(filename: str) -> set:
    """Every ``deeplab`` module named by an import statement in the file, function-level ones too."""
    tree = ast.parse((DEPLOY_DIR / filename).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # A relative import from deeplab/deploy/<file>: level 1 is deeplab.deploy, 2 is deeplab.
            base = ["deeplab", "deeplab.deploy"][-node.level:][0] if node.level else ""
            names.add(".".join(p for p in (base, node.module or "") if p))
    return {n for n in names if n == "deeplab" or n.startswith("deeplab.")}


@pytest.mark.spawn
def test_deploy_format_is_a_leaf() -> None:
    assert deeplab_modules_loaded_by("deeplab.deploy.format") == {"deeplab._utils", "deeplab.deploy.format"}
    assert deeplab_imports_in_source("format.py") == {"deeplab._utils"}


@pytest.mark.spawn
def test_deploy_runtime_imports_neither_export_nor_optimize() -> None:
    loaded = deeplab_modules_loaded_by("deeplab.deploy.runtime")
    assert "deeplab.deploy.runtime" in loaded and "deeplab.deploy.format" in loaded
    assert not loaded & {"deeplab.deploy.export", "deeplab.deploy.optimize"}
    assert not deeplab_imports_in_source("runtime.py") & {"deeplab.deploy.export", "deeplab.deploy.optimize"}


@pytest.mark.parametrize("filename", ["__init__.py", "format.py", "optimize.py", "export.py", "runtime.py"])
def test_deploy_imports_neither_segmenter_nor_cli(filename: str) -> None:
    imported = deeplab_imports_in_source(filename)
    assert not {n for n in imported if n == "deeplab.segmenter" or n == "deeplab.cli" or n.startswith("deeplab.cli.")}


def test_deploy_package_reexports_the_public_api() -> None:
    import deeplab.deploy as deploy

    assert deploy.fold_batchnorm is fold_batchnorm and deploy.optimize_for_inference is optimize_for_inference
    assert deploy.export_model is export_model and deploy.export_onnx is export_onnx
    assert deploy.export_torchscript is export_torchscript and deploy.read_metadata is read_metadata
    assert deploy.load_exported is load_exported and deploy.check_parity is check_parity
    assert issubclass(ExportError, deeplab._utils.DeeplabError) and issubclass(ExportError, RuntimeError)
