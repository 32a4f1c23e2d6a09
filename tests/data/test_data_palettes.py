"""Class lists and palettes match the official tables."""

from __future__ import annotations

import numpy as np

from deeplab.data.palettes import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES,
                                   CITYSCAPES_ID_TO_TRAINID, CITYSCAPES_PALETTE, PALETTES,
                                   VOC_CLASSES, VOC_PALETTE, cityscapes_lut, colorize,
                                   voc_colormap)


def test_voc_colormap_official_values() -> None:
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person"
    assert VOC_PALETTE[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert VOC_PALETTE[15] == (192, 128, 128) and VOC_PALETTE[20] == (0, 64, 128)
    assert voc_colormap(256)[255] == (224, 224, 192)
    assert len(set(voc_colormap(256))) == 256


def test_cityscapes_train_ids() -> None:
    assert len(CITYSCAPES_CLASSES) == 19 == len(CITYSCAPES_PALETTE)
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[18] == "bicycle"
    assert CITYSCAPES_PALETTE[13] == (0, 0, 142)  # car
    lut = cityscapes_lut()
    expect = {0: 255, 6: 255, 7: 0, 8: 1, 9: 255, 11: 2, 17: 5, 18: 255, 19: 6, 23: 10,
              24: 11, 26: 13, 29: 255, 30: 255, 31: 16, 33: 18, 34: 255, 255: 255}
    for label_id, train_id in expect.items():
        assert lut[label_id] == train_id, label_id
    assert sorted(t for t in CITYSCAPES_ID_TO_TRAINID.values() if t != 255) == list(range(19))


def test_ade20k_classes() -> None:
    assert len(ADE20K_CLASSES) == 150 == len(ADE20K_PALETTE)
    assert len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:4] == ["wall", "building", "sky", "floor"]
    assert ADE20K_CLASSES[-1] == "flag" and ADE20K_CLASSES[12] == "person"
    assert ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[-1] == (92, 0, 255)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K_PALETTE)
    assert set(PALETTES) == {"voc", "cityscapes", "ade20k", "camvid", "coco_stuff", "pascal_context"}


def test_colorize() -> None:
    mask = np.array([[0, 1], [15, 255]])
    out = colorize(mask, VOC_PALETTE, ignore_color=(9, 9, 9))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 1].tolist() == [128, 0, 0] and out[1, 0].tolist() == [192, 128, 128]
    assert out[1, 1].tolist() == [9, 9, 9]
