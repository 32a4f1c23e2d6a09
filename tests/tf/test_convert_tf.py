"""deeplab.tf against real TensorFlow (slow; tensorflow-cpu comes with the ``test`` extra).

A separate process (``python tests/tf_reference.py DIR``, so TensorFlow never shares threads or a
fork with the test run) builds the TF reference's networks from TF ops, names their variables by
the reference's scopes, saves them with TensorFlow's own ``Saver`` and records TensorFlow's
outputs. Then:

- our tensor-bundle reader returns exactly what ``tf.train.load_checkpoint`` returns;
- converted models compute TensorFlow's logits: Xception-65 DeepLabv3+ (OS 16 and 8, odd and
  even sizes), MobileNetV2 DeepLabv3 (OS 8/16/32, odd and even), ADE20K's 151 -> 150 classes, and
  the ImageNet Xception-41/65/71 backbones through ``pretrained_backbone``. These comparisons run
  in float64 (TF's bilinear resize still rounds to float32, so agreement is ~1e-7 relative); a wrong
  name, transpose, padding or epsilon shows up as 1e-3 or worse;
- every head combination the reference's model.py builds for our backbones (tf_reference.HEAD_CASES:
  separable or regular ASPP - ``aspp{i}/weights`` - and decoder - slim.repeat's
  ``decoder_conv0/decoder_conv0_{1,2}`` -, with or without ASPP 3x3 branches, decoder, image
  pooling; ResNet plain and beta, Xception-41, MobileNetV2) converts and computes TensorFlow's
  logits from raw 0..255 pixels through the reference's preprocess_fn (the plain ResNet's
  _MEAN_RGB); a ResNet-beta model without its settings is refused, with its preset it records them;
- layer by layer, in float32 against TF's own ops, to 1e-5: strided "SAME" convs on even and odd
  sizes, Xception's fixed-padding strided separable convs, atrous separable convs with BatchNorm,
  bilinear resizes with align_corners, image pooling as a window average over the crop.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from torch import nn

from deeplab.checkpoint import load_model
from deeplab.cli.main import main as cli
from deeplab.config import ModelConfig
from deeplab.models import build_model, build_model_from_config
from deeplab.models.aspp import ImagePooling
from deeplab.models.backbones.mobilenetv2 import ConvBNReLU6
from deeplab.models.backbones.xception import XceptionSeparableConv2d
from deeplab.nn.layers import SeparableConv2d, resize
from deeplab.tf import CheckpointReader, convert_checkpoint
from deeplab.tf.names import CONV, DEPTHWISE, to_torch
from tests.helpers import run_tf_reference
from tests.tf_reference import HEAD_CASES, LAYER_CASES

pytestmark = [pytest.mark.slow, pytest.mark.spawn]  # real TensorFlow runs in its own process



@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Dict:
    """Run the TensorFlow side once; returns its directory and outputs."""
    return run_tf_reference(tmp_path_factory.mktemp("tf_reference"))


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def run(model: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(nchw(image)).permute(0, 2, 3, 1).numpy()


def rel_err(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def rebuilt(config: ModelConfig, model: nn.Module, **overrides) -> nn.Module:
    other = build_model_from_config(config, **overrides).eval()
    other.load_state_dict(model.state_dict())
    return other.to(next(model.parameters()).dtype)


def read_json(path: Path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- Xception-65 DeepLabv3+ (VOC)


def test_reader_returns_what_tensorflow_reads(ref) -> None:
    listing = read_json(ref["dir"] / "xception_voc" / "tf_reader.json")
    ours = CheckpointReader(ref["dir"] / "xception_voc" / "model.ckpt-30000")
    assert set(ours.entries) == set(listing)
    assert len(listing) == 732 + 7  # Xception-65 DeepLabv3+ variables + global_step and six slots
    for name, theirs in listing.items():
        value = ours.read(name)
        assert list(value.shape) == theirs["shape"] and str(value.dtype) == theirs["dtype"], name
        assert hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest() == theirs["sha256"], name


def test_xception65_deeplabv3plus_computes_tensorflows_logits(ref) -> None:
    conv = convert_checkpoint(ref["dir"] / "xception_voc" / "model.ckpt-30000", reference_config="xception65_voc")
    assert set(conv.ignored) == set(read_json(ref["dir"] / "xception_voc" / "extra.json"))
    assert set(conv.used) == set(read_json(ref["dir"] / "xception_voc" / "variables.json"))  # all of them
    cfg = conv.config
    assert (cfg.arch, cfg.backbone, cfg.num_classes, cfg.aspp_rates, cfg.tf_compat) == (
        "deeplabv3plus", "xception65", 21, None, True)
    model = conv.module.double()
    for size, output_stride in ((33, 16), (34, 8)):
        key = f"xception_voc/f64_{size}_{output_stride}"
        ours = model if output_stride == 16 else rebuilt(cfg, model, output_stride=output_stride)
        assert rel_err(run(ours, ref[f"{key}/image"]), ref[f"{key}/logits"]) < 1e-5, key
    # float32 against TF's float32 graph (fused BatchNorm): the same up to rounding, which 65 layers
    # of random weights amplify to ~1e-3 (the float64 runs above show it is rounding).
    model = model.float()
    ours32 = run(model, ref["xception_voc/image"])
    assert rel_err(ours32, ref["xception_voc/logits"]) < 2e-2
    assert (ours32.argmax(-1) == ref["xception_voc/logits"].argmax(-1)).mean() > 0.97
    # The TF behaviours matter: the same weights without tf_compat (align_corners=False) miss.
    plain = rebuilt(cfg, model, tf_compat=False)
    assert rel_err(run(plain, ref["xception_voc/image"]), ref["xception_voc/logits"]) > 5e-2


def test_cli_converts_a_model_zoo_tarball_and_both_readers_agree(ref, tmp_path: Path) -> None:
    prefix = ref["dir"] / "xception_voc" / "model.ckpt-30000"
    tarball = tmp_path / "deeplabv3_pascal_train_aug_2018_01_04.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=1) as archive:
        for path in sorted(prefix.parent.glob("model.ckpt-30000.*")) + [prefix.parent / "checkpoint"]:
            archive.add(path, arcname=f"deeplabv3_pascal_train_aug/{path.name}")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert cli(["convert", "tf", str(tarball), "--out", str(a), "--dataset", "voc", "--reference-config",
                "xception65_voc"]) == 0
    # TensorFlow's reader, in its own process like every TensorFlow use here.
    result = subprocess.run([sys.executable, "-m", "deeplab.cli.main", "convert", "tf", str(prefix), "--out", str(b),
                             "--reader", "tensorflow", "--reference-config", "xception65_voc"], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-3000:]
    model_a, ckpt_a = load_model(a, num_classes=21, backbone="xception65")
    state_b = torch.load(b, weights_only=True)["model"]
    assert state_b.keys() == model_a.state_dict().keys()
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, state_b[key]), key
    assert ckpt_a["converted_from"]["dataset"] == "voc" and ckpt_a["classes"][-1] == "tvmonitor"
    assert rel_err(run(model_a, ref["xception_voc/image"]), ref["xception_voc/logits"]) < 2e-2


# --------------------------------------------------------------------------- MobileNetV2 DeepLabv3, ADE20K


def test_mobilenet_v2_deeplabv3_computes_tensorflows_logits(ref) -> None:
    conv = convert_checkpoint(ref["dir"] / "mnv2_cityscapes",  # a directory with one checkpoint
                              reference_config="mobilenetv2_cityscapes")
    assert conv.dataset == "cityscapes" and conv.classes[-1] == "bicycle" and conv.config.aspp_rates == ()
    assert set(conv.used) == set(read_json(ref["dir"] / "mnv2_cityscapes" / "variables.json"))
    model = conv.module.double()
    for size, output_stride in ((64, 16), (65, 16), (66, 8), (63, 32)):
        key = f"mnv2/{size}_{output_stride}"
        ours = model if output_stride == 16 else rebuilt(conv.config, model, output_stride=output_stride)
        assert rel_err(run(ours, ref[f"{key}/image"]), ref[f"{key}/logits"]) < 1e-5, key


def test_ade20k_keeps_the_150_real_classes(ref, tmp_path: Path) -> None:
    out = tmp_path / "ade.pt"
    assert cli(["convert", "tf", str(ref["dir"] / "mnv2_ade20k" / "model.ckpt"), "--out", str(out),
                "--dataset", "ade20k", "--output-stride", "16"]) == 0
    model, ckpt = load_model(out, num_classes=150)
    assert ckpt["classes"][:3] == ["wall", "building", "sky"] and ckpt["converted_from"]["dropped_classes"] == 1
    assert rel_err(run(model.double(), ref["ade20k/image"]), ref["ade20k/logits"][..., 1:]) < 1e-5


# --------------------------------------------------------------------------- ImageNet backbones


@pytest.mark.parametrize("variant", ["xception_41", "xception_65", "xception_71"])
def test_imagenet_xception_checkpoint_becomes_pretrained_backbone(ref, variant: str, tmp_path: Path) -> None:
    out = tmp_path / f"tf_{variant}.pth"
    assert cli(["convert", "tf", str(ref["dir"] / f"imagenet_{variant}" / "model.ckpt"), "--out", str(out)]) == 0
    model = build_model(backbone=variant.replace("_", ""), num_classes=21, pretrained_backbone=out)
    model = model.double().eval()
    with torch.no_grad():
        feats = model.backbone(nchw(ref[f"imagenet_{variant}/image"]))
    assert rel_err(feats["out"].permute(0, 2, 3, 1).numpy(), ref[f"imagenet_{variant}/out"]) < 1e-5
    # The decoder's low-level feature is the reference's separable_conv2_pointwise end point.
    assert rel_err(feats["low_level"].permute(0, 2, 3, 1).numpy(), ref[f"imagenet_{variant}/low_level"]) < 1e-5


# --------------------------------------------------------------------------- layer by layer, float32, 1e-5


def _load_bn(bn: nn.BatchNorm2d, ref, prefix: str) -> None:
    for leaf, attr in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                       ("moving_variance", "running_var")):
        getattr(bn, attr).data.copy_(torch.from_numpy(ref[f"{prefix}/{leaf}"]))


def _set(conv: nn.Conv2d, kind: str, tf_value: np.ndarray) -> None:
    conv.weight.data.copy_(torch.from_numpy(to_torch(kind, tf_value)))


def _close(ours: torch.Tensor, reference: np.ndarray) -> None:
    with torch.no_grad():
        np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", LAYER_CASES["strided_same"])
def test_strided_same_conv_matches_tensorflow(ref, size: int) -> None:
    key = f"strided_same_{size}"
    x = nchw(ref[f"{key}/x"])  # (1, 8, size, size + 1): an even and an odd side
    layer = ConvBNReLU6(8, 16, 3, stride=2, tf_compat=True).eval()
    _set(layer[0], CONV, ref[f"{key}/w"])
    _load_bn(layer[1], ref, f"{key}/bn")
    _close(layer(x), ref[f"{key}/conv"])
    dw = ConvBNReLU6(8, 8, 3, stride=2, groups=8, tf_compat=True).eval()  # MobileNetV2's strided units
    _set(dw[0], DEPTHWISE, ref[f"{key}/wd"])
    _load_bn(dw[1], ref, f"{key}/bnd")
    _close(dw(x), ref[f"{key}/dw"])
    # PyTorch's symmetric padding is another function on the even side.
    plain = ConvBNReLU6(8, 16, 3, stride=2).eval()
    plain.load_state_dict(layer.state_dict())
    plain[1].eps = 1e-3
    with torch.no_grad():
        assert np.abs(plain(x).permute(0, 2, 3, 1).numpy() - ref[f"{key}/conv"]).max() > 1e-2


@pytest.mark.parametrize("size", LAYER_CASES["xception_strided"])
def test_xception_strided_separable_conv_matches_fixed_padding(ref, size: int) -> None:
    key = f"xception_strided_{size}"
    layer = XceptionSeparableConv2d(8, 12, stride=2).eval()
    _set(layer.conv_dw, DEPTHWISE, ref[f"{key}/wd"])
    _set(layer.conv_pw, CONV, ref[f"{key}/wp"])
    _load_bn(layer.bn_dw, ref, f"{key}/bnd")
    _load_bn(layer.bn_pw, ref, f"{key}/bnp")
    _close(layer(nchw(ref[f"{key}/x"])), ref[f"{key}/out"])


@pytest.mark.parametrize("rate", LAYER_CASES["atrous_separable"])
def test_atrous_separable_conv_with_batchnorm_matches_tensorflow(ref, rate: int) -> None:
    key = f"atrous_separable_{rate}"
    layer = SeparableConv2d(16, 24, 3, dilation=rate).eval()
    _set(layer.depthwise.conv, DEPTHWISE, ref[f"{key}/wd"])
    _set(layer.pointwise.conv, CONV, ref[f"{key}/wp"])
    _load_bn(layer.depthwise.bn, ref, f"{key}/bnd")
    _load_bn(layer.pointwise.bn, ref, f"{key}/bnp")
    _close(layer(nchw(ref[f"{key}/x"])), ref[f"{key}/out"])


@pytest.mark.parametrize("index, sizes", list(enumerate(LAYER_CASES["resize"])))
def test_bilinear_resize_matches_tensorflows_align_corners(ref, index: int, sizes) -> None:
    _, dst = sizes
    _close(resize(nchw(ref[f"resize_{index}/x"]), dst, align_corners=True), ref[f"resize_{index}/out"])


@pytest.mark.parametrize("crop, output_stride", LAYER_CASES["image_pooling"])
def test_image_pooling_is_the_window_average_over_the_crop(ref, crop: int, output_stride: int) -> None:
    key = f"image_pooling_{crop}_{output_stride}"
    layer = ImagePooling(32, 16).eval()
    _set(layer.conv, CONV, ref[f"{key}/w"])
    _load_bn(layer.bn, ref, f"{key}/bn")
    _close(layer(nchw(ref[f"{key}/x"])), ref[f"{key}/out"])


# --------------------------------------------------------------------------- every head model.py builds


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Dict:
    """tests/tf_reference.py HEAD_CASES: checkpoints, raw 0..255 images and TF's float64 logits."""
    return run_tf_reference(tmp_path_factory.mktemp("tf_heads"), "heads")


