"""The TF reference's ResNet (resnet_v1_50/101 and the _beta variants DeepLab used).

Fast tests pin the layout (stride on the last unit of a block, beta root, multi-grid rates, TF's
"SAME" max pool, the pre-activation low-level tap), the name map (every parameter filled from a
TF-named variable) and the Mult-Adds. The slow ones run real TensorFlow in a separate process
(``python tests/tf_reference.py DIR resnet``): slim's ``resnet_v1`` / DeepLab's
``resnet_v1_beta`` spelled out in TF ops write ImageNet checkpoints with the reference's names
(plus ``global_step``, ``beta1_power``, ``summaries/x``, an EMA shadow, a Momentum slot and the
ImageNet classifier), and record TensorFlow's float64 features; the converted backbones must
reproduce them to 1e-5 (measured ~1e-13), also through the zoo's download-and-convert path.
"""

from __future__ import annotations

import tarfile
import warnings
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from deeplab.cli.info import count
from deeplab.models import build_backbone, build_model
from deeplab.models.backbones.resnet_tf import MaxPool2dSame, ResNetTF, unit_plan
from deeplab.tf import ConversionError, ConversionWarning, DictSource, convert_checkpoint, convert_source
from deeplab.tf.names import CONV, DEPTHWISE, VECTOR, backbone_rules, tf_layout
from tests.helpers import run_tf_reference

BACKBONES = ("resnet_v1_50", "resnet_v1_101", "resnet_v1_50_beta", "resnet_v1_101_beta")


