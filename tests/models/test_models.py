"""The model family: strides and channels, sizes, gradients, parameter counts, golden output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import deeplab
from deeplab._utils import ConfigError
from deeplab.config import ARCHS, BACKBONE_NAMES, ModelConfig
from deeplab.models import BACKBONES, MODELS, build_backbone, build_model, build_model_from_config, default_aspp_rates
from deeplab.models.aspp import ASPP

ALL_BACKBONES = sorted(BACKBONES)
# (channels of low_level, channels of out) from the paper / torchvision / timm.
PAPER_CHANNELS = {
    "resnet50": (256, 2048),
    "resnet101": (256, 2048),
    "xception41": (256, 2048),
    "xception65": (256, 2048),
    "xception71": (256, 2048),
    "mobilenet_v2": (24, 320),
    "resnet_v1_50": (256, 2048),
    "resnet_v1_101": (256, 2048),
    "resnet_v1_50_beta": (256, 2048),
    "resnet_v1_101_beta": (256, 2048),
}
# Backbone parameters = torchvision/timm model minus its classifier (and MobileNetV2's final
# 1x1 conv): torchvision resnet50 25,557,032 - fc 2,049,000; resnet101 44,549,160 - 2,049,000;
# mobilenet_v2 3,504,872 - classifier 1,281,000 - features.18 412,160; timm xception41/65/71
# 26,969,560 / 39,916,312 / 42,338,736 - head.fc 2,049,000.
BACKBONE_PARAMS = {
    "resnet50": 23_508_032,
    "resnet101": 42_500_160,
    "mobilenet_v2": 1_811_712,
    "xception41": 24_920_560,
    "xception65": 37_867_312,
    "xception71": 40_289_736,
    # TF layout: the same convs as torchvision's (other places, same shapes); _beta adds the
    # three-conv root (3x3x3x64 + 3x3x64x64 + 3x3x64x128 + 256 BN pairs - the 7x7 conv and its BN
    # = +103,296) and a 128-channel input to block1/unit_1 (conv1 +4,096, shortcut +16,384).
    "resnet_v1_50": 23_508_032,
    "resnet_v1_101": 42_500_160,
    "resnet_v1_50_beta": 23_508_032 + 123_776,
    "resnet_v1_101_beta": 42_500_160 + 123_776,
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_backbone_strides_and_channels(name: str, output_stride: int) -> None:
    backbone = build_backbone(name, output_stride=output_stride).eval()
    specs = backbone.feature_specs
    assert specs["low_level"].stride == 4
    assert specs["out"].stride == output_stride
    assert (specs["low_level"].channels, specs["out"].channels) == PAPER_CHANNELS[name]
    h, w = 65, 97
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, h, w))
    for key in ("low_level", "out"):
        spec = specs[key]
        assert tuple(feats[key].shape) == (1, spec.channels, math.ceil(h / spec.stride), math.ceil(w / spec.stride)), key


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_backbone_parameter_counts_pinned(name: str) -> None:
    counts = {os_: n_params(build_backbone(name, output_stride=os_)) for os_ in (8, 16, 32)}
    # Output stride changes rates, never parameters.
    assert counts == {8: BACKBONE_PARAMS[name], 16: BACKBONE_PARAMS[name], 32: BACKBONE_PARAMS[name]}


def test_full_model_parameter_counts_pinned() -> None:
    # Head = ASPP + decoder + classifier; derived once from the architecture and pinned.
    expected = {
        ("deeplabv3plus", "xception65", True): 41_055_413,
        ("deeplabv3plus", "resnet101", True): 45_688_261,
        ("deeplabv3plus", "mobilenet_v2", True): 2_719_813,
        ("deeplabv3plus", "resnet101", False): 59_344_309,  # head 16,844,149 by hand
        ("deeplabv3", "xception65", True): 40_892_485,
    }
    for (arch, backbone, separable), count in expected.items():
        with torch.device("meta"):
            model = build_model(arch=arch, backbone=backbone, num_classes=21, separable=separable)
        assert n_params(model) == count, (arch, backbone, separable)


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv3"])
@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_output_size_equals_odd_input_size(arch: str, name: str) -> None:
    model = build_model(arch=arch, backbone=name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 67, 71))
    assert out.shape == (2, 7, 67, 71)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv3"])
@pytest.mark.parametrize("name", ["resnet101", "xception65", "mobilenet_v2"])
def test_output_size_at_513(arch: str, name: str) -> None:
    model = build_model(arch=arch, backbone=name, num_classes=21).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 513, 513)).shape == (1, 21, 513, 513)


@pytest.mark.parametrize(
    "arch,name,separable",
    [
        ("deeplabv3plus", "mobilenet_v2", True),
        ("deeplabv3plus", "xception41", True),
        ("deeplabv3plus", "resnet50", False),
        ("deeplabv3", "mobilenet_v2", False),
    ],
)
def test_every_parameter_receives_a_gradient(arch: str, name: str, separable: bool) -> None:
    torch.manual_seed(0)
    model = build_model(arch=arch, backbone=name, num_classes=3, separable=separable).train()
    out = model(torch.randn(2, 3, 65, 65))
    torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 65, 65))).backward()
    without = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not without
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero[:5]}"


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv3"])
def test_training_forward_at_batch_size_one(arch: str) -> None:
    # The image-pooling BN sees one value per channel here; plain BatchNorm would raise.
    model = build_model(arch=arch, backbone="mobilenet_v2", num_classes=4).train()
    pool_bn = model.aspp.image_pool.bn
    before = pool_bn.running_mean.clone()
    out = model(torch.randn(1, 3, 61, 59))
    assert out.shape == (1, 4, 61, 59)
    out.sum().backward()
    assert model.aspp.image_pool.conv.weight.grad is not None
    # Running statistics are left alone when batch statistics are undefined ...
    assert torch.equal(pool_bn.running_mean, before)
    # ... and updated as usual for larger batches.
    model(torch.randn(2, 3, 61, 59))
    assert not torch.equal(pool_bn.running_mean, before)


def test_aspp_rates_default_from_output_stride_and_override() -> None:
    assert default_aspp_rates(16) == (6, 12, 18)
    assert default_aspp_rates(8) == (12, 24, 36)
    assert default_aspp_rates(32) == (3, 6, 9)
    for os_, rates in ((16, (6, 12, 18)), (8, (12, 24, 36))):
        model = build_model(arch="deeplabv3plus", backbone="mobilenet_v2", output_stride=os_)
        depthwise = [branch.depthwise.conv for branch in model.aspp.convs[1:]]
        assert tuple(conv.dilation[0] for conv in depthwise) == rates
        assert all(conv.groups == conv.in_channels for conv in depthwise)
    custom = build_model(arch="deeplabv3", backbone="mobilenet_v2", aspp_rates=(2, 4), separable=False)
    assert [b.conv.dilation[0] for b in custom.aspp.convs[1:]] == [2, 4]
    assert custom.config.aspp_rates == (2, 4)
    # The released mobile head: image pooling + 1x1 only.
    mobile = build_model(arch="deeplabv3", backbone="mobilenet_v2", aspp_rates=())
    assert len(mobile.aspp.convs) == 1 and mobile.aspp.image_pool is not None
    assert mobile.aspp.project.conv.in_channels == 2 * 256


def test_paper_head_structure() -> None:
    model = build_model(arch="deeplabv3plus", backbone="xception65", num_classes=21)
    assert model.decoder.low_level.conv.out_channels == 48
    assert model.decoder.low_level.conv.kernel_size == (1, 1)
    fuse = list(model.decoder.fuse)
    assert len(fuse) == 2
    assert fuse[0].depthwise.conv.in_channels == 256 + 48
    assert all(block.pointwise.conv.out_channels == 256 for block in fuse)
    assert isinstance(model.aspp, ASPP) and len(model.aspp.convs) == 4
    assert model.aspp.project.conv.in_channels == 5 * 256
    assert model.classifier.out_channels == 21
    regular = build_model(arch="deeplabv3plus", backbone="xception65", separable=False)
    assert regular.decoder.fuse[0].conv.kernel_size == (3, 3)
    assert regular.aspp.convs[1].conv.dilation == (6, 6)


def test_resnet_multi_grid_rates() -> None:
    plain = build_backbone("resnet101", output_stride=16)
    assert [b.conv2.dilation[0] for b in plain.layer4] == [1, 2, 2]  # torchvision's previous_dilation
    grid = build_backbone("resnet101", output_stride=16, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in grid.layer4] == [2, 4, 8]  # paper: 2 x (1, 2, 4)
    grid8 = build_backbone("resnet101", output_stride=8, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in grid8.layer4] == [4, 8, 16]
    assert {b.conv2.dilation[0] for b in grid8.layer3[1:]} == {2}
    with pytest.raises(ValueError, match="multi_grid"):
        build_backbone("resnet101", multi_grid=(1, 2))


def test_xception_low_level_is_pre_activation() -> None:
    # The decoder reads TF's separable_conv2_pointwise: a BN output, so it has negative values.
    backbone = build_backbone("xception65").eval()
    with torch.no_grad():
        low = backbone(torch.randn(1, 3, 64, 64))["low_level"]
    assert (low < 0).any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backbone="resnet152"), "unknown backbone 'resnet152'; choose from"),
        (dict(arch="deeplabv4"), "unknown arch 'deeplabv4'; choose from"),
        (dict(output_stride=4), r"output_stride must be one of \[8, 16, 32\]"),
        (dict(num_classes=0), "num_classes must be a positive integer"),
        (dict(num_classes=2.5), "num_classes must be a positive integer"),
        (dict(aspp_rates=(6, 0)), "ASPP rate"),
        (dict(backbone="mobilenet_v2", multi_grid=(1, 2, 4)), "multi_grid applies to"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(arch="deeplabv4"), "arch"),
        (dict(backbone="resnet152"), "backbone"),
        (dict(output_stride=4), "output_stride"),
        (dict(output_stride=True), "output_stride"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=2.5), "num_classes"),
        (dict(num_classes=True), "num_classes"),
        (dict(aspp_channels=0), "aspp_channels"),
        (dict(low_level_channels=-48), "low_level_channels"),
        (dict(decoder_channels="256"), "decoder_channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(aspp_rates=(6, 0)), "aspp_rates"),
        (dict(aspp_rates=6), "aspp_rates"),
        (dict(aspp_rates=(6.5, 12)), "aspp_rates"),
        (dict(multi_grid=(1, 0, 4)), "multi_grid"),
        (dict(multi_grid=()), "multi_grid"),
        (dict(backbone="mobilenet_v2", multi_grid=(1, 2, 4)), "multi_grid"),
        (dict(separable="no"), "separable"),
        (dict(image_pooling=2), "image_pooling"),
        (dict(tf_compat=None), "tf_compat"),
    ],
)
def test_model_config_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"invalid ModelConfig: .*\b{field}\b") as info:
        ModelConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # except ValueError still catches it


def test_model_config_lists_every_problem_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(arch="v4", output_stride=12, dropout=2.0)
    message = str(info.value)
    assert "choose from ['deeplabv3plus', 'deeplabv3']" in message
    assert "output_stride must be one of [8, 16, 32], got 12" in message
    assert "dropout must be in [0, 1), got 2.0" in message


def test_model_config_normalises_tuples_and_numbers() -> None:
    config = ModelConfig(aspp_rates=[6, 12, 18], multi_grid=np.array([1, 2, 4]), num_classes=np.int64(5),
                         separable=1, dropout=0)
    assert config.aspp_rates == (6, 12, 18) and type(config.aspp_rates) is tuple
    assert config.multi_grid == (1, 2, 4) and all(type(m) is int for m in config.multi_grid)
    assert config.num_classes == 5 and type(config.num_classes) is int
    assert config.separable is True and type(config.dropout) is float
    assert ModelConfig(aspp_rates=()).aspp_rates == ()  # 1x1 + image pooling only (MobileNetV2 head)
    assert config == ModelConfig.from_dict(config.to_dict())


def test_backbone_registry_matches_config_names() -> None:
    assert tuple(BACKBONES) == BACKBONE_NAMES
    assert set(MODELS) == set(ARCHS)


def test_build_model_is_build_model_from_config() -> None:
    config = ModelConfig(arch="deeplabv3", backbone="mobilenet_v2", num_classes=3, aspp_rates=(2, 4))
    torch.manual_seed(0)
    a = build_model_from_config(config)
    torch.manual_seed(0)
    b = build_model(arch="deeplabv3", backbone="mobilenet_v2", num_classes=3, aspp_rates=[2, 4])
    assert a.config == b.config == config
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert build_model_from_config(config, output_stride=8).config.output_stride == 8
    with pytest.raises(ConfigError, match="output_stride"):
        build_model_from_config(config, output_stride=4)


def test_builder_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        build_model("deeplabv3plus")  # type: ignore[misc]


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(1, 1, 32, 32), r"\(B, 3, H, W\)"),
        (torch.randn(3, 32, 32), r"\(B, 3, H, W\)"),
        (torch.randn(32, 32), r"\(B, 3, H, W\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float tensor"),
    ],
)
def test_bad_input_raises_value_error(x: torch.Tensor, match: str) -> None:
    model = build_model(arch="deeplabv3", backbone="mobilenet_v2", num_classes=2).eval()
    with pytest.raises(ValueError, match=match):
        model(x)


def test_config_round_trip_rebuilds_the_same_architecture() -> None:
    model = deeplab.build_model(arch="deeplabv3plus", backbone="resnet50", num_classes=5, output_stride=8,
                                multi_grid=(1, 2, 4), separable=False)
    config = deeplab.ModelConfig.from_dict(model.config.to_dict())
    assert config == model.config
    rebuilt = deeplab.build_model_from_config(config)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert model.normalization.mean == (0.485, 0.456, 0.406)
    assert deeplab.build_model(backbone="xception65").normalization.std == (0.5, 0.5, 0.5)


# Tolerances of the golden tests, derived from rounding error rather than tuned until green.
# Different CPUs run different kernels (AVX2, AVX-512, AMX; blocked sums in other orders), so the
# same float computation rounds differently. Measured: float32 logits differ from float64 by up
# to 1.3e-4 x max|y| (max|y| ~ 22), i.e. this network amplifies the unit roundoff u by about
# A = 1.3e-4 / 6e-8 ~ 2e3; between two CPUs float32 differed by 7.5e-4 at a logit of 2.4.
# In float64 (u = 1.1e-16) the same amplification gives A * u ~ 2.5e-13 relative, so
# GOLDEN_RTOL = 1e-9 leaves a margin of ~4000 over any kernel difference, while a real change
# (a channel count, an activation, align_corners) moves the logits by 1e-3 relative or more.
GOLDEN_RTOL = 1e-9
# Float32 vs float64 on one machine: A * u32 ~ 1.3e-4 relative to max|y|, with a 10x margin.
FLOAT32_RTOL = 1.5e-3


def _seeded_golden_model(dropout: float = 0.1) -> tuple:
    """The golden setting: seeded MobileNetV2 DeepLabv3+ in training mode and its input."""
    torch.manual_seed(0)
    model = build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=5, dropout=dropout).train()
    # Drawn in float32 (as before the float64 rewrite) so float32 and float64 see the same pixels.
    x = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    return model, x


def test_seeded_golden_output() -> None:
    """Any change to architecture, initialisation or op order changes these numbers: if it is
    intended, recompute them (in float64, as below) and say why in the commit.

    Runs in float64 so the numbers are the same on every CPU (see GOLDEN_RTOL); training mode,
    so BatchNorm uses batch statistics and dropout (seed 123) is applied.
    """
    model, x = _seeded_golden_model()
    model = model.double()
    torch.manual_seed(123)  # dropout
    with torch.no_grad():
        y = model(x.double())
    assert y.shape == (2, 5, 37, 45) and y.dtype == torch.float64
    abs_sum = 77233.85336631187
    # A sum's rounding error scales with the sum of |terms|, hence atol from abs_sum.
    torch.testing.assert_close(y.sum().item(), -20293.351809670676, rtol=GOLDEN_RTOL, atol=GOLDEN_RTOL * abs_sum)
    torch.testing.assert_close(y.abs().sum().item(), abs_sum, rtol=GOLDEN_RTOL, atol=0.0)
    # Logits are O(10): atol = GOLDEN_RTOL * 10 covers entries near zero.
    torch.testing.assert_close(
        y[0, :, 0, 0],
        torch.tensor([-1.0355251374612147, 2.4361134217786615, 4.227138590866963, -8.6644478800622,
                      -3.2691850749747453], dtype=torch.float64),
        rtol=GOLDEN_RTOL, atol=GOLDEN_RTOL * 10,
    )
    torch.testing.assert_close(
        y[1, :, 18, 22],
        torch.tensor([-5.72736694411484, 7.948997628276535, -6.809217644513726, 0.8639340205651471,
                      -1.6798977805230022], dtype=torch.float64),
        rtol=GOLDEN_RTOL, atol=GOLDEN_RTOL * 10,
    )


def test_float32_forward_matches_float64() -> None:
    """The float32 kernels compute the golden test's function, to float32 accuracy (FLOAT32_RTOL).

    No dropout, so nothing depends on how a CPU draws random masks for each dtype.
    """
    model, x = _seeded_golden_model(dropout=0.0)
    with torch.no_grad():
        y32 = model(x)
        y64 = model.double()(x.double())
    assert y32.dtype == torch.float32
    scale = y64.abs().max().item()
    torch.testing.assert_close(y32.double(), y64, rtol=0.0, atol=FLOAT32_RTOL * scale)


def test_cpu_inference_runs_channels_last_with_the_same_result_in_the_callers_layout() -> None:
    """Eval mode on the CPU computes in NHWC (faster oneDNN convolutions): the logits equal the NCHW
    computation up to float32 rounding of the reordered sums and come back contiguous; training and
    export (``channels_last_inference = False``) keep the input's layout."""
    torch.manual_seed(0)
    model = build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=5).eval()
    x = torch.randn(1, 3, 65, 81, generator=torch.Generator().manual_seed(1))
    layouts = []
    hook = model.backbone.register_forward_pre_hook(
        lambda m, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        nhwc = model(x)
        model.channels_last_inference = False
        nchw = model(x)
        model.channels_last_inference = True
        model.train()
        model(x)
    hook.remove()
    assert layouts == [True, False, False]
    assert nhwc.is_contiguous() and nhwc.shape == nchw.shape == (1, 5, 65, 81)
    # float32: each logit is a sum of O(1e4) products; reordering moves it by a few ulps of the scale
    torch.testing.assert_close(nhwc, nchw, rtol=0, atol=1e-5 * float(nchw.abs().max()))
    from deeplab.deploy.export import prepare_for_export

    assert prepare_for_export(model, fold_bn=True).channels_last_inference is False and model.channels_last_inference
