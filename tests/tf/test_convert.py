"""deeplab.tf without TensorFlow: the bundle reader on files TensorFlow wrote, the converter, the CLI.

The fixtures under tests/fixtures/tf were written by real TensorFlow (scripts/make_tf_fixtures.py):
a bundle with one tensor of each dtype, a two-shard bundle, and a model-zoo-like tarball of the
reference's MobileNetV2 DeepLabv3 (variables named by tests/tf_reference.py, i.e. by the reference's
scopes, independently of deeplab/tf/names.py) with TensorFlow's logits for one input. The slow
tests in test_convert_tf.py write full-size checkpoints with TensorFlow at test time.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab.checkpoint import load_model
from deeplab.cli.main import main as cli
from deeplab.models import build_backbone, build_model
from deeplab.nn.layers import Conv2dSame, tf_same_padding
from deeplab.tf import BundleError, CheckpointReader, ConversionError, DictSource, convert_checkpoint, crc32c
from deeplab.tf.bundle import _crc_update_py
from deeplab.tf.convert import convert_source, open_checkpoint

# The settings the weights cannot reveal, from the reference configs of the released models.
MNV2 = {"reference_config": "mobilenetv2_voc"}
XCEPTION = {"reference_config": "xception65_voc"}
from deeplab.tf.names import backbone_rules, head_rules, tf_layout

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tf"
MNV2_TARBALL = FIXTURES / "deeplabv3_mnv2_tiny.tar.gz"


def expected_torch_value(tf_name: str, value: np.ndarray) -> np.ndarray:
    """The layout change each kind of TF variable needs, written out independently of names.py."""
    if tf_name.endswith("depthwise_weights"):  # [kh, kw, C, 1] -> [C, 1, kh, kw]
        return np.transpose(value, (2, 3, 0, 1))
    if tf_name.endswith("/weights"):  # [kh, kw, in, out] -> [out, in, kh, kw]
        return np.transpose(value, (3, 2, 0, 1))
    return value


# --------------------------------------------------------------------------- the bundle reader


def test_reader_reads_every_dtype_tensorflow_writes() -> None:
    reader = CheckpointReader(FIXTURES / "mixed" / "model.ckpt")
    expected = np.load(FIXTURES / "mixed_expected.npz")
    numeric = {k.replace("__", "/"): expected[k] for k in expected.files}
    assert set(reader.entries) == set(numeric) | {"bf16", "strings"}
    for name, value in numeric.items():
        got = reader.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    np.testing.assert_array_equal(reader.read("bf16"), np.array([1.5, -2.25, 3.0], np.float32))
    assert reader.read("strings").tolist() == [b"xception_65", b"", b"\xff\x00 bytes"]
    assert reader.entries["global_step"].shape == () and reader.read("global_step") == 30000
    assert reader.entries["conv/weights"].dtype_name == "float32"


def test_reader_reads_a_two_shard_checkpoint() -> None:
    reader = CheckpointReader(FIXTURES / "sharded" / "merged.index")
    assert reader.num_shards == 2
    assert {n: e.shard_id for n, e in reader.entries.items()} == {"a/weights": 0, "b/biases": 0, "c/gamma": 1}
    np.testing.assert_array_equal(reader.read("a/weights"), np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4))
    np.testing.assert_array_equal(reader.read("c/gamma"), np.full(5, 2.0, np.float32))


def test_crc32c_matches_the_standard_and_the_bytewise_loop() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = np.random.default_rng(0).integers(0, 256, 200_003, dtype=np.uint8).tobytes()
    assert crc32c(data) == _crc_update_py(0xFFFFFFFF, data) ^ 0xFFFFFFFF  # vectorised path


@pytest.fixture()
def mixed_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "mixed", dest)
    return dest / "model.ckpt"


def test_reader_detects_a_corrupt_tensor(mixed_copy: Path) -> None:
    reader = CheckpointReader(mixed_copy)
    entry = reader.entries["big"]
    data = mixed_copy.with_name("model.ckpt.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 1000] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="big: checksum mismatch"):
        CheckpointReader(mixed_copy).read("big")


def test_reader_detects_truncation_and_missing_files(mixed_copy: Path, tmp_path: Path) -> None:
    data = mixed_copy.with_name("model.ckpt.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(BundleError, match="beyond the end of data shard"):
        CheckpointReader(mixed_copy).read("big")
    data.unlink()
    with pytest.raises(BundleError, match="data file .* is missing"):
        CheckpointReader(mixed_copy).read("big")
    index = mixed_copy.with_name("model.ckpt.index")
    index.write_bytes(index.read_bytes()[:-10])
    with pytest.raises(BundleError, match="bad magic number"):
        CheckpointReader(mixed_copy)
    with pytest.raises(BundleError, match="no TensorFlow checkpoint"):
        CheckpointReader(tmp_path / "nothing" / "model.ckpt")


def test_reader_accepts_prefix_index_data_file_and_directory(tmp_path: Path) -> None:
    prefix = FIXTURES / "mixed" / "model.ckpt"
    for spec in (prefix, FIXTURES / "mixed" / "model.ckpt.index",
                 FIXTURES / "mixed" / "model.ckpt.data-00000-of-00001", FIXTURES / "mixed"):
        assert CheckpointReader(spec).prefix == prefix
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.index", "b.index"):
        (two / name).write_bytes(b"")
    with pytest.raises(BundleError, match="2 checkpoint indexes"):
        CheckpointReader(two)


# --------------------------------------------------------------------------- MobileNetV2 DeepLabv3 tarball


@pytest.fixture(scope="module")
def mnv2():
    return convert_checkpoint(MNV2_TARBALL, reference_config="mobilenetv2_voc")


@pytest.fixture(scope="module")
def mnv2_tensors():
    with open_checkpoint(MNV2_TARBALL) as source:
        return {name: source.read(name) for name in source.shapes()}


def test_tarball_is_recognised_as_the_released_mobilenet_v2_model(mnv2) -> None:
    cfg = mnv2.config
    assert (cfg.arch, cfg.backbone, cfg.num_classes, cfg.aspp_rates, cfg.image_pooling, cfg.tf_compat) == (
        "deeplabv3", "mobilenet_v2", 21, (), True, True)
    assert mnv2.dataset == "voc" and mnv2.classes[0] == "background" and len(mnv2.palette) == 21
    assert mnv2.module.normalization.mean == (0.5, 0.5, 0.5)  # [-1, 1] inputs
    slots = {f"{v}/{s}" for v in ("aspp0/weights", "logits/semantic/weights", "MobilenetV2/Conv/weights")
             for s in ("Momentum", "ExponentialMovingAverage", "RMSProp")}
    assert set(mnv2.ignored) == slots | {"global_step"}
    assert len(mnv2.used) == len(mnv2.module.state_dict()) - sum(
        k.endswith("num_batches_tracked") for k in mnv2.module.state_dict())


def test_every_variable_lands_in_its_parameter_with_the_right_layout(mnv2, mnv2_tensors) -> None:
    state = mnv2.module.state_dict()
    # Anchors written by hand (torchvision layout <- slim names), independent of names.py.
    anchors = {
        "MobilenetV2/Conv/weights": "backbone.features.0.0.weight",
        "MobilenetV2/Conv/BatchNorm/moving_variance": "backbone.features.0.1.running_var",
        "MobilenetV2/expanded_conv/depthwise/depthwise_weights": "backbone.features.1.conv.0.0.weight",
        "MobilenetV2/expanded_conv/project/weights": "backbone.features.1.conv.1.weight",
        "MobilenetV2/expanded_conv/project/BatchNorm/gamma": "backbone.features.1.conv.2.weight",
        "MobilenetV2/expanded_conv_1/expand/weights": "backbone.features.2.conv.0.0.weight",
        "MobilenetV2/expanded_conv_1/depthwise/BatchNorm/beta": "backbone.features.2.conv.1.1.bias",
        "MobilenetV2/expanded_conv_16/project/weights": "backbone.features.17.conv.2.weight",
        "MobilenetV2/expanded_conv_16/project/BatchNorm/moving_mean": "backbone.features.17.conv.3.running_mean",
        "image_pooling/weights": "aspp.image_pool.conv.weight",
        "image_pooling/BatchNorm/gamma": "aspp.image_pool.bn.weight",
        "aspp0/weights": "aspp.convs.0.conv.weight",
        "concat_projection/BatchNorm/moving_variance": "aspp.project.bn.running_var",
        "logits/semantic/weights": "classifier.weight",
        "logits/semantic/biases": "classifier.bias",
    }
    for tf_name, key in anchors.items():
        assert mnv2.used[tf_name] == key
    for tf_name, key in mnv2.used.items():
        want = expected_torch_value(tf_name, mnv2_tensors[tf_name])
        np.testing.assert_array_equal(state[key].numpy(), want, err_msg=f"{tf_name} -> {key}")
    assert sorted(mnv2.used.values()) == sorted(k for k in state if not k.endswith("num_batches_tracked"))
    # Every BatchNorm of the TF MobileNetV2 uses slim's epsilon; the head uses 1e-5.
    eps = {name: m.eps for name, m in mnv2.module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {v for k, v in eps.items() if k.startswith("backbone.")} == {1e-3}
    assert {v for k, v in eps.items() if not k.startswith("backbone.")} == {1e-5}


def _logits(model: torch.nn.Module, image_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(image_nhwc).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


def test_converted_model_computes_tensorflows_logits(mnv2) -> None:
    golden = np.load(FIXTURES / "deeplabv3_mnv2_tiny_logits.npz")
    ours = _logits(mnv2.module, golden["image"])
    ref = golden["logits"]
    # float32 rounding through 18 blocks; the slow tests pin the semantics in float64 at 1e-5.
    assert np.abs(ours - ref).max() <= 5e-3 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    # Without the TF behaviours (symmetric padding, eps 1e-5, align_corners=False) it is another function.
    plain = build_model(arch="deeplabv3", backbone="mobilenet_v2", num_classes=21, aspp_rates=()).eval()
    plain.load_state_dict(mnv2.module.state_dict())
    assert np.abs(_logits(plain, golden["image"]) - ref).max() > 0.05 * np.abs(ref).max()


def test_cli_converts_the_tarball_for_eval_and_load_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mnv2_voc.pt"
    assert cli(["convert", "tf", str(MNV2_TARBALL), "--out", str(out), "--reference-config", "mobilenetv2_voc"]) == 0
    printed = capsys.readouterr().out
    assert "MobilenetV2 -> mobilenet_v2, deeplabv3, 21 classes" in printed and "variables ignored: 9" in printed
    model, ckpt = load_model(out, num_classes=21, backbone="mobilenet_v2")
    assert model.config.tf_compat and ckpt["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert ckpt["classes"][15] == "person" and ckpt["converted_from"]["eval_crop_size"] == [513, 513]
    golden = np.load(FIXTURES / "deeplabv3_mnv2_tiny_logits.npz")
    np.testing.assert_array_equal(_logits(model, golden["image"]), _logits(convert_checkpoint(MNV2_TARBALL, reference_config="mobilenetv2_voc").module,
                                                                          golden["image"]))
    os8, _ = load_model(out, output_stride=8)  # the paper evaluates its best numbers at OS 8
    assert os8.backbone.output_stride == 8


def test_truncated_tarball_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz"
    broken.write_bytes(MNV2_TARBALL.read_bytes()[:50_000])
    with pytest.raises(ConversionError, match="not a readable tar archive .* download it again"):
        convert_checkpoint(broken)


def test_cli_lists_variables_and_reports_errors(tmp_path: Path, capsys) -> None:
    assert cli(["convert", "tf", str(MNV2_TARBALL), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "MobilenetV2/expanded_conv_16/project/weights\t[1, 1, 960, 320]" in listing
    # user errors: one "deeplab convert: error:" line, exit status 2 (as every subcommand)
    assert cli(["convert", "tf", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.startswith("deeplab convert: error: ") and err.count("\n") == 1
    assert cli(["convert", "tf", str(MNV2_TARBALL), "--out", str(tmp_path / "x.pt"), "--dataset", "cityscapes",
                "--output-stride", "16"]) == 2
    err = capsys.readouterr().err
    assert "has 21 classes, but --dataset cityscapes has 19" in err and err.startswith("deeplab convert: error: ")
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- errors that list names


def test_missing_variable_is_listed_with_its_expected_shape(mnv2_tensors) -> None:
    tensors = dict(mnv2_tensors)
    del tensors["MobilenetV2/expanded_conv_3/expand/weights"]
    with pytest.raises(ConversionError, match=r"missing variables \(1\):\s+MobilenetV2/expanded_conv_3/expand/"
                                              r"weights \(expected \[1, 1, 24, 144\]\)"):
        convert_source(DictSource(tensors), **MNV2)


def test_unknown_variable_is_listed(mnv2_tensors) -> None:
    tensors = dict(mnv2_tensors, **{"MobilenetV2/expanded_conv_3/squeeze/weights": np.zeros((1, 1, 4, 4), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected variables \(1\).*\s+MobilenetV2/expanded_conv_3/squeeze/"
                                              r"weights \[1, 1, 4, 4\]"):
        convert_source(DictSource(tensors), **MNV2)


def test_mis_shaped_variables_are_listed(mnv2_tensors) -> None:
    tensors = dict(mnv2_tensors)
    tensors["aspp0/weights"] = tensors["aspp0/weights"].transpose(3, 2, 0, 1)  # already OIHW
    tensors["MobilenetV2/Conv/depthwise_weights"] = np.zeros((3, 3, 3, 2), np.float32)  # and an extra one
    with pytest.raises(ConversionError) as info:
        convert_source(DictSource(tensors), **MNV2)
    message = str(info.value)
    assert "wrong shape (1):\n    aspp0/weights: [256, 320, 1, 1], expected [1, 1, 320, 256]" in message
    assert "MobilenetV2/Conv/depthwise_weights [3, 3, 3, 2]" in message


def test_unknown_architecture_is_an_error_naming_the_scopes(mnv2_tensors) -> None:
    # resnet_v1_101 became a known scope (models/backbones/resnet_tf.py); slim's resnet_v2 is not.
    tensors = {name.replace("MobilenetV2/", "resnet_v2_101/"): v for name, v in mnv2_tensors.items()}
    with pytest.raises(ConversionError, match=r"top-level scopes are \[.*'resnet_v2_101'.*\]"):
        convert_source(DictSource(tensors), **MNV2)


def test_a_mobilenet_decoder_is_refused(mnv2_tensors) -> None:
    tensors = dict(mnv2_tensors, **{"decoder/feature_projection0/weights": np.zeros((1, 1, 24, 48), np.float32)})
    with pytest.raises(ConversionError, match="layer_4/depthwise_output"):
        convert_source(DictSource(tensors), **MNV2)


# --------------------------------------------------------------------------- Xception (in memory)


def _xception_tensors(num_classes: int = 21, *, head: bool = True, seed: int = 0):
    """Random values for the Xception-65 variables of the name map (names are pinned by the
    anchors below and, against TensorFlow itself, by the slow tests)."""
    model = build_model(backbone="xception65", num_classes=num_classes, tf_compat=True)
    state = model.state_dict()
    rules = backbone_rules("xception65", "xception_65")
    if head:
        rules += head_rules(atrous_branches=3, image_pooling=True, decoder=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for rule in rules:
        shape = tf_layout(rule.kind, state[rule.key].shape)
        if rule.key == "classifier.weight":
            shape = shape[:3] + (num_classes,)
        elif rule.key == "classifier.bias":
            shape = (num_classes,)
        tensors[rule.tf_name] = rng.standard_normal(shape).astype(np.float32)
    return tensors


@pytest.fixture(scope="module")
def xception_tensors():
    return _xception_tensors()


def test_xception65_deeplabv3plus_anchors(xception_tensors) -> None:
    conv = convert_source(DictSource(xception_tensors), **XCEPTION)
    cfg = conv.config
    assert (cfg.arch, cfg.backbone, cfg.aspp_rates, cfg.separable, cfg.tf_compat) == (
        "deeplabv3plus", "xception65", None, True, True)
    state = conv.module.state_dict()
    unit = "xception_65/{}/xception_module/"
    anchors = {
        "xception_65/entry_flow/conv1_1/weights": "backbone.stem.0.conv.weight",
        "xception_65/entry_flow/conv1_2/BatchNorm/beta": "backbone.stem.1.bn.bias",
        unit.format("entry_flow/block1/unit_1") + "shortcut/weights": "backbone.blocks.0.shortcut.conv.weight",
        unit.format("entry_flow/block2/unit_1") + "separable_conv2_pointwise/weights":
            "backbone.blocks.1.stack.conv2.conv_pw.weight",
        unit.format("middle_flow/block1/unit_1") + "separable_conv1_depthwise/depthwise_weights":
            "backbone.blocks.3.stack.conv1.conv_dw.weight",
        unit.format("middle_flow/block1/unit_16") + "separable_conv3_depthwise/BatchNorm/moving_mean":
            "backbone.blocks.18.stack.conv3.bn_dw.running_mean",
        unit.format("exit_flow/block1/unit_1") + "shortcut/BatchNorm/gamma": "backbone.blocks.19.shortcut.bn.weight",
        unit.format("exit_flow/block2/unit_1") + "separable_conv3_pointwise/BatchNorm/moving_variance":
            "backbone.blocks.20.stack.conv3.bn_pw.running_var",
        "aspp1_depthwise/depthwise_weights": "aspp.convs.1.depthwise.conv.weight",
        "aspp3_pointwise/BatchNorm/gamma": "aspp.convs.3.pointwise.bn.weight",
        "decoder/feature_projection0/weights": "decoder.low_level.conv.weight",
        "decoder/decoder_conv0_depthwise/depthwise_weights": "decoder.fuse.0.depthwise.conv.weight",
        "decoder/decoder_conv1_pointwise/BatchNorm/moving_mean": "decoder.fuse.1.pointwise.bn.running_mean",
    }
    for tf_name, key in anchors.items():
        assert conv.used[tf_name] == key
        np.testing.assert_array_equal(state[key].numpy(), expected_torch_value(tf_name, xception_tensors[tf_name]))
    # A depthwise element, spelled out: TF w[kh, kw, c, 0] is PyTorch w[c, 0, kh, kw].
    w = xception_tensors["aspp2_depthwise/depthwise_weights"]
    assert state["aspp.convs.2.depthwise.conv.weight"][700, 0, 0, 2] == torch.tensor(w[0, 2, 700, 0])
    eps = {n: m.eps for n, m in conv.module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {v for k, v in eps.items() if k.startswith("backbone.")} == {1e-3}


def test_ade20k_drops_the_ignored_other_class(xception_tensors) -> None:
    tensors = dict(xception_tensors)
    tensors["logits/semantic/weights"] = np.random.default_rng(1).standard_normal((1, 1, 256, 151)).astype(np.float32)
    tensors["logits/semantic/biases"] = np.arange(151, dtype=np.float32)
    conv = convert_source(DictSource(tensors), reference_config="xception65_ade20k")
    assert conv.dataset == "ade20k" and conv.config.num_classes == 150 and conv.dropped_classes == 1
    assert conv.classes[0] == "wall"
    np.testing.assert_array_equal(conv.module.classifier.bias.detach().numpy(), np.arange(1, 151))
    np.testing.assert_array_equal(conv.module.classifier.weight.detach().numpy()[:, :, 0, 0],
                                  tensors["logits/semantic/weights"][0, 0, :, 1:].T)


def test_imagenet_xception_becomes_a_pretrained_backbone_file(tmp_path: Path) -> None:
    tensors = _xception_tensors(head=False, seed=3)
    tensors["xception_65/logits/weights"] = np.zeros((1, 1, 2048, 1001), np.float32)
    tensors["xception_65/logits/biases"] = np.zeros(1001, np.float32)
    tensors["global_step"] = np.int64(1)
    conv = convert_source(DictSource(tensors))
    assert conv.config is None and set(conv.ignored) == {"xception_65/logits/weights", "xception_65/logits/biases",
                                                         "global_step"}
    path = tmp_path / "tf_xception_65.pth"
    torch.save(conv.state_dict(), path)
    model = build_model(backbone="xception65", num_classes=21, pretrained_backbone=path)
    key = "stem.0.conv.weight"
    np.testing.assert_array_equal(model.backbone.state_dict()[key].numpy(),
                                  expected_torch_value("x/weights", tensors["xception_65/entry_flow/conv1_1/weights"]))


def test_mobilenet_backbone_only_is_refused(mnv2_tensors) -> None:
    with pytest.raises(ConversionError, match="MobileNetV2 backbone-only files are not supported"):
        convert_source(DictSource(mnv2_tensors), backbone_only=True)


# --------------------------------------------------------------------------- the TF behaviours in the model


@pytest.mark.parametrize("size, kernel, stride, dilation, expected", [
    (8, 3, 2, 1, (0, 1)),  # even: TF pads only after
    (9, 3, 2, 1, (1, 1)),  # odd: symmetric
    (8, 1, 2, 1, (0, 0)),
    (7, 3, 1, 2, (2, 2)),  # stride 1: PyTorch's symmetric dilation * (k - 1) / 2
    (11, 5, 3, 1, (1, 2)),  # an odd total: the extra pixel goes after
])
def test_tf_same_padding(size, kernel, stride, dilation, expected) -> None:
    assert tf_same_padding(size, kernel, stride, dilation) == expected
    out = -(-size // stride)
    assert (size + sum(expected) - dilation * (kernel - 1) - 1) // stride + 1 == out


def test_conv2d_same_pads_bottom_right_on_even_sizes() -> None:
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, 3, 2, 0, bias=False)
    x = torch.randn(1, 3, 8, 9)
    manual = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), manual, rtol=0, atol=0)
    with pytest.raises(ValueError, match="padding=0"):
        Conv2dSame(3, 4, 3, 2, 1)


def test_tf_compat_changes_behaviour_not_names() -> None:
    plain, tf = build_backbone("mobilenet_v2"), build_backbone("mobilenet_v2", tf_compat=True)
    assert list(plain.state_dict()) == list(tf.state_dict())
    assert {m.eps for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}
    assert sum(isinstance(m, Conv2dSame) for m in plain.modules()) == 0
    assert sum(isinstance(m, Conv2dSame) for m in tf.modules()) == 4  # stem + three stride-2 units at OS 16
    assert plain.normalization.mean == (0.485, 0.456, 0.406) and tf.normalization.mean == (0.5, 0.5, 0.5)
    # Xception already computes TF's function (checked against TF in test_convert_tf.py): same network.
    assert repr(build_backbone("xception41", output_stride=32)) == repr(
        build_backbone("xception41", output_stride=32, tf_compat=True))


def test_fixture_values_are_what_the_generator_wrote(mnv2_tensors) -> None:
    # Guards the committed tarball: values are the generator's per-tensor 61-value tiles.
    name = "MobilenetV2/expanded_conv_5/depthwise/BatchNorm/moving_variance"
    tile = np.random.default_rng(zlib.crc32(name.encode())).uniform(0.5, 1.5, 61).astype(np.float32)
    np.testing.assert_array_equal(mnv2_tensors[name], np.resize(tile, 192))


def _tf_tensors_of(model: torch.nn.Module, rules) -> dict:
    """TF-layout arrays holding a model's own values (the inverse of the conversion)."""
    state = model.state_dict()
    out = {}
    for rule in rules:
        value = state[rule.key].numpy()
        if value.ndim == 4 and rule.tf_name.endswith("depthwise_weights"):
            value = value.transpose(2, 3, 0, 1)
        elif value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        out[rule.tf_name] = value
    return out