# --------------------------------------------------------------------------- layout (fast)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_strides_and_channels(output_stride: int) -> None:
    net = build_backbone("resnet_v1_50_beta", output_stride=output_stride).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 65, 66))
    assert out["low_level"].shape == (1, 256, 17, 17)
    side = -(-65 // output_stride), -(-66 // output_stride)  # TF "SAME": ceil at every stride
    assert out["out"].shape == (1, 2048, *side)
    assert net.feature_specs["out"].stride == output_stride and net.feature_specs["low_level"].channels == 256


def test_unit_plan_is_stack_blocks_dense() -> None:
    units = (3, 4, 23, 3)
    os16 = unit_plan(units, output_stride=16, multi_grid=(1, 2, 4))
    assert os16[0] == [(1, 1), (1, 1), (2, 1)] and os16[1][-1] == (2, 1)  # stride on the LAST unit
    assert os16[2][:22] == [(1, 1)] * 22 and os16[2][22] == (1, 1)  # block3's stride given up at rate 1
    assert os16[3] == [(1, 2), (1, 4), (1, 8)]  # rate 2 x multi-grid
    os8 = unit_plan(units, output_stride=8, multi_grid=(1, 2, 4))
    assert os8[1][-1] == (1, 1) and os8[2] == [(1, 2)] * 23 and os8[3] == [(1, 4), (1, 8), (1, 16)]
    assert unit_plan(units, output_stride=32)[3] == [(1, 1)] * 3


def test_beta_root_and_projection_shortcuts() -> None:
    beta, plain = ResNetTF(101, beta=True), ResNetTF(101, beta=False)
    assert [beta.conv1_1.conv.kernel_size, beta.conv1_3.conv.out_channels] == [(3, 3), 128]
    assert plain.conv1.conv.kernel_size == (7, 7) and beta.block1[0].conv1.conv.in_channels == 128
    for net in (beta, plain):
        # Only the first unit of a block projects; the strided last unit subsamples.
        assert all(block[0].shortcut is not None for block in net.blocks())
        assert all(unit.shortcut is None for block in net.blocks() for unit in list(block)[1:])
        assert [block[-1].stride for block in net.blocks()] == [2, 2, 1, 1]  # OS 16: block3 gave its stride up
    assert beta.normalization.mean == (0.5, 0.5, 0.5)  # beta: [-1, 1]
    assert plain.normalization.std[0] == pytest.approx(1 / 255)  # plain: pixels minus the ImageNet mean


@pytest.mark.parametrize("size", [8, 9, 16, 17])
def test_max_pool_is_tensorflows_same(size: int) -> None:
    x = torch.randn(1, 2, size, size + 1, dtype=torch.float64)
    ours = MaxPool2dSame(3, 2)(x)
    a = x.numpy()
    for dim_size, axis in ((size, 2), (size + 1, 3)):
        out = -(-dim_size // 2)
        total = max((out - 1) * 2 + 3 - dim_size, 0)
        pad = [(0, 0)] * 4
        pad[axis] = (total // 2, total - total // 2)  # TF: the odd pixel after
        a = np.pad(a, pad, constant_values=-np.inf)
    ref = np.lib.stride_tricks.sliding_window_view(a, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-1, -2))
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_low_level_is_conv3_before_the_shortcut_and_relu() -> None:
    net = build_backbone("resnet_v1_101_beta").eval()
    seen: Dict[str, torch.Tensor] = {}
    net.block1[1].conv3.register_forward_hook(lambda m, i, o: seen.setdefault("conv3", o))
    with torch.no_grad():
        out = net(torch.randn(1, 3, 33, 33))
    assert torch.equal(out["low_level"], seen["conv3"]) and (out["low_level"] < 0).any()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_name_map_fills_every_parameter_from_tf_names(backbone: str) -> None:
    """Our weights written under the reference's names (TF layouts) come back exactly."""
    net = build_backbone(backbone, output_stride=16)
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    state = net.state_dict()
    scope = backbone.replace("_beta", "")
    tensors = {}
    for rule in backbone_rules(backbone, scope, prefix=""):
        value = state[rule.key].numpy()
        assert rule.kind in (CONV, VECTOR) and rule.kind != DEPTHWISE
        tensors[rule.tf_name] = value.transpose(2, 3, 1, 0) if rule.kind == CONV else value
        assert tensors[rule.tf_name].shape == tf_layout(rule.kind, value.shape)
    tensors[f"{scope}/logits/weights"] = np.zeros((1, 1, 2048, 1000), np.float32)
    conv = convert_source(DictSource(tensors))
    assert conv.recognised.backbone == backbone and conv.config is None
    for key, value in conv.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key


def test_mult_adds_against_table_3() -> None:
    """Paper Table 3: DeepLabv3 R101 OS 16 (regular ASPP) 81.02B, with decoder 101.28B."""
    v3 = count(arch="deeplabv3", backbone="resnet_v1_101_beta", output_stride=16, separable=False)["mult_adds"] / 1e9
    v3p = count(arch="deeplabv3plus", backbone="resnet_v1_101_beta", output_stride=16, separable=False)["mult_adds"] / 1e9
    tv = count(arch="deeplabv3", backbone="resnet101", output_stride=16, separable=False)["mult_adds"] / 1e9
    # The layout pinned by the fast tests above gives these; the note in the README explains the gap.
    assert (round(v3, 2), round(v3p, 2), round(tv, 2)) == (76.05, 97.81, 71.06)
    assert abs(v3p / 101.28 - 1) < 0.04 and abs(v3 / 81.02 - 1) < 0.07


def test_model_and_info_accept_the_tf_backbones(capsys) -> None:
    from deeplab.cli.info import main as info

    model = build_model(arch="deeplabv3plus", backbone="resnet_v1_101_beta", num_classes=3, multi_grid=(1, 2, 4)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 33)).shape == (1, 3, 33, 33)
    assert info(["--arch", "deeplabv3", "--backbone", "resnet_v1_101_beta", "--output-stride", "16",
                 "--separable", "off", "--size", "65"]) == 0
    assert "| deeplabv3 | resnet_v1_101_beta | 16 | regular |" in capsys.readouterr().out


# --------------------------------------------------------------------------- against TensorFlow (slow)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Dict:
    return run_tf_reference(tmp_path_factory.mktemp("tf_resnet"), "resnet")


def features(backbone: torch.nn.Module, image: np.ndarray) -> Dict[str, np.ndarray]:
    with torch.no_grad():
        out = backbone.double()(torch.from_numpy(image).permute(0, 3, 1, 2))
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}


