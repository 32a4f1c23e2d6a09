"""Every graph the TF reference's ``model.py`` builds for our backbones converts (fast, no TensorFlow).

The head's variable names are spelled out here from tensorflow/models ``research/deeplab/model.py``
(independently of :mod:`deeplab.tf.names`):

- ``extract_features``: ``image_pooling``, ``aspp0`` (1x1), ``aspp{i}`` for each atrous rate -
  ``split_separable_conv2d`` (``aspp{i}_depthwise`` / ``aspp{i}_pointwise``) when
  ``aspp_with_separable_conv``, else ``slim.conv2d(features, depth, 3, rate=rate, scope=aspp{i})``
  (``aspp{i}/weights`` + ``BatchNorm``) - and ``concat_projection``;
- ``refine_by_decoder``: ``decoder/feature_projection0``, then ``_decoder_with_concat_merge``:
  ``split_separable_conv2d`` under ``decoder_conv0`` / ``decoder_conv1`` when
  ``decoder_use_separable_conv``, else ``slim.repeat(..., 2, slim.conv2d, depth, 3,
  scope='decoder_conv0')``, whose two convs slim names ``decoder_conv0/decoder_conv0_1`` and
  ``decoder_conv0/decoder_conv0_2``;
- ``get_branch_logits``: ``logits/semantic`` (weights + biases).

The slow counterparts (tests/test_convert_tf.py) compare the converted models' logits with
TensorFlow's own for graphs built with these names.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from deeplab.config import ModelConfig
from deeplab.models import build_backbone, build_model_from_config
from deeplab.tf import ConversionError, DictSource, convert_source, recognise
from deeplab.tf.names import backbone_rules

BN = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var"))


def _conv_bn(tf_scope: str, conv_key: str, bn_key: str, depthwise: bool = False) -> List[Tuple[str, str]]:
    leaf = "depthwise_weights" if depthwise else "weights"
    return [(f"{tf_scope}/{leaf}", f"{conv_key}.weight")] + [
        (f"{tf_scope}/BatchNorm/{tf_leaf}", f"{bn_key}.{ours}") for tf_leaf, ours in BN]


def reference_head_names(*, separable: bool, branches: int, decoder: bool, image_pooling: bool) -> List[Tuple[str, str]]:
    """(TF name, our key) of every head variable, as model.py names them."""
    names: List[Tuple[str, str]] = []
    if image_pooling:
        names += _conv_bn("image_pooling", "aspp.image_pool.conv", "aspp.image_pool.bn")
    names += _conv_bn("aspp0", "aspp.convs.0.conv", "aspp.convs.0.bn")
    for i in range(1, branches + 1):
        ours = f"aspp.convs.{i}"
        if separable:
            names += _conv_bn(f"aspp{i}_depthwise", f"{ours}.depthwise.conv", f"{ours}.depthwise.bn", depthwise=True)
            names += _conv_bn(f"aspp{i}_pointwise", f"{ours}.pointwise.conv", f"{ours}.pointwise.bn")
        else:
            names += _conv_bn(f"aspp{i}", f"{ours}.conv", f"{ours}.bn")
    names += _conv_bn("concat_projection", "aspp.project.conv", "aspp.project.bn")
    if decoder:
        names += _conv_bn("decoder/feature_projection0", "decoder.low_level.conv", "decoder.low_level.bn")
        for j in (0, 1):
            ours = f"decoder.fuse.{j}"
            if separable:
                names += _conv_bn(f"decoder/decoder_conv{j}_depthwise", f"{ours}.depthwise.conv",
                                  f"{ours}.depthwise.bn", depthwise=True)
                names += _conv_bn(f"decoder/decoder_conv{j}_pointwise", f"{ours}.pointwise.conv",
                                  f"{ours}.pointwise.bn")
            else:
                names += _conv_bn(f"decoder/decoder_conv0/decoder_conv0_{j + 1}", f"{ours}.conv", f"{ours}.bn")
    names += [("logits/semantic/weights", "classifier.weight"), ("logits/semantic/biases", "classifier.bias")]
    return names


def to_tf(value: torch.Tensor, depthwise: bool) -> np.ndarray:
    array = value.detach().numpy()
    if array.ndim == 4:  # OIHW -> HWIO; a depthwise [C, 1, kh, kw] -> [kh, kw, C, 1]
        return array.transpose(2, 3, 0, 1) if depthwise else array.transpose(2, 3, 1, 0)
    return array


def reference_tensors(config: ModelConfig, seed: int = 0) -> Tuple[Dict[str, np.ndarray], Dict[str, torch.Tensor]]:
    """A random model of ``config`` written under the reference's names; returns (tensors, our state)."""
    model = build_model_from_config(config)
    torch.manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            value.copy_(torch.rand_like(value) + 0.5 if key.endswith("running_var") else torch.randn_like(value))
    # feature_extractor.name_scope: the reference's scope of each model_variant.
    scope = {"xception41": "xception_41", "xception65": "xception_65", "xception71": "xception_71",
             "mobilenet_v2": "MobilenetV2"}.get(config.backbone, config.backbone.replace("_beta", ""))
    pairs = [(r.tf_name, r.key) for r in backbone_rules(config.backbone, scope)]
    pairs += reference_head_names(separable=config.separable, branches=3 if config.aspp_rates is None else len(config.aspp_rates),
                                  decoder=config.arch == "deeplabv3plus", image_pooling=config.image_pooling)
    tensors = {tf_name: to_tf(state[key], "depthwise" in tf_name) for tf_name, key in pairs}
    tensors["global_step"] = np.int64(1)
    return tensors, state