@pytest.mark.slow  # ~15 s: eval, predict and a TorchScript export with its parity check
def test_converted_checkpoint_is_ready_for_eval_predict_and_export(tmp_path: Path, capsys) -> None:
    from deeplab.checkpoint import save_checkpoint

    from tests.data_fixtures import make_voc

    # A well-conditioned network (PyTorch's initialisation), as TF variables. (The fixture tarball's
    # synthetic weights amplify float32 rounding to ~1e-3, beyond export's BN-folding check.)
    torch.manual_seed(0)
    source = build_model(arch="deeplabv3", backbone="mobilenet_v2", num_classes=21, aspp_rates=(), tf_compat=True)
    rules = backbone_rules("mobilenet_v2", "MobilenetV2") + head_rules(atrous_branches=0, image_pooling=True,
                                                                       decoder=False)
    conv = convert_source(DictSource(_tf_tensors_of(source, rules)), **MNV2)
    for key, value in source.state_dict().items():  # the round trip is exact
        assert torch.equal(conv.module.state_dict()[key], value), key
    ckpt = save_checkpoint(tmp_path / "mnv2_voc.pt", conv.checkpoint_payload(source="test"))
    root = make_voc(tmp_path / "data", {"val": ["a", "b"]})
    assert cli(["eval", "--checkpoint", str(ckpt), "--data-root", str(root), "--pad-to", "65", "65",
                "--out", str(tmp_path / "eval"), "--num-workers", "0", "--no-progress"]) == 0
    assert '"dataset": "voc"' in (tmp_path / "eval" / "report.json").read_text()  # from the checkpoint
    images = sorted((root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))
    assert cli(["predict", str(images[0]), "--checkpoint", str(ckpt), "--out", str(tmp_path / "pred"),
                "--quiet"]) == 0
    assert list((tmp_path / "pred").glob("*.png"))
    assert cli(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.ts.pt"),
                "--parity-size", "65"]) == 0
    capsys.readouterr()
