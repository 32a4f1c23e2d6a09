"""Trimap bands (paper Fig. 5): exact band sets on a hand-made mask, width 0, empty bands, the
"boundary" seed, and the trimap mIoU of a whole evaluation pass on real VOC-layout files checked
against an independent brute-force computation."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from deeplab.data import EvalTransform, build_dataset
from deeplab.eval.evaluate import evaluate, evaluate_detailed
from deeplab.eval.metrics import TrimapMeter, chebyshev_distance, label_boundary, trimap_bands

from tests.data_fixtures import save_image, save_mask

S = 40  # image side
LO, HI = 12, 28  # the object is rows/cols [LO, HI)
RING = 2  # void ring width around it, as VOC draws one along object boundaries


def square(lo: int, hi: int) -> np.ndarray:
    """Bool mask of rows/cols [lo, hi), clipped to the S x S image."""
    m = np.zeros((S, S), dtype=bool)
    m[max(lo, 0):max(min(hi, S), 0), max(lo, 0):max(min(hi, S), 0)] = True
    return m


def ringed_object() -> np.ndarray:
    """Background 0, a 16 x 16 object of class 1, a 2 px void ring between them."""
    t = np.zeros((S, S), dtype=np.int64)
    t[square(LO - RING, HI + RING)] = 255
    t[square(LO, HI)] = 1
    return t


def brute_force_chebyshev(seed: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the nearest seed pixel, max(|dy|, |dx|), by enumeration."""
    ys, xs = np.nonzero(seed)
    gy, gx = np.mgrid[0:seed.shape[0], 0:seed.shape[1]]
    if len(ys) == 0:
        return np.full(seed.shape, np.inf)
    d = np.maximum(np.abs(gy[..., None] - ys), np.abs(gx[..., None] - xs))
    return d.min(axis=-1).astype(float)


def test_void_bands_are_the_known_pixel_sets() -> None:
    t = ringed_object()
    widths = list(range(0, 11))
    bands = trimap_bands(torch.from_numpy(t), widths, source="void")
    for w, band in zip(widths, bands):
        # Outside the ring: the frame up to w px beyond it; inside: the object's outer w px.
        outer = square(LO - RING - w, HI + RING + w) & ~square(LO - RING, HI + RING)
        inner = square(LO, HI) & ~square(LO + w, HI - w)
        np.testing.assert_array_equal(band.numpy(), outer | inner, err_msg=f"width {w}")
    # Width 0 is the void set itself, which is never counted: the band is empty.
    assert int(bands[0].sum()) == 0
    # w = 1: the object's edge (16^2 - 14^2) plus the frame around the ring (22^2 - 20^2).
    assert int(bands[1].sum()) == (256 - 196) + (484 - 400)


def test_chebyshev_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    seed = rng.random((23, 31)) < 0.02
    got = chebyshev_distance(torch.from_numpy(seed), 6).numpy()
    want = np.minimum(brute_force_chebyshev(seed), 7)
    np.testing.assert_array_equal(got, want)
    # No seed at all: every pixel is "farther than max_distance".
    assert bool((chebyshev_distance(torch.zeros(5, 5, dtype=torch.bool), 3) == 4).all())


def test_boundary_seed_bands_without_void() -> None:
    t = np.zeros((S, S), dtype=np.int64)
    t[square(LO, HI)] = 1
    seed = label_boundary(torch.from_numpy(t)).numpy()
    # Both sides of the edge: the object's 1 px inner ring and the background's 1 px outer ring
    # (4-neighbours, so the outer ring has no corners).
    inner = square(LO, HI) & ~square(LO + 1, HI - 1)
    outer = square(LO - 1, HI + 1) & ~square(LO, HI)
    outer[[LO - 1, LO - 1, HI, HI], [LO - 1, HI, LO - 1, HI]] = False
    np.testing.assert_array_equal(seed, inner | outer)
    widths = [0, 1, 3, 5]
    for w, band in zip(widths, trimap_bands(torch.from_numpy(t), widths, source="boundary")):
        want = brute_force_chebyshev(inner | outer) <= w
        np.testing.assert_array_equal(band.numpy(), want, err_msg=f"width {w}")
    # Width 0 is the boundary line itself: not empty in this mode.
    assert int(trimap_bands(torch.from_numpy(t), [0], source="boundary")[0].sum()) == 60 + 64


