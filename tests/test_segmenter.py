"""Segmenter: checkpoint and exported backends agree, input forms, masks, overlays, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deeplab
from deeplab.checkpoint import CheckpointNotFoundError, load_model
from deeplab.config import InferenceConfig
from deeplab.data.transforms import normalize_image
from deeplab.deploy.export import export_onnx, export_torchscript, model_metadata
from deeplab.eval.inference import predict_probs
from deeplab.segmenter import Segmenter
from deeplab.viz import index_png, overlay_mask, to_rgb_array

from tests.helpers import CLASSES, NORM, PALETTE, needs_openvino


@pytest.fixture(scope="module")
def onnx_file(ckpt: Path) -> Path:
    model, payload = load_model(ckpt)
    meta = model_metadata(model, classes=payload["classes"], palette=payload["palette"], normalization=payload["normalization"])
    return export_onnx(model, ckpt.with_name("model.onnx"), metadata=meta)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    # smooth blobs rather than noise, so the (random-weight) model predicts several classes
    yy, xx = np.mgrid[0:67, 0:91]
    base = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 9.0)], axis=-1)
    return ((base * 0.5 + 0.5) * 200 + rng.integers(0, 55, (67, 91, 3))).astype(np.uint8)


def test_from_checkpoint_predict_matches_the_unoptimised_model(ckpt: Path, image: np.ndarray) -> None:
    seg = deeplab.Segmenter.from_checkpoint(ckpt, device="cpu")
    assert seg.classes == CLASSES and seg.palette == [tuple(c) for c in PALETTE]
    assert seg.normalization == NORM
    mask = seg.predict(image)
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
    model, _ = load_model(ckpt)
    ref = predict_probs(model, normalize_image(image, NORM["mean"], NORM["std"])[None])[0]
    probs = seg.predict_probs(Image.fromarray(image))
    assert probs.shape == (3, 67, 91) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(mask, probs.argmax(0))


def test_exported_backends_agree_with_checkpoint(ckpt: Path, onnx_file: Path, image: np.ndarray) -> None:
    torch_seg = Segmenter.load(ckpt)
    onnx_seg = Segmenter.load(onnx_file, backend="onnxruntime")
    assert onnx_seg.backend == "onnxruntime" and onnx_seg.classes == CLASSES and onnx_seg.normalization == NORM
    np.testing.assert_allclose(onnx_seg.predict_probs(image), torch_seg.predict_probs(image), atol=1e-4)
    ts = export_torchscript(load_model(ckpt)[0], ckpt.with_name("model.ts"),
                            metadata=model_metadata(load_model(ckpt)[0], classes=CLASSES, palette=PALETTE, normalization=NORM))
    ts_seg = Segmenter.load(ts, backend="torch")
    assert ts_seg.backend == "torchscript"
    np.testing.assert_allclose(ts_seg.predict_probs(image), torch_seg.predict_probs(image), atol=1e-4)


@needs_openvino
def test_openvino_segmenter(onnx_file: Path, ckpt: Path, image: np.ndarray) -> None:
    seg = Segmenter.load(onnx_file, backend="openvino")
    assert seg.backend == "openvino"
    np.testing.assert_allclose(seg.predict_probs(image), Segmenter.load(ckpt).predict_probs(image), atol=1e-4)


def test_multiscale_flip_and_slide_options(ckpt: Path, image: np.ndarray) -> None:
    seg = Segmenter.from_checkpoint(ckpt, scales=(0.5, 1.0, 1.25), flip=True)
    model, _ = load_model(ckpt)
    x = normalize_image(image, NORM["mean"], NORM["std"])[None]
    ref = predict_probs(model, x, InferenceConfig(scales=(0.5, 1.0, 1.25), flip=True))[0].numpy()
    np.testing.assert_allclose(seg.predict_probs(image), ref, atol=1e-4)
    slide = Segmenter.from_checkpoint(ckpt, mode="slide", crop_size=49, stride=33)
    ref = predict_probs(model, x, InferenceConfig(mode="slide", crop_size=49, stride=33))[0].numpy()
    np.testing.assert_allclose(slide.predict_probs(image), ref, atol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        Segmenter.from_checkpoint(ckpt, mode="tiles")


def test_inference_object_and_keywords_are_one_config(ckpt: Path, onnx_file: Path, image: np.ndarray) -> None:
    config = InferenceConfig(scales=(0.75, 1.0), flip=True, output_stride=8)
    by_object = Segmenter.from_checkpoint(ckpt, inference=config)
    by_keywords = Segmenter.from_checkpoint(ckpt, scales=(0.75, 1.0), flip=True, output_stride=8)
    assert by_object.inference == by_keywords.inference == config
    assert by_object.model.output_stride == 8  # the checkpoint is rebuilt at the config's stride
    assert by_object.inference.scales == (0.75, 1.0) and by_object.inference.flip is True and by_object.inference.mode == "whole"
    np.testing.assert_array_equal(by_object.predict_probs(image), by_keywords.predict_probs(image))
    # a keyword given next to the object replaces that field only
    mixed = Segmenter.from_checkpoint(ckpt, inference=config, flip=False)
    assert mixed.inference == InferenceConfig(scales=(0.75, 1.0), flip=False, output_stride=8)
    exported = Segmenter.from_exported(onnx_file, inference=InferenceConfig(scales=(0.75, 1.0), flip=True))
    assert exported.inference.scales == (0.75, 1.0) and exported.inference.flip is True
    with pytest.raises(ValueError, match="exported at output stride 16"):
        Segmenter.from_exported(onnx_file, output_stride=8)
    with pytest.raises(ValueError, match="crop_size"):
        Segmenter.from_checkpoint(ckpt, crop_size=0)


def test_input_forms(ckpt: Path, image: np.ndarray, tmp_path: Path) -> None:
    seg = Segmenter.from_checkpoint(ckpt)
    expected = seg.predict(image)
    Image.fromarray(image).save(tmp_path / "img.png")
    assert np.array_equal(seg.predict(tmp_path / "img.png"), expected)
    assert np.array_equal(seg.predict(str(tmp_path / "img.png")), expected)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert np.array_equal(seg.predict(rgba), expected)
    assert np.array_equal(seg.predict(Image.fromarray(rgba)), expected)
    assert np.array_equal(seg.predict(image.astype(np.float32) / 255.0), expected)
    grey = seg.predict(image[..., 0])
    assert grey.shape == image.shape[:2]
    with pytest.raises(ValueError, match="HWC"):
        seg.predict(np.zeros((3, 10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        seg.predict(np.full((10, 10, 3), 2.0, np.float32))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        seg.predict(tmp_path / "notes.txt")


def test_index_png_round_trip(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    index_png(mask, PALETTE).save(tmp_path / "m.png")
    back = Image.open(tmp_path / "m.png")
    assert back.mode == "P" and np.array_equal(np.asarray(back), mask)
    assert back.getpalette()[:9] == [v for c in PALETTE for v in c]


def test_overlay_with_and_without_legend(image: np.ndarray) -> None:
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[:, 40:] = 2
    plain = overlay_mask(image, mask, PALETTE, CLASSES, legend=False)
    assert plain.size == (91, 67)
    right = np.asarray(plain)[:, 60]
    expected = np.round(image[:, 60].astype(np.float32) * 0.5 + np.array(PALETTE[2], np.float32) * 0.5)
    np.testing.assert_array_equal(right, expected.astype(np.uint8))
    with_legend = overlay_mask(image, mask, PALETTE, CLASSES)
    assert with_legend.size[0] > 91 and with_legend.size[1] >= 67
    panel = np.asarray(with_legend)[:, 91:]
    # both present classes' colours appear as swatches, the absent one does not
    colours = {tuple(int(v) for v in p) for p in panel.reshape(-1, 3)}
    assert tuple(PALETTE[2]) in colours and tuple(PALETTE[0]) in colours and tuple(PALETTE[1]) not in colours
    with pytest.raises(ValueError, match="differ in size"):
        overlay_mask(image, mask[:10], PALETTE)
    with pytest.raises(ValueError, match="alpha"):
        overlay_mask(image, mask, PALETTE, alpha=2.0)


def test_load_errors(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="export it first"):
        Segmenter.load(ckpt, backend="onnxruntime")
    with pytest.raises(CheckpointNotFoundError):
        Segmenter.load(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown backend"):
        Segmenter.load(ckpt, backend="tensorrt")


def test_to_rgb_array_is_writable_uint8() -> None:
    arr = to_rgb_array(Image.new("L", (5, 4), 7))
    assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8 and arr.flags.writeable
    torch.from_numpy(arr)  # no "non-writable array" warning path