def rel_err(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


CASES = [(33, 16, (1, 1, 1)), (34, 8, (1, 2, 4)), (35, 32, (1, 1, 1))]


@pytest.mark.slow
@pytest.mark.spawn
@pytest.mark.parametrize("key", ["resnet_v1_101_beta", "resnet_v1_50"])
def test_converted_backbone_reproduces_tensorflows_features(ref: Dict, key: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv = convert_checkpoint(ref["dir"] / key / "model.ckpt")
    assert conv.recognised.backbone == key and conv.config is None
    ours_warnings = [w for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(ours_warnings) == 1
    scope = key.replace("_beta", "")
    for name in ("global_step", "beta1_power", "summaries/x", f"{scope}/block1/unit_1/bottleneck_v1/conv1/weights/Momentum"):
        assert name in str(ours_warnings[0].message)
    assert f"{scope}/logits/weights" in conv.ignored  # the ImageNet classifier: ignored, not warned about
    for size, output_stride, grid in CASES:
        net = build_backbone(key, output_stride=output_stride, multi_grid=grid).eval()
        net.load_state_dict(conv.state_dict())
        tag = f"{key}/{size}_{output_stride}"
        ours = features(net, ref[f"{tag}/image"])
        for what in ("out", "low_level"):
            assert ours[what].shape == ref[f"{tag}/{what}"].shape
            # float64 on both sides: ~1e-13 measured; a wrong padding, stride placement or rate is > 1e-2.
            assert rel_err(ours[what], ref[f"{tag}/{what}"]) < 1e-5, (tag, what)


@pytest.mark.slow
@pytest.mark.spawn
def test_an_unknown_variable_inside_the_resnet_scope_fails(ref: Dict) -> None:
    from deeplab.tf import open_checkpoint

    with open_checkpoint(ref["dir"] / "resnet_v1_50" / "model.ckpt") as source:
        tensors = {name: source.read(name) for name in source.shapes()}
    tensors["resnet_v1_50/block2/unit_1/bottleneck_v1/conv4/weights"] = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ConversionError, match=r"(?s)unexpected variables \(1\).*conv4/weights"):
        convert_source(DictSource(tensors))


@pytest.mark.slow
@pytest.mark.spawn
def test_zoo_imagenet_resnet_downloads_converts_and_trains_from(ref: Dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from deeplab import zoo
    from tests.test_zoo import ZooServer

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    entry = zoo.ZOO["resnet_v1_101_beta_imagenet"]
    tarball = tmp_path / entry.tarball
    with tarfile.open(tarball, "w:gz", compresslevel=1) as archive:  # laid out like the zoo's
        for path in sorted((ref["dir"] / "resnet_v1_101_beta").iterdir()):
            archive.add(path, arcname=f"resnet_v1_101/{path.name}")
    server = ZooServer({entry.tarball: tarball.read_bytes()})
    try:
        path = zoo.pretrained_path(entry.name, mirror=server.url, progress=False)
        assert path.name == "resnet_v1_101_beta_imagenet.pth" and len(server.requests) == 1
        backbone = zoo.from_pretrained(entry.name, progress=False)  # a cache hit
        assert len(server.requests) == 1
    finally:
        server.close()
    tag = "resnet_v1_101_beta/33_16"
    assert rel_err(features(backbone, ref[f"{tag}/image"])["out"], ref[f"{tag}/out"]) < 1e-5
    # The paper's Table 3 row: DeepLabv3+ with regular ASPP and decoder, multi-grid (1, 2, 4) (common.py:74-76).
    model = build_model(arch="deeplabv3plus", backbone="resnet_v1_101_beta", num_classes=3, pretrained_backbone=path,
                        separable=False, multi_grid=(1, 2, 4))
    assert torch.equal(model.backbone.block4[2].conv3.conv.weight, backbone.block4[2].conv3.conv.weight.float())