OUR_BACKBONE = {"MobilenetV2": "mobilenet_v2", "xception_41": "xception41", "xception_65": "xception65"}


@pytest.mark.parametrize("case", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_head_combination_computes_tensorflows_logits_from_pixels(heads, case) -> None:
    """Raw 0..255 pixels through our checkpoint's normalisation and model vs the reference's
    preprocess_fn and network: every ASPP/decoder naming, and the plain ResNet's _MEAN_RGB."""
    from deeplab.tf import ReferenceSettings

    tag, variant, classes, separable, rates, decoder, pooling, grid, output_stride = case
    settings = ReferenceSettings(output_stride=output_stride, atrous_rates=rates,
                                 multi_grid=None if variant == "MobilenetV2" else grid,
                                 decoder_output_stride=4 if decoder else None)
    conv = convert_checkpoint(heads["dir"] / tag / "model.ckpt", settings=settings)
    assert set(conv.used) == set(read_json(heads["dir"] / tag / "variables.json"))  # every variable used
    cfg = conv.config
    assert cfg.backbone == OUR_BACKBONE.get(variant, variant)
    assert (cfg.separable, cfg.arch, cfg.image_pooling, cfg.num_classes) == (
        separable, "deeplabv3plus" if decoder else "deeplabv3", pooling, classes)
    model = conv.module.double()
    norm = model.normalization
    pixels = heads[f"{tag}/pixels"]
    x = (pixels / 255.0 - np.array(norm.mean)) / np.array(norm.std)  # what predict/eval feed the model
    ours = run(model, x)
    # float64 on both sides (TF's bilinear resize rounds to float32): ~1e-7; a wrong mean is ~1e-1.
    assert rel_err(ours, heads[f"{tag}/logits"]) < 1e-5, tag


def test_resnet_model_without_its_settings_is_refused_and_the_preset_records_them(heads, tmp_path: Path,
                                                                                 capsys) -> None:
    """Issue 21: multi-grid is never guessed. The paper's ResNet-101-beta DeepLabv3+ (regular ASPP and
    decoder), zoo-like tarball: without settings an error naming them; with the preset it converts,
    records them and computes TensorFlow's logits."""
    tag = "r101b_v3p_regular"
    tarball = tmp_path / "deeplabv3_r101b_pascal.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=1) as archive:
        for path in sorted((heads["dir"] / tag).glob("model.ckpt.*")):
            archive.add(path, arcname=f"train/{path.name}")
    out = tmp_path / "r101b.pt"
    assert cli(["convert", "tf", str(tarball), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "multi-grid" in err and "--reference-config resnet_v1_101_beta_voc" in err and not out.exists()
    assert cli(["convert", "tf", str(tarball), "--out", str(out), "--reference-config", "resnet_v1_101_beta_voc"]) == 0
    assert "setting multi_grid: [1, 2, 4] (reference config resnet_v1_101_beta_voc)" in capsys.readouterr().out
    model, ckpt = load_model(out)
    assert ckpt["config"]["multi_grid"] == [1, 2, 4] and ckpt["config"]["separable"] is False
    assert ckpt["converted_from"]["settings"]["multi_grid"] == [1, 2, 4]
    assert ckpt["converted_from"]["reference_config"] == "resnet_v1_101_beta_voc"
    norm = model.normalization
    x = (heads[f"{tag}/pixels"] / 255.0 - np.array(norm.mean)) / np.array(norm.std)
    assert rel_err(run(model.double(), x), heads[f"{tag}/logits"]) < 1e-5
    # The same weights with multi-grid forgotten: another function.
    forgotten = rebuilt(model.config, model.double(), multi_grid=None)
    assert rel_err(run(forgotten, x), heads[f"{tag}/logits"]) > 1e-2
