"""The paper's augmentation: shapes, padding values, discrete scales, flip, seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform,
                                     TrainTransform, denormalize, pad_collate, scale_choices,
                                     to_uint8_image)


def _image(h: int = 20, w: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _checker(h: int = 20, w: int = 30, a: int = 0, b: int = 7) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.where((yy + xx) % 2 == 0, a, b).astype(np.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("crop", [16, (24, 40), 64])
def test_output_shapes_equal_the_crop(crop) -> None:
    t = TrainTransform(crop_size=crop)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    for seed in range(5):
        x, y = t(_image(), _checker(), generator=_gen(seed))
        assert x.shape == (3, ch, cw) and x.dtype == torch.float32
        assert y.shape == (ch, cw) and y.dtype == torch.int64


@pytest.mark.parametrize("mean,std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3)])
def test_padding_is_the_mean_pixel_and_ignore(mean, std) -> None:
    img = _image()
    mask = _checker()
    t = TrainTransform(crop_size=(32, 48), scale_range=(1.0, 1.0), mean=mean, std=std, flip=False)
    x, y = t(img, mask, generator=_gen(0))
    # the 20x30 image sits top-left (pad at bottom/right, as the TF reference does)
    assert torch.all(x[:, 20:, :] == 0) and torch.all(x[:, :, 30:] == 0)
    assert torch.all(y[20:, :] == 255) and torch.all(y[:, 30:] == 255)
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
                - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(x[:, :20, :30], expected, atol=1e-6)
    assert torch.equal(y[:20, :30], torch.from_numpy(mask.astype(np.int64)))


def test_scales_come_from_the_discrete_set() -> None:
    assert scale_choices((0.5, 2.0), 0.25) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert scale_choices((0.5, 1.0), 0.3) == [0.5, 0.8]
    t = TrainTransform()
    g = _gen(0)
    seen = {t.sample_scale(g) for _ in range(400)}
    assert seen == {0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0}
    cont = TrainTransform(scale_step=0)
    draws = [cont.sample_scale(g) for _ in range(200)]
    assert all(0.5 <= s <= 2.0 for s in draws)
    assert len({round(s, 6) for s in draws}) > 150  # not a grid


def test_resized_extent_follows_the_drawn_scale() -> None:
    # a crop larger than 2x the image keeps the whole scaled mask: its size is the scale
    t = TrainTransform(crop_size=(64, 64), flip=False)
    mask = np.ones((20, 30), dtype=np.uint8)
    for seed in range(10):
        scale = TrainTransform().sample_scale(_gen(seed))  # first draw of the same stream
        _, y = t(_image(), mask, generator=_gen(seed))
        rows, cols = torch.nonzero(y != 255, as_tuple=True)
        assert rows.max() + 1 == round(20 * scale) and cols.max() + 1 == round(30 * scale)


def test_mask_values_are_never_interpolated() -> None:
    mask = _checker(a=3, b=7)
    mask[0, 0] = 255
    t = TrainTransform(crop_size=24, scale_range=(0.5, 2.0))
    for seed in range(20):
        _, y = t(_image(), mask, generator=_gen(seed))
        assert set(torch.unique(y).tolist()) <= {3, 7, 255}


def test_flip_moves_image_and_mask_together() -> None:
    img = _image()
    mask = np.tile((np.arange(30) % 21).astype(np.uint8), (20, 1))  # column-dependent
    t = TrainTransform(crop_size=(20, 30), scale_range=(1.0, 1.0), flip=True)
    plain = EvalTransform()(img, mask)
    flips = 0
    for seed in range(16):
        x, y = t(img, mask, generator=_gen(seed))
        if torch.equal(y, plain[1]):
            assert torch.allclose(x, plain[0])
        else:
            assert torch.equal(y, plain[1].flip(-1)) and torch.allclose(x, plain[0].flip(-1))
            flips += 1
    assert 0 < flips < 16
    no_flip = TrainTransform(crop_size=(20, 30), scale_range=(1.0, 1.0), flip=False)
    assert all(torch.equal(no_flip(img, mask, generator=_gen(s))[1], plain[1]) for s in range(8))


def test_same_seed_same_output_different_seed_different() -> None:
    t = TrainTransform(crop_size=24)
    img, mask = _image(40, 50), _checker(40, 50)
    a = t(img, mask, generator=_gen(5))
    b = t(img, mask, generator=_gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [t(img, mask, generator=_gen(s)) for s in range(6, 10)]
    assert any(not torch.equal(a[0], o[0]) for o in others)


def test_only_torch_rng_is_used() -> None:
    t = TrainTransform(crop_size=24)
    img, mask = _image(), _checker()
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    t(img, mask, generator=_gen(0))
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)  # explicit generator only
    # without a generator the global torch RNG is used, and reproducible through it
    torch.manual_seed(11)
    a = t(img, mask)
    torch.manual_seed(11)
    b = t(img, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        TrainTransform(scale_range=(2.0, 0.5))
    with pytest.raises(ValueError):
        TrainTransform(crop_size=0)
    with pytest.raises(ValueError, match="does not match"):
        TrainTransform()(_image(), np.zeros((5, 5), np.uint8))


def test_eval_transform_and_denormalize_round_trip() -> None:
    img = _image()
    mask = _checker()
    x, y = EvalTransform()(img, mask, generator=_gen(0))
    assert x.shape == (3, 20, 30) and y.shape == (20, 30) and y.dtype == torch.int64
    px = np.array(img)[3, 4] / 255.0
    assert torch.allclose(x[:, 3, 4], torch.tensor((px - IMAGENET_MEAN) / np.array(IMAGENET_STD),
                                                   dtype=torch.float32), atol=1e-6)
    assert np.array_equal(to_uint8_image(x), np.array(img))
    assert denormalize(x.unsqueeze(0)).shape == (1, 3, 20, 30)
    x2, none = EvalTransform((0.5,) * 3, (0.5,) * 3)(img)
    assert none is None and x2.min() >= -1 and x2.max() <= 1


def test_pad_collate_pads_with_zero_and_ignore() -> None:
    ev = EvalTransform()
    a = ev(_image(20, 30), _checker(20, 30))
    b = ev(_image(25, 10, seed=1), _checker(25, 10))
    images, masks = pad_collate([a, b])
    assert images.shape == (2, 3, 25, 30) and masks.shape == (2, 25, 30)
    assert torch.equal(images[0, :, :20, :30], a[0]) and torch.all(images[0, :, 20:] == 0)
    assert torch.all(masks[0, 20:] == 255) and torch.all(masks[1, :, 10:] == 255)
    assert torch.equal(masks[1, :, :10], b[1])


def test_cropped_resize_matches_resize_then_crop() -> None:
    # the transform resizes only the cropped region; compare with the textbook order
    img, mask = _image(37, 53, seed=3), (np.arange(37 * 53) % 19).reshape(37, 53).astype(np.uint8)
    t = TrainTransform(crop_size=(24, 31), flip=False)
    for seed in range(12):
        g = _gen(seed)
        scale = t.sample_scale(g)
        nw, nh = int(round(53 * scale)), int(round(37 * scale))
        y0 = int(torch.randint(max(nh, 24) - 24 + 1, (1,), generator=g))
        x0 = int(torch.randint(max(nw, 31) - 31 + 1, (1,), generator=g))
        full = np.asarray(img.resize((nw, nh), Image.BILINEAR))[y0:y0 + 24, x0:x0 + 31]
        full_mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
        full_mask = full_mask[y0:y0 + 24, x0:x0 + 31]
        x, y = t(img, mask, generator=_gen(seed))
        hh, ww = full.shape[:2]
        got = to_uint8_image(x)[:hh, :ww].astype(int)
        assert np.abs(got - full.astype(int)).max() <= 2, scale  # filter edge rounding only
        # nearest picks the same source pixel except at exact ties
        assert (y[:hh, :ww].numpy() == full_mask).mean() > 0.98, scale
