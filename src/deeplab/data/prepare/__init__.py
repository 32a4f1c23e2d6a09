"""Official archives -> the layouts our loaders read (run by :mod:`deeplab.data.fetch`).

- :mod:`.sbd`: SBD ``cls/*.mat`` (``GTcls.Segmentation``) -> ``SegmentationClassAug/*.png`` and
  ``train_aug.txt`` (VOC train + SBD train + SBD val - VOC val = 10,582 ids).
- :mod:`.context`: PASCAL-Context ``trainval_merged.json`` (the Detail API's annotations) -> the
  59-class masks ``SegmentationClassContext/*.png`` and ``ImageSets/SegmentationContext/{train,val}.txt``.

Every converter writes into a ``*.partial`` folder and renames it into place when complete, so
an interrupted run leaves nothing that looks converted; a rerun starts that step again.
"""