def _config(*, backbone: str = "resnet_v1_50", separable: bool, rates, decoder: bool, pooling: bool,
            multi_grid=(1, 2, 4)) -> ModelConfig:
    return ModelConfig(arch="deeplabv3plus" if decoder else "deeplabv3", backbone=backbone, num_classes=3,
                       separable=separable, aspp_rates=rates, image_pooling=pooling,
                       multi_grid=None if backbone == "mobilenet_v2" else multi_grid, tf_compat=True)


# --------------------------------------------------------------------------- the three defects of issue 21


def test_regular_aspp_and_slim_repeat_decoder_names_are_recognised() -> None:
    """The paper's Table 3 ResNet row: regular ASPP (aspp{i}/weights) and decoder (slim.repeat)."""
    tensors, _ = reference_tensors(_config(backbone="resnet_v1_101_beta", separable=False, rates=(6, 12, 18),
                                           decoder=True, pooling=True))
    assert "aspp1/weights" in tensors and "decoder/decoder_conv0/decoder_conv0_2/weights" in tensors
    rec = recognise({k: tuple(np.shape(v)) for k, v in tensors.items()})
    assert (rec.backbone, rec.separable, rec.atrous_branches, rec.decoder, rec.image_pooling) == (
        "resnet_v1_101_beta", False, 3, True, True)


@pytest.mark.parametrize("backbone", ["resnet_v1_50", "resnet_v1_101"])
def test_plain_resnet_takes_the_reference_mean(backbone: str) -> None:
    """feature_extractor.py: _MEAN_RGB = [123.15, 115.90, 103.06], subtracted from 0..255 pixels."""
    norm = build_backbone(backbone).normalization
    assert [round(m * 255, 6) for m in norm.mean] == [123.15, 115.90, 103.06]
    assert list(norm.std) == pytest.approx([1 / 255] * 3)
    assert build_backbone(backbone + "_beta").normalization.mean == (0.5, 0.5, 0.5)  # [-1, 1]: unaffected


def test_multi_grid_is_never_guessed_for_a_resnet_model() -> None:
    """The weights cannot reveal multi-grid: converting without it must fail, naming it."""
    tensors, _ = reference_tensors(_config(backbone="resnet_v1_101_beta", separable=True, rates=(6, 12, 18),
                                           decoder=True, pooling=True))
    with pytest.raises(ConversionError, match=r"multi.grid"):
        convert_source(DictSource(tensors))


