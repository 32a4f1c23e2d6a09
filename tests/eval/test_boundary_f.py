"""Boundary F-score (Csurka et al. 2013) against a hand-worked case: a 10 x 10 square predicted
one pixel to the right, at tolerance 0 and 2; absent classes, void, and the dataset mean."""

from __future__ import annotations

import math

import pytest
import torch

from deeplab.eval.metrics import BoundaryFScore, binary_boundary, boundary_f1


def squares(shift: int = 0) -> torch.Tensor:
    m = torch.zeros(30, 30, dtype=torch.long)
    m[10:20, 10 + shift:20 + shift] = 1
    return m


def test_binary_boundary_is_the_inner_4_connected_ring() -> None:
    b = binary_boundary(squares() == 1)
    assert int(b.sum()) == 36  # 10 x 10 square: 100 - 8 x 8
    assert not bool(b[11:19, 11:19].any())
    # The image border is not a boundary: a class filling the image has none.
    assert int(binary_boundary(torch.ones(5, 5, dtype=torch.bool)).sum()) == 0


def test_shifted_square_by_hand() -> None:
    truth, pred = squares(0), squares(1)
    # Tolerance 0: the two 36 px rings of the square share rows 10 and 19 at columns 11..19:
    # 18 px, so P = R = 1/2 and F = 0.5. Background: its boundary is the 40 px ring of
    # 4-neighbours around the square; the shifted rings share 18 px (rows 9, 20 at cols
    # 11..19): P = R = 18/40, F = 0.45.
    f0 = boundary_f1(pred, truth, 2, 0)
    assert f0[1].item() == pytest.approx(0.5, abs=1e-12)
    assert f0[0].item() == pytest.approx(0.45, abs=1e-12)
    # Tolerance 2 (Euclidean): every boundary pixel is 1 px from the other ring: F = 1.
    f2 = boundary_f1(pred, truth, 2, 2)
    assert f2.tolist() == [1.0, 1.0]
    # Exact match at tolerance 0.
    assert boundary_f1(truth, truth, 2, 0).tolist() == [1.0, 1.0]


def test_absent_missing_and_void_classes() -> None:
    truth = squares(0)
    pred = torch.zeros_like(truth)  # the square is missed entirely
    f = boundary_f1(pred, truth, 3, 2)
    assert f[1].item() == 0.0  # boundary in the truth, none predicted: F = 0
    assert f[0].item() == 0.0  # the background's boundary is not predicted either
    assert math.isnan(f[2].item())  # class 2 is nowhere: not scored
    # Predictions on void pixels are not judged: a wrong class under void changes nothing.
    truth_void = truth.clone()
    truth_void[:5] = 255
    noisy = truth.clone()
    noisy[:5] = 2
    assert boundary_f1(noisy, truth_void, 3, 0)[[0, 1]].tolist() == [1.0, 1.0]
    assert math.isnan(boundary_f1(noisy, truth_void, 3, 0)[2].item())
    with pytest.raises(ValueError, match="tolerance"):
        boundary_f1(pred, truth, 2, -1)


def test_dataset_score_is_the_mean_over_images_per_class() -> None:
    meter = BoundaryFScore(2, 0)
    meter.update(torch.stack([squares(1), squares(0)]), torch.stack([squares(0), squares(0)]))
    # Class 1: images score 0.5 and 1.0; background 0.45 and 1.0.
    assert meter.per_class.tolist() == pytest.approx([0.725, 0.75], abs=1e-12)
    assert meter.mean == pytest.approx(0.7375, abs=1e-12)
    summary = meter.summary(["bg", "square"])
    assert summary["tolerance_px"] == 0 and summary["images_per_class"] == {"bg": 2, "square": 2}
