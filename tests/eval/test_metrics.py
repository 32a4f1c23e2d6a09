"""ConfusionMatrix: hand-computed counts and metrics, ignore handling, reporting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from deeplab.eval.metrics import ConfusionMatrix
from deeplab.eval.report import save_confusion_png
from deeplab.viz import colormap, render_confusion


def _cm(pred: list, target: list, num_classes: int = 3, **kwargs) -> ConfusionMatrix:
    cm = ConfusionMatrix(num_classes, **kwargs)
    cm.update(torch.tensor(pred), torch.tensor(target))
    return cm


def test_hand_computed_matrix_and_metrics() -> None:
    # gt:   0 0 0 1 1 2 2 2 2 255
    # pred: 0 0 1 1 2 2 2 0 2 1     (last pixel ignored whatever was predicted)
    cm = _cm([0, 0, 1, 1, 2, 2, 2, 0, 2, 1], [0, 0, 0, 1, 1, 2, 2, 2, 2, 255])
    expected = torch.tensor([[2, 1, 0], [0, 1, 1], [1, 0, 3]])
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, expected)
    assert cm.total == 9
    # IoU_c = TP / (GT + PRED - TP): class 0: 2/(3+3-2), class 1: 1/(2+2-1), class 2: 3/(4+4-3)
    iou = [2 / 4, 1 / 3, 3 / 5]
    assert torch.allclose(cm.iou, torch.tensor(iou, dtype=torch.float64))
    assert cm.miou == pytest.approx(sum(iou) / 3)
    assert cm.pixel_accuracy == pytest.approx(6 / 9)
    acc = [2 / 3, 1 / 2, 3 / 4]
    assert torch.allclose(cm.class_accuracy, torch.tensor(acc, dtype=torch.float64))
    assert cm.mean_class_accuracy == pytest.approx(sum(acc) / 3)
    assert cm.fw_iou == pytest.approx(3 / 9 * iou[0] + 2 / 9 * iou[1] + 4 / 9 * iou[2])


def test_ignore_pixels_are_dropped_even_with_out_of_range_predictions() -> None:
    cm = _cm([0, 7, 1], [0, 255, 1], num_classes=2)
    assert torch.equal(cm.matrix, torch.tensor([[1, 0], [0, 1]]))
    custom = _cm([0, 1, 1], [-1, 1, -1], num_classes=2, ignore_index=-1)
    assert torch.equal(custom.matrix, torch.tensor([[0, 0], [0, 1]]))


def test_class_absent_from_gt_and_prediction_is_nan_and_excluded() -> None:
    # Class 2 never appears: excluded from mIoU (not counted as 0 or 1).
    cm = _cm([0, 1, 1, 1], [0, 0, 1, 1])
    assert math.isnan(cm.iou[2])
    assert math.isnan(cm.class_accuracy[2])
    assert cm.miou == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert cm.mean_class_accuracy == pytest.approx((1 / 2 + 1) / 2)


def test_false_positive_only_class_counts_as_zero_iou() -> None:
    # Class 2 is predicted but absent from the ground truth: union > 0, IoU 0, in the mean
    # (TF's mean_iou does the same); its accuracy is undefined (no GT pixels).
    cm = _cm([0, 2], [0, 0])
    assert cm.iou[2] == 0.0
    assert math.isnan(cm.iou[1])
    assert cm.miou == pytest.approx((1 / 2 + 0.0) / 2)
    assert math.isnan(cm.class_accuracy[2])
    assert cm.mean_class_accuracy == pytest.approx(1 / 2)
    assert cm.fw_iou == pytest.approx(1 / 2)


def test_perfect_prediction() -> None:
    target = torch.tensor([[0, 1, 2], [2, 255, 1]])
    cm = ConfusionMatrix(3)
    cm.update(target.clamp(max=2), target)  # prediction 2 at the ignored pixel
    assert cm.miou == 1.0 and cm.pixel_accuracy == 1.0
    assert cm.mean_class_accuracy == 1.0 and cm.fw_iou == 1.0
    assert torch.equal(cm.matrix, torch.diag(torch.tensor([1, 2, 2])))


def test_all_wrong() -> None:
    cm = _cm([1, 2, 0, 0], [0, 1, 2, 2])
    assert cm.miou == 0.0 and cm.pixel_accuracy == 0.0
    assert cm.mean_class_accuracy == 0.0 and cm.fw_iou == 0.0
    assert cm.matrix.diagonal().sum() == 0 and cm.total == 4


def test_empty_matrix_is_nan_not_zero() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert cm.total == 0
    assert math.isnan(cm.miou) and math.isnan(cm.pixel_accuracy) and math.isnan(cm.fw_iou)
    assert cm.summary()["mIoU"] is None


def test_updates_accumulate_and_reset() -> None:
    cm = ConfusionMatrix(2)
    for _ in range(3):
        cm.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 0], [1, 255]]))
    assert torch.equal(cm.matrix, torch.tensor([[3, 3], [0, 3]]))
    cm.reset()
    assert cm.total == 0


def test_any_integer_shape_and_dtype() -> None:
    pred = torch.randint(0, 4, (2, 5, 7), dtype=torch.int32)
    target = torch.randint(0, 4, (2, 5, 7), dtype=torch.uint8)
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    flat = ConfusionMatrix(4)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        flat.matrix[t, p] += 1
    assert torch.equal(cm.matrix, flat.matrix)


def test_bad_inputs_raise_clear_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"label\(s\) \[3, 7\].*ignore_index=255"):
        cm.update(torch.tensor([0, 0, 0]), torch.tensor([3, 7, 255]))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="predictions contain"):
        cm.update(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)
    assert cm.total == 0  # failed updates leave the counts untouched


def test_all_reduce_without_distributed_is_noop() -> None:
    cm = _cm([0, 1], [0, 1])
    assert cm.all_reduce() is cm
    assert torch.equal(cm.matrix, torch.eye(3, dtype=torch.int64) * torch.tensor([1, 1, 0]))


def test_summary_is_json_and_complete() -> None:
    cm = _cm([0, 1, 1, 1], [0, 0, 1, 1])
    summary = cm.summary(["sky", "road", "car"])
    text = json.dumps(summary, allow_nan=False)  # NaN must have become null
    back = json.loads(text)
    assert list(back["per_class"]) == ["sky", "road", "car"]
    assert back["per_class"]["car"]["iou"] is None
    assert back["per_class"]["sky"] == {"iou": 0.5, "accuracy": 0.5, "gt_pixels": 2, "pred_pixels": 1}
    assert back["mIoU"] == pytest.approx(cm.miou)
    assert back["classes_in_miou"] == 2 and back["pixels"] == 4
    with pytest.raises(ValueError, match="2 class names"):
        cm.summary(["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        cm.summary(["a", "a", "b"])


def test_format_table_lists_every_class_in_percent() -> None:
    cm = _cm([0, 1, 1, 1], [0, 0, 1, 1])
    table = cm.format_table(["sky", "road", "car"])
    lines = table.splitlines()
    row = {line.split()[0]: line.split()[1:] for line in lines[2:5]}
    assert row["sky"][:2] == ["50.00", "50.00"]
    assert row["road"][:2] == ["66.67", "100.00"]
    assert row["car"][:2] == ["-", "-"]
    assert "mIoU 58.33 (over 2/3 classes)" in table


def test_confusion_png_colours_match_row_normalised_matrix(tmp_path) -> None:
    # rows: gt 0 -> 3/4 correct, gt 1 -> all predicted as 0, gt 2 absent (grey row)
    cm = _cm([0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1])
    norm = cm.normalized()
    assert torch.allclose(norm, torch.tensor([[0.75, 0.25, 0], [1.0, 0, 0], [0, 0, 0]], dtype=torch.float64))
    image, layout = render_confusion(norm, ["a", "b", "c"], cm.matrix)
    x0, y0, cell = layout["x0"], layout["y0"], layout["cell"]

    def pixel(r: int, c: int):  # cell corner, away from any annotation text
        return image.getpixel((x0 + c * cell + 2, y0 + r * cell + 2))

    assert pixel(0, 0) == colormap(0.75)
    assert pixel(0, 1) == colormap(0.25)
    assert pixel(1, 0) == colormap(1.0) == (253, 231, 37)
    assert pixel(1, 1) == colormap(0.0) == (68, 1, 84)
    assert pixel(2, 2) == (200, 200, 200)

    path = save_confusion_png(cm, tmp_path / "sub" / "confusion.png", ["a", "b", "c"])
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == image.size


def test_confusion_png_many_classes(tmp_path) -> None:
    cm = ConfusionMatrix(150)
    cm.update(torch.arange(150), torch.arange(150))
    path = save_confusion_png(cm, tmp_path / "c.png")
    with Image.open(path) as saved:
        assert 600 < saved.width < 1400 and 600 < saved.height < 1400