def test_convert_help_describes_multi_grid_per_backbone(capsys) -> None:
    from deeplab.cli.main import main as cli

    with pytest.raises(SystemExit) as exc:
        cli(["convert", "tf", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--reference-config" in out
    assert "block4" in out and "exit_flow/block2" in out and "MobileNetV2" in out  # multi-grid per backbone


# --------------------------------------------------------------------------- every combination, exactly

RESNET_SETTINGS = dict(output_stride=16, atrous_rates=(6, 12, 18), multi_grid=(1, 2, 4), decoder_output_stride=4)
# All 16 in the slow run; the default run keeps the paper's two (regular with everything: its ResNet
# rows; separable with nothing but the 1x1 branch) - each ResNet-50 model takes seconds to fill.
COMBINATIONS = [
    pytest.param(s, r, d, p, id=f"{'sep' if s else 'reg'}-{len(r)}br-{'dec' if d else 'nodec'}-{'pool' if p else 'nopool'}",
                 marks=() if (not s and r and d and p) or (s and not r and not d and not p) else pytest.mark.slow)
    for s, r, d, p in itertools.product([True, False], [(6, 12, 18), ()], [True, False], [True, False])
]


@pytest.mark.parametrize("separable, rates, decoder, pooling", COMBINATIONS)
def test_every_head_combination_round_trips_exactly(separable: bool, rates, decoder: bool, pooling: bool) -> None:
    from deeplab.tf import ReferenceSettings

    config = _config(separable=separable, rates=rates, decoder=decoder, pooling=pooling)
    tensors, state = reference_tensors(config)
    settings = ReferenceSettings(**{**RESNET_SETTINGS, "atrous_rates": rates,
                                    "decoder_output_stride": 4 if decoder else 0})
    conv = convert_source(DictSource(tensors), settings=settings)
    assert set(conv.used) == set(tensors) - {"global_step"}  # every variable used, by its reference name
    # No 3x3 conv at all (no branch, no decoder): the switch changes nothing and stays at its default.
    assert conv.config.separable is (separable or not (rates or decoder)) and conv.config.image_pooling is pooling
    assert conv.config.arch == config.arch and conv.config.multi_grid == (1, 2, 4)
    for key, value in conv.module.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("backbone", [pytest.param("xception41", marks=pytest.mark.slow), "mobilenet_v2"])
def test_regular_and_separable_heads_on_the_other_backbones(backbone: str) -> None:
    from deeplab.tf import ReferenceSettings

    for separable in (True, False):
        decoder = backbone != "mobilenet_v2"  # the reference's MobileNetV2 decoder taps another end point
        config = _config(backbone=backbone, separable=separable, rates=(6, 12, 18), decoder=decoder, pooling=True,
                         multi_grid=(1, 1, 1))
        tensors, state = reference_tensors(config)
        settings = ReferenceSettings(output_stride=16, atrous_rates=(6, 12, 18),
                                     multi_grid=None if backbone == "mobilenet_v2" else (1, 1, 1),
                                     decoder_output_stride=4 if decoder else None)
        conv = convert_source(DictSource(tensors), settings=settings)
        assert conv.config.separable is separable
        assert all(torch.equal(v, state[k]) for k, v in conv.module.state_dict().items()
                   if not k.endswith("num_batches_tracked"))


def test_mixed_separable_aspp_and_regular_decoder_is_refused() -> None:
    tensors, _ = reference_tensors(_config(separable=True, rates=(6, 12, 18), decoder=True, pooling=True))
    regular, _ = reference_tensors(_config(separable=False, rates=(6, 12, 18), decoder=True, pooling=True))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("decoder/decoder_conv")}
    tensors.update({k: v for k, v in regular.items() if k.startswith("decoder/decoder_conv")})
    with pytest.raises(ConversionError, match="ASPP and decoder differ in kind"):
        recognise({k: tuple(np.shape(v)) for k, v in tensors.items()})


# --------------------------------------------------------------------------- settings: given, preset, recorded


def test_missing_settings_are_listed_with_the_presets_of_the_backbone() -> None:
    tensors, _ = reference_tensors(_config(backbone="resnet_v1_101_beta", separable=False, rates=(6, 12, 18),
                                           decoder=True, pooling=True))
    with pytest.raises(ConversionError) as info:
        convert_source(DictSource(tensors))
    message = str(info.value)
    for needed in ("output stride", "atrous rates", "multi-grid", "decoder output stride",
                   "--reference-config resnet_v1_101_beta_voc"):
        assert needed in message, needed
    assert "\n" not in message


def test_preset_fills_records_and_is_checked() -> None:
    from deeplab.tf import ReferenceSettings

    tensors, state = reference_tensors(_config(backbone="resnet_v1_50_beta", separable=False, rates=(6, 12, 18),
                                               decoder=True, pooling=True))
    conv = convert_source(DictSource(tensors), reference_config="resnet_v1_50_beta_voc")
    cfg = conv.config
    assert (cfg.multi_grid, cfg.aspp_rates, cfg.output_stride, cfg.separable) == ((1, 2, 4), None, 16, False)
    info = conv.checkpoint_payload("x")["converted_from"]
    assert info["reference_config"] == "resnet_v1_50_beta_voc"
    assert conv.dataset is None  # 3 classes: trained with the VOC config's settings on another dataset
    assert info["settings"] == {"output_stride": 16, "atrous_rates": [6, 12, 18], "multi_grid": [1, 2, 4],
                                "decoder_output_stride": 4, "image_pooling": True}
    assert info["settings_from"]["multi_grid"] == "reference config resnet_v1_50_beta_voc"
    assert info["settings_from"]["image_pooling"] == "checkpoint variables"
    # A setting given overrides the preset and says so.
    conv = convert_source(DictSource(tensors), reference_config="resnet_v1_50_beta_voc",
                          settings=ReferenceSettings(multi_grid=(1, 1, 1)))
    assert conv.config.multi_grid == (1, 1, 1) and conv.provenance["multi_grid"] == "given"
    # A preset of another backbone, or settings the checkpoint contradicts: errors.
    with pytest.raises(ConversionError,
                       match="xception65_voc is a xception65 model.*presets for resnet_v1_50_beta: resnet_v1_50_beta_voc"):
        convert_source(DictSource(tensors), reference_config="xception65_voc")
    with pytest.raises(ConversionError, match="no decoder stride, but the checkpoint has a decoder"):
        convert_source(DictSource(tensors), reference_config="resnet_v1_50_beta_voc",
                       settings=ReferenceSettings(decoder_output_stride=0))
    with pytest.raises(ConversionError, match="2 atrous rates"):
        convert_source(DictSource(tensors), reference_config="resnet_v1_50_beta_voc",
                       settings=ReferenceSettings(atrous_rates=(6, 12)))
    with pytest.raises(ConversionError, match="image pooling off"):
        convert_source(DictSource(tensors), reference_config="resnet_v1_50_beta_voc",
                       settings=ReferenceSettings(image_pooling=False))


def test_rates_off_the_papers_rule_are_kept_explicitly() -> None:
    from deeplab.tf import ReferenceSettings

    tensors, _ = reference_tensors(_config(separable=True, rates=(6, 12, 18), decoder=False, pooling=True))
    conv = convert_source(DictSource(tensors), settings=ReferenceSettings(
        output_stride=16, atrous_rates=(4, 8, 12), multi_grid=(1, 2, 4)))
    assert conv.config.aspp_rates == (4, 8, 12)  # not derivable from the output stride: stored as given
    assert conv.settings.decoder_output_stride == 0


def test_multi_grid_for_mobilenet_is_refused() -> None:
    from deeplab.tf import ReferenceSettings

    tensors, _ = reference_tensors(_config(backbone="mobilenet_v2", separable=True, rates=(), decoder=False,
                                           pooling=True))
    with pytest.raises(ConversionError, match="MobileNetV2, which has none"):
        convert_source(DictSource(tensors), settings=ReferenceSettings(output_stride=16, multi_grid=(1, 2, 4)))
    conv = convert_source(DictSource(tensors), settings=ReferenceSettings(output_stride=8))  # nothing else to say
    assert conv.config.output_stride == 8 and conv.config.multi_grid is None
