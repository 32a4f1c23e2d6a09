"""Datasets read the layouts users download, and every bad file fails with its name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

try:  # tests/ as a package (tests/__init__.py) or as plain rootdir modules
    from tests.data_fixtures import (FOLDER_CLASSES, H, W, label_array, make_ade,
                                     make_cityscapes, make_folder, make_voc, save_image,
                                     save_mask)
except ImportError:
    from data_fixtures import (FOLDER_CLASSES, H, W, label_array, make_ade,  # type: ignore
                               make_cityscapes, make_folder, make_voc, save_image, save_mask)
from deeplab.data import (ADE20K, DATASETS, Cityscapes, DatasetError, DatasetNotFoundError,
                          FolderSegmentation, TrainTransform, VOCSegmentation, build_dataset)
from deeplab.data.palettes import VOC_CLASSES, VOC_PALETTE, voc_colormap


def _values(mask: np.ndarray) -> set:
    return set(np.unique(mask).tolist())


# ----------------------------------------------------------------------------- VOC
@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return make_voc(tmp_path, {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]},
                    aug={"train_aug": ["2007_000001", "2008_000009", "2008_000010"]})


def test_voc_reads_split_and_masks(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.ignore_index == 255
    assert ds.classes == VOC_CLASSES and ds.palette == VOC_PALETTE
    assert ds.names == ["2007_000001", "2007_000002"]
    image, mask = ds[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (W, H)
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, label_array((0, 1, 15, 255)))
    assert ds.get_path(0)[1].name == "2007_000001.png"
    assert len(VOCSegmentation(voc_root, "val")) == 1


def test_voc_root_may_be_the_voc2012_dir(voc_root: Path) -> None:
    a = VOCSegmentation(voc_root, "train")
    b = VOCSegmentation(voc_root / "VOCdevkit" / "VOC2012", "train")
    assert a.samples == b.samples


def test_voc_train_aug_uses_segmentationclassaug(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train_aug")
    assert len(ds) == 3
    assert all(m.parent.name == "SegmentationClassAug" for _, m in ds.samples)
    # the Aug masks hold class 7, the SegmentationClass ones 1 and 15: Aug ones were read
    assert _values(ds[0][1]) == {0, 7, 255}
    # the same images through the plain split still read SegmentationClass
    assert _values(VOCSegmentation(voc_root, "train")[0][1]) == {0, 1, 15, 255}


def test_voc_train_aug_list_at_root_and_path_format(tmp_path: Path) -> None:
    make_voc(tmp_path, {"val": ["2007_000003"]}, aug={"train_aug": ["2008_000009"]},
             aug_list_at_root=True)
    assert len(VOCSegmentation(tmp_path, "train_aug")) == 1
    # the "/JPEGImages/x.jpg /SegmentationClassAug/x.png" list format
    (tmp_path / "train_aug.txt").write_text(
        "/JPEGImages/2008_000009.jpg /SegmentationClassAug/2008_000009.png\n")
    assert VOCSegmentation(tmp_path, "train_aug").names == ["2008_000009"]


def test_voc_missing_aug_masks_say_what_to_get(tmp_path: Path) -> None:
    make_voc(tmp_path, {"train": ["2007_000001"]})
    seg = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (seg / "train_aug.txt").write_text("2007_000001\n")
    with pytest.raises(DatasetNotFoundError, match="SegmentationClassAug"):
        VOCSegmentation(tmp_path, "train_aug")


def test_voc_errors_name_the_path(tmp_path: Path, voc_root: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="JPEGImages") as e:
        VOCSegmentation(tmp_path / "nowhere", "train")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    with pytest.raises(DatasetNotFoundError, match=r"trainval\.txt"):
        VOCSegmentation(voc_root, "trainval")
    (voc_root / "VOCdevkit/VOC2012/SegmentationClass/2007_000002.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="2007_000002.png"):
        VOCSegmentation(voc_root, "train")


def test_voc_rgb_masks_are_mapped_through_the_palette(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train")
    ids = label_array((0, 1, 15, 255))
    rgb = np.asarray(voc_colormap(256), dtype=np.uint8)[ids]
    Image.fromarray(rgb).save(ds.samples[0][1])
    np.testing.assert_array_equal(ds[0][1], ids)


def test_bad_label_is_reported_with_file_and_values(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train")
    save_mask(ds.samples[1][1], label_array((0, 42, 21)))
    ds[0]  # the other file is fine
    with pytest.raises(DatasetError, match=r"2007_000002\.png.*21, 42"):
        ds[1]
    with pytest.raises(DatasetError, match=r"2007_000002\.png"):
        ds.validate()


def test_size_mismatch_names_both_files(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train")
    save_mask(ds.samples[0][1], np.zeros((H + 1, W), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"2007_000001\.png is 30x21.*2007_000001\.jpg is 30x20"):
        ds[0]
    save_mask(ds.samples[0][1], np.zeros((W, H), dtype=np.uint8))
    with pytest.raises(DatasetError, match="EXIF"):
        ds.validate()


def test_non_image_and_truncated_image_name_the_file(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train")
    img0, img1 = ds.samples[0][0], ds.samples[1][0]
    img0.write_text("this is not a jpeg")
    with pytest.raises(DatasetError, match=r"2007_000001\.jpg.*not an image"):
        ds[0]
    with pytest.raises(DatasetError, match=r"2007_000001\.jpg"):
        ds.validate()
    data = img1.read_bytes()
    img1.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"2007_000002\.jpg.*truncated"):
        ds[1]


def test_validate_reports_class_pixels(voc_root: Path) -> None:
    report = VOCSegmentation(voc_root, "train").validate(decode_images=True)
    ref = label_array((0, 1, 15, 255))
    assert report["samples"] == 2
    counts = report["class_pixels"]
    assert len(counts) == 21
    for c in (0, 1, 15):
        assert counts[c] == 2 * int((ref == c).sum())
    assert counts[2] == 0 and report["ignore_pixels"] == 2 * int((ref == 255).sum())
    assert "aeroplane" not in report["missing_classes"] and "bicycle" in report["missing_classes"]
    assert VOCSegmentation(voc_root, "train").validate(limit=1)["samples"] == 1


# ----------------------------------------------------------------------------- Cityscapes
def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, "train", label_ids=(0, 7, 8, 26, 33, 9))
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 3 and ds.num_classes == 19 and ds.classes[0] == "road"
    assert ds.names == ["aachen_000000_000019", "aachen_000001_000019", "bonn_000000_000019"]
    _, mask = ds[2]
    # unlabeled 0 -> 255, road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13, bicycle 33 -> 18,
    # parking 9 -> 255
    np.testing.assert_array_equal(mask, label_array((255, 0, 1, 13, 18, 255)))


def test_cityscapes_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="leftImg8bit"):
        Cityscapes(tmp_path, "train")
    make_cityscapes(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match=r"'val'.*\['train'\]"):
        Cityscapes(tmp_path, "val")
    (tmp_path / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"bonn_000000_000019_leftImg8bit\.png has no mask"):
        Cityscapes(tmp_path, "train")


# ----------------------------------------------------------------------------- ADE20K
def test_ade20k_shifts_labels_and_ignores_zero(tmp_path: Path) -> None:
    make_ade(tmp_path, values=(0, 1, 2, 150))
    ds = ADE20K(tmp_path, "train")  # root = the dir containing ADEChallengeData2016
    assert len(ds) == 2 and ds.num_classes == 150 and ds.classes[0] == "wall"
    np.testing.assert_array_equal(ds[0][1], label_array((255, 0, 1, 149)))
    val = ADE20K(tmp_path / "ADEChallengeData2016", "val")
    assert val.names == ["ADE_val_00000001"]
    with pytest.raises(ValueError, match="train"):
        ADE20K(tmp_path, "test")


def test_ade20k_rejects_values_above_150(tmp_path: Path) -> None:
    base = make_ade(tmp_path, values=(0, 151))
    with pytest.raises(DatasetError, match=r"ADE_train_00000001\.png.*151"):
        ADE20K(base, "train")[0]


# ----------------------------------------------------------------------------- folder
def test_folder_index_masks(tmp_path: Path) -> None:
    make_folder(tmp_path, classes_txt="background\nroad\ncar\n")
    ds = FolderSegmentation(tmp_path)
    assert ds.classes == ["background", "road", "car"] and ds.num_classes == 3
    assert len(ds.palette) == 3 and not ds.colors_given and ds.split == "all"
    assert ds.names == ["a", "b", "c"]
    np.testing.assert_array_equal(ds[0][1], label_array((0, 1, 2, 255)))


def test_folder_colour_masks_match_index_masks(tmp_path: Path) -> None:
    idx = FolderSegmentation(make_folder(tmp_path / "idx"))
    col = FolderSegmentation(make_folder(tmp_path / "col", colour=True))
    assert col.colors_given and col.palette == [c for _, c in FOLDER_CLASSES]
    assert col.ignore_color == (255, 255, 255)
    np.testing.assert_array_equal(col[1][1], idx[1][1])
    assert _values(col[1][1]) == {0, 1, 2, 255}


def test_folder_unknown_colour_names_file_and_colour(tmp_path: Path) -> None:
    make_folder(tmp_path, colour=True)
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[3, 4] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "masks" / "b.png")
    ds = FolderSegmentation(tmp_path)
    with pytest.raises(DatasetError, match=r"b\.png.*\(1, 2, 3\)"):
        ds[1]


def test_folder_ignore_colour_argument_and_hex_colours(tmp_path: Path) -> None:
    make_folder(tmp_path, colour=True,
                classes_txt="background #000000\nroad #804080\ncar 0 0 142\n")
    with pytest.raises(DatasetError, match=r"\(255, 255, 255\)"):
        FolderSegmentation(tmp_path)[0]  # white is no longer declared
    ds = FolderSegmentation(tmp_path, ignore_color=(255, 255, 255))
    np.testing.assert_array_equal(ds[0][1], label_array((0, 1, 2, 255)))


def test_folder_class_files_yaml_json_and_argument(tmp_path: Path) -> None:
    root = make_folder(tmp_path, colour=True)
    (root / "classes.txt").unlink()
    entries = [{"name": n, "color": list(c)} for n, c in FOLDER_CLASSES]
    (root / "classes.json").write_text(json.dumps({"classes": entries,
                                                   "ignore_color": [255, 255, 255]}))
    ds = FolderSegmentation(root)
    assert ds.classes == ["background", "road", "car"] and ds.class_source.endswith("classes.json")
    ref = label_array((0, 1, 2, 255))
    np.testing.assert_array_equal(ds[0][1], ref)
    (root / "classes.yaml").write_text(
        "- {name: background, color: '#000000'}\n- {name: road, color: [128, 64, 128]}\n"
        "- {name: car, color: [0, 0, 142]}\n- {name: __ignore__, color: [255, 255, 255]}\n")
    ds = FolderSegmentation(root)  # yaml wins over json
    assert ds.class_source.endswith("classes.yaml")
    np.testing.assert_array_equal(ds[0][1], ref)
    ds = FolderSegmentation(root, classes=["bg", "x", "y"])
    assert ds.classes == ["bg", "x", "y"] and not ds.colors_given
    with pytest.raises(DatasetError, match=r"b\.png is a colour image \(RGB\).*no colours"):
        ds[1]
    ds = FolderSegmentation(root, classes=FOLDER_CLASSES, mask_format="index")
    with pytest.raises(DatasetError, match=r"b\.png is a colour \(RGB\).*mask_format='index'"):
        ds[1]


def test_folder_class_list_errors(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="classes.txt"):
        FolderSegmentation(root)
    (root / "classes.txt").write_text("a 1 2 3\nb\n")
    with pytest.raises(DatasetError, match=r"\['b'\] do not"):
        FolderSegmentation(root)
    (root / "classes.txt").write_text("a 1 2 3\nb 1 2 3\n")
    with pytest.raises(DatasetError, match="share the colour"):
        FolderSegmentation(root)
    (root / "classes.txt").write_text("a\na\n")
    with pytest.raises(DatasetError, match="twice"):
        FolderSegmentation(root)
    (root / "classes.txt").write_text("a 1 2 300\n")
    with pytest.raises(DatasetError, match="line 1"):
        FolderSegmentation(root)


def test_folder_missing_mask_names_the_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"images/b\.jpg has no mask.*masks/b\.png"):
        FolderSegmentation(root)
    Image.new("L", (W, H)).save(root / "masks" / "b.jpg")
    with pytest.raises(DatasetError, match="must be PNG"):
        FolderSegmentation(root)


def test_folder_bad_label_and_non_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    save_mask(root / "masks" / "c.png", label_array((0, 3)), mode="L")
    (root / "README.md").write_text("ignored")
    (root / "images" / "notes.txt").write_text("not a sample: no image extension")
    (root / "images" / ".DS_Store").write_bytes(b"\0")
    ds = FolderSegmentation(root)
    assert ds.names == ["a", "b", "c"]
    with pytest.raises(DatasetError, match=r"masks/c\.png has label value\(s\) 3 outside the 3 classes"):
        ds[2]
    (root / "images" / "a.jpg").write_bytes(b"GIF89a but not really")
    with pytest.raises(DatasetError, match=r"images/a\.jpg.*not an image"):
        ds[0]


def test_folder_duplicate_stems(tmp_path: Path) -> None:
    root = make_folder(tmp_path, names=["a"])
    save_image(root / "images" / "a.png")
    with pytest.raises(DatasetError, match="share the name 'a'"):
        FolderSegmentation(root)


def test_folder_split_files_and_split_folders(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f", names=["a", "b", "c"], ext=".png")
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("c\nb.png\n")
    ds = FolderSegmentation(root, "val")
    assert ds.names == ["c", "b"] and ds.split == "val"
    with pytest.raises(DatasetNotFoundError, match=r"no split 'train'.*splits/train\.txt.*\['val'\]"):
        FolderSegmentation(root, "train")
    (root / "splits" / "val.txt").write_text("c\nzzz\n")
    with pytest.raises(DatasetNotFoundError, match="'zzz'"):
        FolderSegmentation(root, "val")

    sub = tmp_path / "sub"
    make_folder(sub / "tmp", names=["x"])
    (sub / "images").mkdir(parents=True)
    (sub / "masks").mkdir()
    (sub / "tmp" / "images").rename(sub / "images" / "train")
    (sub / "tmp" / "masks").rename(sub / "masks" / "train")
    (sub / "tmp" / "classes.txt").rename(sub / "classes.txt")
    ds = FolderSegmentation(sub, "train")
    assert ds.names == ["x"] and ds.get_path(0)[1] == sub / "masks" / "train" / "x.png"


def test_folder_palette_mask_is_index_and_binary_255_warns(tmp_path: Path) -> None:
    root = make_folder(tmp_path, names=["a"], classes_txt="background\nforeground\n")
    save_mask(root / "masks" / "a.png", label_array((0, 1)), mode="P")
    ds = FolderSegmentation(root)
    np.testing.assert_array_equal(ds[0][1], label_array((0, 1)))
    save_mask(root / "masks" / "a.png", label_array((0, 255)), mode="L")
    with pytest.warns(UserWarning, match="binary 0/255"):
        ds.validate()


# ----------------------------------------------------------------------------- shared
def test_build_dataset_lookup(tmp_path: Path, voc_root: Path) -> None:
    assert set(DATASETS) == {"voc", "cityscapes", "ade20k", "folder", "camvid", "coco_stuff", "pascal_context"}
    ds = build_dataset("voc", str(voc_root), "val")
    assert isinstance(ds, VOCSegmentation) and len(ds) == 1
    folder = build_dataset("folder", str(make_folder(tmp_path / "f")), None, seed=1)
    assert isinstance(folder, FolderSegmentation) and folder.seed == 1
    with pytest.raises(ValueError, match=r"unknown dataset 'coco'; choose from \['ade20k', 'camvid', "
                                         r"'cityscapes', 'coco_stuff', 'folder', 'pascal_context', 'voc'\]"):
        build_dataset("coco", str(tmp_path), "train")


def test_transform_and_per_sample_seeds(voc_root: Path) -> None:
    t = TrainTransform(crop_size=16, scale_range=(0.5, 2.0))
    ds = VOCSegmentation(voc_root, "train_aug", transform=t, seed=7)
    a, b = ds[0], ds[0]
    assert a[0].shape == (3, 16, 16) and a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    epochs = []
    for e in range(4):
        ds.set_epoch(e)
        epochs.append(ds[0][0])
    assert any(not torch.equal(epochs[0], x) for x in epochs[1:])
    # an (index, seed) key seeds the generator directly
    k1, k2 = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(k1[0], k2[0])
    # negative indices and out-of-range ones behave like a sequence
    assert torch.equal(ds[-3][0], ds[0][0])
    with pytest.raises(IndexError):
        ds[3]


def test_seeded_samples_do_not_depend_on_workers(voc_root: Path) -> None:
    t = TrainTransform(crop_size=16)
    ds = VOCSegmentation(voc_root, "train_aug", transform=t, seed=3)
    ds.set_epoch(2)
    main = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    for (x, y), (img, mask) in zip(loader, main):
        assert torch.equal(x[0], img) and torch.equal(y[0], mask)


def test_transform_without_generator_parameter(voc_root: Path) -> None:
    # a user transform that knows nothing of generators still works unseeded
    ds = VOCSegmentation(voc_root, "val", transform=lambda im, m: (im.size, m.shape))
    assert ds[0] == ((W, H), (H, W))


def test_folder_16bit_and_1bit_masks(tmp_path: Path) -> None:
    root = make_folder(tmp_path, names=["a", "b"], classes_txt="background\nroad\ncar\n")
    Image.fromarray(label_array((0, 2, 1000)).astype(np.uint16)).save(root / "masks" / "a.png")
    Image.fromarray(label_array((0, 1)).astype(bool)).save(root / "masks" / "b.png")
    ds = FolderSegmentation(root)
    assert Image.open(root / "masks" / "b.png").mode == "1"
    np.testing.assert_array_equal(ds[1][1], label_array((0, 1)))
    with pytest.raises(DatasetError, match=r"a\.png has label value\(s\) 1000 outside"):
        ds[0]
