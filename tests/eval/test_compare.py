"""`deeplab compare` on two reports written by the test: table, deltas, trimap, compare.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from deeplab.cli import main as cli
from deeplab.eval.compare import compare_reports, format_comparison, load_report
from deeplab.eval.report import write_report
from deeplab.eval.metrics import ConfusionMatrix, TrimapMeter

CLASSES = ["background", "cat", "dog"]


def write_run(folder: Path, matrix: list, arch: str, trimap: bool = True) -> Path:
    cm = ConfusionMatrix(3)
    cm.matrix += torch.tensor(matrix)
    sections = {}
    if trimap:
        meter = TrimapMeter([0, 4], 3, source="void")
        t = torch.zeros(10, 10, dtype=torch.long)
        t[3:7, 3:7] = 1
        t[2, :] = 255
        meter.update(t.clone(), t)
        sections["trimap"] = meter.summary(CLASSES)
    return write_report(cm, CLASSES, folder, extra={"arch": arch}, sections=sections)


def test_compare_two_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Run A: background 80/100, cat 50/..; run B improves cat.
    a = write_run(tmp_path / "a", [[80, 10, 10], [10, 40, 0], [0, 0, 50]], "deeplabv3")
    b = write_run(tmp_path / "b", [[80, 10, 10], [0, 50, 0], [0, 0, 50]], "deeplabv3plus")
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(a), str(b.parent), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    cm_a, cm_b = ConfusionMatrix(3), ConfusionMatrix(3)
    cm_a.matrix += torch.tensor([[80, 10, 10], [10, 40, 0], [0, 0, 50]])
    cm_b.matrix += torch.tensor([[80, 10, 10], [0, 50, 0], [0, 0, 50]])
    delta = 100 * (cm_b.miou - cm_a.miou)
    assert f"{100 * cm_a.miou:.2f}" in text and f"({delta:+.2f})" in text
    cat_delta = 100 * (float(cm_b.iou[1]) - float(cm_a.iou[1]))
    assert f"({cat_delta:+.2f})" in text and "IoU cat" in text
    assert "trimap 0px" in text and "trimap 4px" in text
    assert "deeplabv3 (a)" in text and "deeplabv3plus (b)" in text
    saved = json.loads((out / "compare.json").read_text())
    assert saved["per_class_delta"]["cat"][0] == pytest.approx(float(cm_b.iou[1]) - float(cm_a.iou[1]))
    # The empty 0 px band stays "not measured", never 0.
    assert saved["trimap"]["widths"] == [0, 4] and saved["trimap"]["mIoU"]["deeplabv3 (a)"][0] is None
    with Image.open(out / "compare.png") as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_compare_reads_a_sibling_trimap_json_and_labels(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", [[5, 0, 0], [0, 5, 0], [0, 0, 5]], "x", trimap=False)
    b = write_run(tmp_path / "b", [[5, 0, 0], [0, 4, 1], [0, 0, 5]], "x", trimap=False)
    (b.parent / "trimap.json").write_text(json.dumps({"source": "boundary", "widths": [{"width": 2, "mIoU": 0.5}]}))
    comparison = compare_reports([load_report(a), load_report(b)], ["one", "two"])
    assert comparison["trimap"]["mIoU"] == {"one": [None], "two": [0.5]}
    assert comparison["labels"] == ["one", "two"]
    assert "values in %, (delta) vs one" in format_comparison(comparison)
    # Same label twice: made unique.
    assert compare_reports([load_report(a), load_report(a)])["labels"] == ["x (a)", "x (a) #2"]


def test_compare_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = write_run(tmp_path / "a", [[5, 0, 0], [0, 5, 0], [0, 0, 5]], "x")
    assert cli.main(["compare", str(a)]) == 2
    assert "at least two reports" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert cli.main(["compare", str(a), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deeplab compare: error:") and "not a deeplab evaluation report" in err
    assert cli.main(["compare", str(a), str(tmp_path / "missing.json")]) == 2
    assert "no such report" in capsys.readouterr().err
