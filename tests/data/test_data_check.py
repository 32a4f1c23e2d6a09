"""``deeplab data check`` on fixture trees written here: each pitfall found with its file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
from PIL import Image

from deeplab.cli import main as cli
from deeplab.data import FolderSegmentation
from deeplab.data.check import check_dataset, median_frequency_weights, read_class_weights


def write_folder(root: Path, masks: Dict[str, np.ndarray], *, classes: str = "background\ncat\ndog\n",
                 sizes: Optional[Dict[str, tuple]] = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text(classes)
    rng = np.random.default_rng(0)
    for stem, mask in masks.items():
        h, w = (sizes or {}).get(stem, mask.shape[:2])
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def run_check(root: Path, out: Path, *extra: str) -> tuple:
    code = cli.main(["data", "check", "--dataset", "folder", "--data-root", str(root), "--out", str(out),
                     "--workers", "0", "--no-progress", *extra])
    report = json.loads((out / "data_report.json").read_text())
    return code, report


def problem(report: dict, kind: str) -> dict:
    found = [p for p in report["problems"] if p["kind"] == kind]
    assert found, f"no {kind} in {[p['kind'] for p in report['problems']]}"
    return found[0]


def test_clean_dataset_counts_equal_a_direct_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(1)
    masks = {f"m{i}": rng.integers(0, 3, (12, 16), dtype=np.uint8) for i in range(3)}
    masks["m0"][0, :5] = 255
    root = write_folder(tmp_path / "ds", masks)
    code, report = run_check(root, tmp_path / "out")
    assert code == 0
    stacked = np.stack(list(masks.values()))
    direct = np.bincount(stacked.ravel(), minlength=256)
    assert report["class_pixels"] == [int(v) for v in direct[:3]]
    assert report["ignore_pixels"] == int(direct[255]) == 5
    assert report["class_images"] == [sum(int((m == c).any()) for m in masks.values()) for c in range(3)]
    assert report["image_sizes"] == {"16x12": 3}
    assert report["errors"] == 0
    assert (tmp_path / "out" / "class_frequency.png").stat().st_size > 1000
    # the weights file is what --class-weights reads back
    assert read_class_weights(tmp_path / "out" / "class_weights.txt") == pytest.approx(tuple(report["class_weights"]),
                                                                                      rel=1e-5)
    assert "0 error(s)" in capsys.readouterr().out


def test_median_frequency_weights_by_hand() -> None:
    # freq = 10/100, 30/100, 5/50 -> 0.1, 0.3, 0.1; median 0.1 -> 1, 1/3, 1; unseen class -> 0
    assert median_frequency_weights([10, 30, 5, 0], [100, 100, 50, 0]) == pytest.approx([1.0, 1 / 3, 1.0, 0.0],
                                                                                        rel=1e-5)


def test_binary_0_255_masks_are_caught_and_label_map_fixes_them(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    masks = {}
    for i in range(3):
        m = np.zeros((10, 10), np.uint8)
        m[2:7, 2 + i:8] = 255
        masks[f"b{i}"] = m
    root = write_folder(tmp_path / "bin", masks, classes="background\nforeground\n")
    code, report = run_check(root, tmp_path / "out")
    assert code == 1
    found = problem(report, "binary_0_255")
    assert found["severity"] == "error" and found["count"] == 3
    assert str(root / "masks" / "b0.png") in found["files"]
    assert "--label-map 255:1" in found["fix"]
    assert "binary_0_255" in capsys.readouterr().out
    code, report = run_check(root, tmp_path / "out2", "--label-map", "255:1")
    assert code == 0
    assert report["ignore_pixels"] == 0
    assert report["class_pixels"][1] == sum(int((m == 255).sum()) for m in masks.values())
    # the same from classes.txt
    (root / "classes.txt").write_text("background\nforeground\nlabel_map: 255:1\n")
    assert FolderSegmentation(root).load_mask(0).max() == 1


def test_each_pitfall_is_named_with_its_file(tmp_path: Path) -> None:
    ok = np.zeros((8, 8), np.uint8)
    ok[:4] = 1
    bad_label = ok.copy()
    bad_label[0, 0] = 7
    root = write_folder(tmp_path / "ds", {"good": ok, "label7": bad_label, "ignored": np.full((8, 8), 255, np.uint8),
                                          "small": ok}, sizes={"small": (9, 8)})
    Image.fromarray(np.full((8, 8, 3), (10, 200, 30), np.uint8)).save(root / "images" / "rgb.jpg")
    Image.fromarray(np.full((8, 8, 3), (10, 200, 30), np.uint8)).save(root / "masks" / "rgb.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "broken.jpg")
    (root / "masks" / "broken.png").write_bytes(b"not a png at all")
    code, report = run_check(root, tmp_path / "out")
    assert code == 1
    assert any("label7.png" in f and "[7]" in f for f in problem(report, "out_of_range")["files"])
    assert any("small.png" in f and "image 8x9" in f for f in problem(report, "size_mismatch")["files"])
    rgb = problem(report, "rgb_mask")["files"]
    assert any("rgb.png" in f and "(10, 200, 30)" in f for f in rgb)
    assert any("broken.png" in f for f in problem(report, "unreadable")["files"])
    allign = problem(report, "all_ignore")
    assert allign["severity"] == "warning" and any("ignored.png" in f for f in allign["files"])
    assert problem(report, "missing_class")["files"] == ["dog"]


def test_duplicate_stems_are_a_layout_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_folder(tmp_path / "dup", {"a": np.zeros((6, 6), np.uint8)})
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "images" / "a.png")
    code, report = run_check(root, tmp_path / "out")
    assert code == 1
    message = report["problems"][0]["what"]
    assert "a.jpg" in message and "a.png" in message
    assert "ERROR layout" in capsys.readouterr().out


@pytest.mark.spawn
def test_check_dataset_with_workers_matches_in_process(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    root = write_folder(tmp_path / "w", {f"x{i:03d}": rng.integers(0, 3, (6, 6), dtype=np.uint8) for i in range(64)})
    ds = FolderSegmentation(root)
    one = check_dataset(ds, workers=0, progress=False)
    two = check_dataset(ds, workers=2, progress=False)
    assert one == two


def test_label_map_trains_and_travels_to_eval(tmp_path: Path) -> None:
    masks = {}
    for i in range(2):
        m = np.zeros((20, 20), np.uint8)
        m[4:15, 3 + i:16] = 255
        masks[f"b{i}"] = m
    root = write_folder(tmp_path / "bin", masks, classes="background\nforeground\n")
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-root", str(root), "--train-split", "all",
                     "--val-split", "none", "--label-map", "255:1", "--max-steps", "1", "--backbone", "mobilenet_v2",
                     "--pretrained-backbone", "none", "--crop-size", "17", "--batch-size", "2", "--num-workers", "0",
                     "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    assert cli.main(["eval", "--checkpoint", str(run / "last.pt"), "--data-root", str(root), "--split", "all",
                     "--num-workers", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    text = json.dumps(report)
    # the foreground was evaluated as class 1, not ignored: the confusion matrix counts its pixels
    fg = sum(int((m == 255).sum()) for m in masks.values())
    cm = np.array(report["confusion_matrix"])
    assert int(cm[1].sum()) == fg, text[:300]
