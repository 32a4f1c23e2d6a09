"""Inference modes: OS*k+1 padding, sliding windows, multi-scale and flip averaging."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deeplab
from deeplab._utils import ConfigError
from deeplab.config import InferenceConfig
from deeplab.eval.inference import (
    padded_size,
    predict_mask,
    predict_probs,
    scaled_size,
    window_starts,
)

NUM_CLASSES = 4


class Pointwise(nn.Module):
    """1x1 conv: translation-equivariant, flip-equivariant, blind to padding and windows."""

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, NUM_CLASSES, 1)
        with torch.no_grad():
            self.head.weight.mul_(4)  # peaky softmax so averaging mistakes show
        self.output_stride = output_stride
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class Stride16(nn.Module):
    """Contract-shaped dummy: conv, /OS average pooling, 1x1, bilinear back; records sizes."""

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, NUM_CLASSES, 1)
        self.output_stride = output_stride
        self.seen: List[Tuple[int, int]] = []
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.shape[-2], x.shape[-1]))
        y = F.avg_pool2d(self.stem(x), self.output_stride, ceil_mode=True)
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=True)


class ColumnRamp(nn.Module):
    """Not flip-equivariant: logits depend on the absolute column index."""

    output_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, :1])
        return torch.cat([x[:, :1] + 0.3 * cols, x[:, 1:2] - 0.2 * cols, x[:, 2:3]], dim=1)


def _image(h: int, w: int, b: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)


# --------------------------------------------------------------------- size helpers
def test_padded_and_scaled_sizes() -> None:
    assert [padded_size(s, 16) for s in (1, 2, 17, 18, 67, 71, 500, 513, 514)] == [1, 17, 17, 33, 81, 81, 513, 513, 529]
    assert [padded_size(s, 8) for s in (67, 71, 73)] == [73, 73, 73]
    assert padded_size(1024, 16) == 1025 and padded_size(2048, 16) == 2049
    # TF's rule keeps 513 = 16*32+1 sizes of the form OS*k+1 for the paper's scales
    assert [scaled_size(513, s) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)] == [257, 385, 513, 641, 769, 897]
    assert scaled_size(31, 0.1) == 4  # (30 * 0.1 = 2.9999999999999996) + 1 must not truncate to 3
    assert scaled_size(1, 0.5) == 1


def test_window_starts_cover_and_align_right() -> None:
    assert window_starts(100, 33, 20) == [0, 20, 40, 60, 67]
    assert window_starts(33, 33, 20) == [0]
    assert window_starts(20, 33, 20) == [0]
    assert window_starts(34, 33, 33) == [0, 1]
    for size, crop, stride in [(1025, 513, 341), (2049, 769, 512), (98, 10, 7)]:
        starts = window_starts(size, crop, stride)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            covered[s : s + crop] = True
        assert covered.all() and starts[-1] == size - crop and starts == sorted(set(starts))
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


# --------------------------------------------------------------------- whole mode
@pytest.mark.parametrize("os_, expected", [(16, (81, 81)), (8, (73, 73)), (32, (97, 97))])
def test_whole_pads_to_os_k_plus_1_and_returns_input_size(os_: int, expected: Tuple[int, int]) -> None:
    model = Stride16(output_stride=os_)
    probs = predict_probs(model, _image(67, 71, b=2))
    assert model.seen == [expected]
    assert probs.shape == (2, NUM_CLASSES, 67, 71)
    assert torch.allclose(probs.sum(1), torch.ones(2, 67, 71))
    mask = predict_mask(model, _image(67, 71))
    assert mask.shape == (1, 67, 71) and mask.dtype == torch.int64


def test_whole_pads_with_zero_and_crops_top_left() -> None:
    # The padded border must be zeros (mean pixel) at bottom/right, and the kept part
    # of the output must be the top-left corner of the padded forward pass.
    model = Stride16()
    x = _image(40, 50)
    padded = F.pad(x, (0, 15, 0, 9))  # -> 49 x 65
    expected = model(padded).softmax(1)[..., :40, :50]
    assert torch.allclose(predict_probs(model, x), expected, atol=1e-6)


def test_single_scale_equals_plain_softmax_on_os_k_plus_1_input() -> None:
    model = Stride16()
    x = _image(65, 81, b=2)  # 65 = 4*16+1, 81 = 5*16+1: no padding, no resize
    with torch.no_grad():
        expected = model(x).softmax(1)
    probs = predict_probs(model, x, InferenceConfig(scales=(1.0,)))
    assert model.seen[-1] == (65, 81)
    assert torch.equal(probs, expected)


def test_output_stride_argument_overrides_model_attribute() -> None:
    model = Stride16(output_stride=16)
    predict_probs(model, _image(67, 71), InferenceConfig(output_stride=32))
    assert model.seen == [(97, 97)]


def test_pad_to_reproduces_tf_fixed_eval_crop() -> None:
    model = Stride16()
    x = _image(300, 400)
    probs = predict_probs(model, x, InferenceConfig(pad_to=513))
    assert model.seen == [(513, 513)]
    assert probs.shape == (1, NUM_CLASSES, 300, 400)
    expected = model(F.pad(x, (0, 113, 0, 213))).softmax(1)[..., :300, :400]
    assert torch.allclose(probs, expected, atol=1e-6)
    # scales apply to the padded image, as in the TF reference
    model.seen.clear()
    predict_probs(model, x, InferenceConfig(pad_to=513, scales=(0.5, 1.75)))
    assert model.seen == [(257, 257), (897, 897)]


def test_batch_equals_individual_images() -> None:
    model = Stride16()
    x = _image(67, 71, b=3)
    inference = InferenceConfig(scales=(0.75, 1.0), flip=True)
    batched = predict_probs(model, x, inference)
    single = torch.cat([predict_probs(model, x[i : i + 1], inference) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-6)


# --------------------------------------------------------------------- slide mode
@pytest.mark.parametrize("size", [(100, 130), (20, 25), (33, 90)])
def test_slide_equals_whole_for_pointwise_model(size: Tuple[int, int]) -> None:
    model = Pointwise()
    x = _image(*size, b=2)
    whole = predict_probs(model, x, InferenceConfig(mode="whole"))
    slide = predict_probs(model, x, InferenceConfig(mode="slide", crop_size=33, stride=20))
    assert slide.shape == whole.shape == (2, NUM_CLASSES, *size)
    assert torch.allclose(slide, whole, atol=1e-6)
    # rectangular crop and stride
    slide = predict_probs(model, x, InferenceConfig(mode="slide", crop_size=(17, 49), stride=(9, 30)))
    assert torch.allclose(slide, whole, atol=1e-6)


def test_slide_runs_expected_windows() -> None:
    model = Stride16()
    probs = predict_probs(model, _image(100, 60), InferenceConfig(mode="slide", crop_size=33, stride=20))
    # rows start at 0, 20, 40, 60, 67; the 60-wide image takes columns 0, 20, 27
    assert len(model.seen) == 5 * 3 and set(model.seen) == {(33, 33)}
    assert probs.shape == (1, NUM_CLASSES, 100, 60)
    model.seen.clear()
    predict_probs(model, _image(20, 25), InferenceConfig(mode="slide", crop_size=33, stride=20))
    assert model.seen == [(33, 33)]  # smaller than the crop: padded up to one window
    model.seen.clear()
    predict_probs(model, _image(40, 40), InferenceConfig(mode="slide", crop_size=30, stride=30))
    assert set(model.seen) == {(33, 33)}  # each 30x30 window padded to OS*k+1


def test_slide_averages_overlapping_logits() -> None:
    # The window output depends on the window (its mean), so overlaps must be averaged
    # per pixel: check one pixel covered by two windows and one covered by one.
    class WindowMean(nn.Module):
        output_stride = 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :1] - x[:, :1].mean(dim=(2, 3), keepdim=True), torch.zeros_like(x[:, :1])], 1)

    x = _image(1, 30)
    probs = predict_probs(WindowMean().eval(), x, InferenceConfig(mode="slide", crop_size=(1, 20), stride=(1, 10)))
    c = x[0, 0, 0]
    m1, m2 = c[:20].mean(), c[10:].mean()
    logit_5 = c[5] - m1
    logit_15 = ((c[15] - m1) + (c[15] - m2)) / 2
    assert probs[0, 0, 0, 5] == pytest.approx(float(torch.sigmoid(logit_5)), abs=1e-6)
    assert probs[0, 0, 0, 15] == pytest.approx(float(torch.sigmoid(logit_15)), abs=1e-6)


# --------------------------------------------------------------------- scales and flips
def test_multi_scale_averages_softmax_of_resized_logits() -> None:
    model = Pointwise(output_stride=1)
    x = _image(40, 30)
    probs = predict_probs(model, x, InferenceConfig(scales=(0.5, 1.0, 1.5)))
    expected = torch.zeros_like(probs)
    for scale, size in [(0.5, (20, 15)), (1.0, (40, 30)), (1.5, (59, 44))]:
        xs = x if scale == 1.0 else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        logits = F.interpolate(model(xs), size=(40, 30), mode="bilinear", align_corners=False)
        expected += logits.softmax(1) / 3
    assert torch.allclose(probs, expected, atol=1e-6)
    # averaging logits instead of probabilities would give a different answer
    assert not torch.allclose(probs, F.interpolate(model(x), size=(40, 30)).softmax(1), atol=1e-3)


def test_multi_scale_sizes_seen_by_model() -> None:
    model = Stride16()
    predict_probs(model, _image(513, 513), InferenceConfig(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)))
    assert model.seen == [(257, 257), (385, 385), (513, 513), (641, 641), (769, 769), (897, 897)]
    model.seen.clear()
    probs = predict_probs(model, _image(67, 71), InferenceConfig(scales=(0.5, 1.75), flip=True))
    # 67 -> 34 -> padded 49; 71 -> 36 -> 49; 1.75: 116.5 -> 116 -> 129, 123.5 -> 123 -> 129
    assert model.seen == [(49, 49)] * 2 + [(129, 129)] * 2
    assert probs.shape == (1, NUM_CLASSES, 67, 71)


def test_flip_is_noop_for_flip_equivariant_model() -> None:
    model = Pointwise()
    x = _image(33, 47)  # asymmetric input: forgetting to un-flip would change the result
    assert torch.allclose(predict_probs(model, x, InferenceConfig(flip=True)), predict_probs(model, x), atol=1e-6)


def test_flip_unflips_and_averages_probabilities() -> None:
    model = ColumnRamp().eval()
    x = _image(5, 9)
    expected = (model(x).softmax(1) + model(x.flip(-1)).flip(-1).softmax(1)) / 2
    probs = predict_probs(model, x, InferenceConfig(flip=True))
    assert torch.allclose(probs, expected, atol=1e-6)
    assert not torch.allclose(probs, model(x).softmax(1), atol=1e-3)


# --------------------------------------------------------------------- contract and errors
def test_runs_in_inference_mode_and_leaves_model_mode() -> None:
    model = Stride16().train()
    with pytest.warns(UserWarning, match="training mode"):
        probs = predict_probs(model, _image(17, 17))
    assert probs.is_inference() and model.training


def test_errors_are_clear() -> None:
    model = Stride16()
    x = _image(17, 17)
    with pytest.raises(ValueError, match="unknown inference mode 'tiles'"):
        predict_probs(model, x, InferenceConfig(mode="tiles"))
    with pytest.raises(ValueError, match="stride"):
        predict_probs(model, x, InferenceConfig(mode="slide", crop_size=9, stride=10))
    with pytest.raises(ValueError, match="scales"):
        predict_probs(model, x, InferenceConfig(scales=()))
    with pytest.raises(ValueError, match="num_classes=21"):
        predict_probs(model, x, num_classes=21)
    with pytest.raises(TypeError, match=r"\(B, 3, H, W\)"):
        predict_probs(model, x[0])
    with pytest.raises(TypeError, match="floating point"):
        predict_probs(model, x.to(torch.uint8))

    class NoStride(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="output_stride="):
        predict_probs(NoStride().eval(), x)

    class AtStride(nn.Module):
        output_stride = 16

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(x, 16, ceil_mode=True)

    with pytest.raises(ValueError, match="at the input size"):
        predict_probs(AtStride().eval(), x)


# --------------------------------------------------------------------- InferenceConfig
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "tiles"}, "mode"),
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, -0.5)}, "scales"),
        ({"crop_size": 0}, "crop_size"),
        ({"crop_size": (33, -1)}, "crop_size"),
        ({"stride": 0}, "stride"),
        ({"pad_to": (513,)}, "pad_to"),
        ({"pad_to": (513, 513, 3)}, "pad_to"),
        ({"pad_to": (0, 513)}, "pad_to"),
        ({"output_stride": 0}, "output_stride"),
        ({"mode": "slide", "crop_size": 9, "stride": 10}, "stride"),
    ],
)
def test_inference_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        InferenceConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    assert "invalid InferenceConfig" in str(info.value)


def test_inference_config_normalises_and_round_trips() -> None:
    config = InferenceConfig(scales=[0.5, 1], crop_size=[17, 49], stride=(9, 30), pad_to=513, flip=1)
    assert config.scales == (0.5, 1.0) and config.crop_size == (17, 49) and config.pad_to == (513, 513)
    assert config.flip is True and config.crop_hw == (17, 49) and InferenceConfig().crop_hw == (513, 513)
    # stride > crop is fine in whole mode (the windows are not used), as before
    InferenceConfig(mode="whole", crop_size=9, stride=10)
    data = config.to_dict()
    assert data["scales"] == [0.5, 1.0] and data["pad_to"] == [513, 513]
    assert InferenceConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown InferenceConfig keys"):
        InferenceConfig.from_dict({"crop": 513})
    assert deeplab.InferenceConfig is InferenceConfig
    with pytest.raises(TypeError, match="InferenceConfig"):
        predict_probs(Stride16(), _image(17, 17), {"flip": True})  # type: ignore[arg-type]