def test_empty_band_is_reported_as_empty_not_zero() -> None:
    meter = TrimapMeter([0, 2], num_classes=2, source="void")
    t = torch.zeros(S, S, dtype=torch.long)
    t[square(LO, HI)] = 1  # no void anywhere: the void band is empty at every width
    meter.update(t.clone(), t)
    rows = meter.summary(["bg", "obj"])["widths"]
    assert [r["empty"] for r in rows] == [True, True]
    assert [r["mIoU"] for r in rows] == [None, None] and [r["pixels"] for r in rows] == [0, 0]
    assert "empty" in meter.format_table()


def test_bad_widths_and_sources_are_refused() -> None:
    t = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="widths"):
        trimap_bands(t, [-1])
    with pytest.raises(ValueError, match="choose from"):
        trimap_bands(t, [1], source="disk")
    with pytest.raises(ValueError, match="unique"):
        TrimapMeter([2, 2], num_classes=2)


# ---------------------------------------------------------------------- a whole pass on VOC files


class FixedPrediction(nn.Module):
    """Logits that put class ``label[i, j]`` on top, whatever the image (S x S inputs)."""

    output_stride = 1  # no OS*k+1 padding: the logits map 1:1 onto the image

    def __init__(self, label: np.ndarray, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.from_numpy(label), num_classes)
                             .permute(2, 0, 1).float()[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1)


def independent_miou(pred: List[np.ndarray], truth: List[np.ndarray], bands: List[np.ndarray], n: int) -> float:
    """mIoU over the pixels of the bands, by counting sets (no confusion-matrix code)."""
    ious = []
    for c in range(n):
        inter = sum(int(((p == c) & (t == c) & b).sum()) for p, t, b in zip(pred, truth, bands))
        union = sum(int((((p == c) | (t == c)) & b).sum()) for p, t, b in zip(pred, truth, bands))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)) if ious else float("nan")


def test_trimap_of_an_evaluation_pass_on_voc_files(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    truths = [ringed_object(), np.roll(ringed_object(), 5, axis=1)]
    for i, t in enumerate(truths):
        save_image(voc / "JPEGImages" / f"im{i}.jpg", seed=i, h=S, w=S)
        save_mask(voc / "SegmentationClass" / f"im{i}.png", t)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("im0\nim1\n")
    dataset = build_dataset("voc", tmp_path, "val", EvalTransform())
    # The prediction: the object shifted by 3 px down-right, class 15 in one corner.
    pred = np.zeros((S, S), dtype=np.int64)
    pred[square(LO + 3, HI + 3)] = 1
    pred[:4, :4] = 15
    model = FixedPrediction(pred, 21)
    widths = [0, 1, 2, 4, 8, 40]
    loader = DataLoader(dataset, batch_size=1)
    result = evaluate_detailed(model, loader, num_classes=21, trimap_widths=widths, progress=False, per_image=True)
    assert result.trimap is not None
    rows = result.trimap.summary(dataset.classes)["widths"]
    for w, row in zip(widths, rows):
        bands = [(brute_force_chebyshev(t == 255) <= w) & (t != 255) for t in truths]
        want = independent_miou([pred, pred], truths, bands, 21)
        assert row["pixels"] == sum(int(b.sum()) for b in bands)
        if w == 0:
            assert row["empty"] and row["mIoU"] is None
        else:
            assert row["mIoU"] == pytest.approx(want, abs=1e-12)
    # All options off: exactly the plain confusion matrix.
    plain = evaluate(model, loader, num_classes=21, progress=False)
    assert torch.equal(plain.matrix, result.confusion.matrix)
    # A 40 px band covers the whole 40 x 40 image: its matrix is the full one.
    assert torch.equal(result.trimap.matrices[-1].matrix, plain.matrix)
    # Per-image IoU: mean over the classes in that image's ground truth or prediction.
    valid = [t != 255 for t in truths]
    for score, t, v in zip(result.per_image, truths, valid):
        assert score.iou == pytest.approx(independent_miou([pred], [t], [v], 21), abs=1e-12)
