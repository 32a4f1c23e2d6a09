"""`deeplab predict --format ...`: the benchmark servers' layouts, scored by the official Cityscapes script."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
from PIL import Image

from deeplab.cli import main as cli
from deeplab.data.base import DatasetError
from deeplab.data.palettes import CITYSCAPES_ID_TO_TRAINID, COCO_STUFF_UNUSED
from deeplab.data.submission import SubmissionWriter, cityscapes_trainid_to_id

from tests.data_fixtures import make_cityscapes, make_folder

TINY = ["--backbone", "mobilenet_v2", "--pretrained-backbone", "none", "--crop-size", "33", "--batch-size", "2",
        "--num-workers", "0", "--device", "cpu", "--no-progress"]


def test_encodings_are_the_servers_ids(tmp_path: Path) -> None:
    lut = cityscapes_trainid_to_id()
    # road 7, sidewalk 8, ..., bicycle 33: every train id back to the label id that maps to it
    assert [int(lut[t]) for t in (0, 1, 2, 10, 11, 18)] == [7, 8, 11, 23, 24, 33]
    assert all(CITYSCAPES_ID_TO_TRAINID[int(lut[t])] == t for t in range(19))
    ids = np.arange(171).reshape(9, 19)
    raw = SubmissionWriter("coco-stuff", tmp_path, 171).encode(ids)
    assert raw.max() == 181 and not set(np.unique(raw).tolist()) & set(COCO_STUFF_UNUSED)
    assert SubmissionWriter("ade20k", tmp_path, 150).encode(np.array([[0, 149]])).tolist() == [[1, 150]]
    with pytest.raises(DatasetError, match="--format voc needs a model with 21 classes"):
        SubmissionWriter("voc", tmp_path, 19)


def test_voc_layout_palette_pngs(tmp_path: Path) -> None:
    writer = SubmissionWriter("voc", tmp_path, 21)
    mask = np.array([[0, 15], [20, 1]])
    path = writer.write(mask, "2008_000001")
    assert path == tmp_path / "results/VOC2012/Segmentation/comp6_test_cls/2008_000001.png"
    image = Image.open(path)
    assert image.mode == "P" and image.getpalette()[15 * 3:16 * 3] == [192, 128, 128]  # person
    assert np.asarray(image).tolist() == mask.tolist()


def _cityscapes_eval(pred_dir: Path, gt_files: list) -> Dict[str, Any]:
    """The official pixel-level evaluation (its instance part left out: it needs numpy < 2)."""
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    args = ev.args
    args.predictionPath, args.predictionWalk = str(pred_dir), None
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    preds = [ev.getPrediction(args, str(g)) for g in gt_files]
    return ev.evaluateImgLists(preds, [str(g) for g in gt_files], args)


def test_cityscapes_format_scores_the_same_on_the_official_script(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    root = make_cityscapes(tmp_path / "cs", "train", label_ids=(0, 7, 8, 26, 33, 11, 21))
    make_cityscapes(root, "val", cities={"frankfurt": 2, "lindau": 1}, label_ids=(7, 8, 26, 33, 11, 21, 4))
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "cityscapes", "--data-root", str(root), "--val-split", "none",
                     "--max-steps", "1", "--out", str(run), *TINY]) == 0
    ckpt = run / "last.pt"
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(root / "leftImg8bit" / "val"), "--out", str(out),
                     "--format", "cityscapes", "--overlay", "--quiet"]) == 2  # images only in sub-folders
    err = capsys.readouterr().err
    assert "folder has no image files" in err and "its sub-folders have some: add --recursive" in err
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(root / "leftImg8bit" / "val"), "--recursive",
                     "--out", str(out), "--format", "cityscapes", "--overlay", "--quiet"]) == 0
    masks = sorted((out / "results").rglob("*.png"))
    assert [m.name for m in masks] == ["frankfurt_000000_000019_leftImg8bit.png",
                                       "frankfurt_000001_000019_leftImg8bit.png",
                                       "lindau_000000_000019_leftImg8bit.png"]
    assert len(list((out / "overlays").glob("*_overlay.png"))) == 3
    values = set(np.unique(np.concatenate([np.asarray(Image.open(m)).ravel() for m in masks])).tolist())
    assert values <= set(cityscapes_trainid_to_id()[:19].tolist())  # label ids, not train ids

    gt = sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    official = _cityscapes_eval(out / "results", gt)
    report_dir = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--dataset", "cityscapes", "--data-root", str(root),
                     "--split", "val", "--out", str(report_dir), "--num-workers", "0", "--device", "cpu",
                     "--no-progress"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    theirs = official["classScores"]
    ours_by_name = {k: (float("nan") if v["iou"] is None else v["iou"]) for k, v in report["metrics"]["per_class"].items()}
    assert sum(not math.isnan(v) for v in theirs.values()) >= 3  # several classes scored, not a vacuous match
    for name, score in theirs.items():
        if math.isnan(score):
            assert ours_by_name.get(name) is None or math.isnan(ours_by_name[name])
        else:
            assert ours_by_name[name] == pytest.approx(score, abs=1e-9), name
    assert report["metrics"]["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=1e-9)


def test_eval_split_all_on_a_folder_dataset(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f")
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-root", str(root), "--train-split", "all", "--val-split", "none",
                     "--max-steps", "1", "--out", str(run), *TINY]) == 0
    assert cli.main(["eval", "--checkpoint", str(run / "last.pt"), "--dataset", "folder", "--data-root", str(root),
                     "--split", "all", "--out", str(tmp_path / "ev"), "--num-workers", "0", "--device", "cpu",
                     "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "ev" / "report.json").read_text())["per_image"]) == 3
