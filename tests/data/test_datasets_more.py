"""CamVid, COCO-Stuff-164k and PASCAL-Context: tiny trees in the real layouts load with the right ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab.data import DATASETS, PALETTES, DatasetError, DatasetNotFoundError, build_dataset
from deeplab.data.palettes import CAMVID_CLASSES, COCO_STUFF_CLASSES, PASCAL_CONTEXT_CLASSES


def save_rgb(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def save_mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def test_camvid_segnet_layout(tmp_path: Path) -> None:
    root = tmp_path / "CamVid"
    raw = np.array([[0, 3, 10], [11, 8, 11]])
    for split in ("train", "val"):
        save_rgb(root / split / "0001TP_006690.png", 2, 3)
        save_mask(root / f"{split}annot" / "0001TP_006690.png", raw)
    ds = build_dataset("camvid", str(tmp_path), "train")  # the parent of CamVid/ works too
    assert len(ds) == 1 and ds.num_classes == 11 == len(CAMVID_CLASSES)
    np.testing.assert_array_equal(ds.load_mask(0), [[0, 3, 10], [255, 8, 255]])
    assert ds.classes[3] == "road" and ds.palette[3] == (128, 64, 128)
    assert len(build_dataset("camvid", str(root), "trainval")) == 2
    save_mask(root / "valannot" / "0001TP_006690.png", np.array([[12, 0, 0], [0, 0, 0]]))
    with pytest.raises(DatasetError, match="0001TP_006690.png.*12"):
        build_dataset("camvid", str(root), "val").load_mask(0)
    with pytest.raises(DatasetNotFoundError, match="SegNet"):
        build_dataset("camvid", str(tmp_path / "nowhere"), "train")


def test_coco_stuff_maps_stuffthingmaps_to_171_ids(tmp_path: Path) -> None:
    root = tmp_path / "coco_stuff164k"
    # raw = COCO id - 1: 0 person, 11 (id 12, unused), 12 stop sign (id 13), 91 banner (id 92), 181 wood, 255
    raw = np.array([[0, 11, 12], [91, 181, 255]])
    save_rgb(root / "images" / "val2017" / "000000000139.jpg", 2, 3)
    save_mask(root / "annotations" / "val2017" / "000000000139.png", raw)
    ds = build_dataset("coco_stuff", str(root), "val")
    assert ds.num_classes == 171 == len(COCO_STUFF_CLASSES)
    mask = ds.load_mask(0)
    np.testing.assert_array_equal(mask, [[0, 255, 11], [80, 170, 255]])
    assert ds.classes[0] == "person" and ds.classes[11] == "stop sign"
    assert ds.classes[80] == "banner" and ds.classes[170] == "wood"
    with pytest.raises(DatasetNotFoundError, match="train2017"):
        build_dataset("coco_stuff", str(root), "train")


def test_pascal_context_59(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    save_rgb(voc / "JPEGImages" / "2008_000002.jpg", 2, 2)
    save_mask(voc / "SegmentationClassContext" / "2008_000002.png", np.array([[0, 1], [59, 37]]))
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets" / "SegmentationContext" / "train.txt").write_text("2008_000002\n")
    ds = build_dataset("pascal_context", str(tmp_path), "train")
    assert ds.num_classes == 59 == len(PASCAL_CONTEXT_CLASSES)
    np.testing.assert_array_equal(ds.load_mask(0), [[255, 0], [58, 36]])
    assert ds.classes[0] == "aeroplane" and ds.classes[58] == "wood" and ds.classes[36] == "person"
    save_mask(voc / "SegmentationClassContext" / "2008_000002.png", np.array([[0, 1], [60, 300 % 256]]))
    with pytest.raises(DatasetError, match="2008_000002.png.*60"):
        ds.load_mask(0)
    with pytest.raises(DatasetNotFoundError, match="val.txt"):
        build_dataset("pascal_context", str(tmp_path), "val")


def test_registry_and_palettes_know_the_new_datasets() -> None:
    for name, n in (("camvid", 11), ("coco_stuff", 171), ("pascal_context", 59)):
        assert name in DATASETS
        classes, palette = PALETTES[name]
        assert len(classes) == len(palette) == n
        assert len(set(palette)) == n  # colours tell the classes apart
