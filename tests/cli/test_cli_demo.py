"""`deeplab demo` end to end: real photos, real ImageNet weights, training, report, overlays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from deeplab.cli import main as cli


@pytest.mark.network  # demo photos (Debian package) and ImageNet weights (torchvision)
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # Hermetic caches: the demo fetches its data and weights from the registries itself.
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "2", "--eval-every", "2", "--batch-size", "2",
                     "--crop-size", "97", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trains and evaluates on the same 4 photos" in printed
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["images"] == 4
    # the reported mIoU is the one of the stored matrix: IoU per class present in truth or prediction
    matrix = torch.tensor(report["confusion_matrix"], dtype=torch.float64)
    union = matrix.sum(0) + matrix.sum(1) - matrix.diag()
    assert int(matrix.sum()) > 0 and report["metrics"]["mIoU"] == pytest.approx(
        float((matrix.diag()[union > 0] / union[union > 0]).mean()), abs=1e-9)
    assert f"mIoU {100 * report['metrics']['mIoU']:.2f}" in printed
    assert (out / "confusion.png").is_file() and (out / "last.pt").is_file()
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 4
    photo = Image.open(tmp_path / "cache" / "demo_data" / "images" / "2011_000003.jpg")
    panel = Image.open(out / "overlays" / "2011_000003.png")
    assert panel.size[0] == 3 * photo.size[0] and panel.size[1] > photo.size[1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("mIoU" in r for r in records)
