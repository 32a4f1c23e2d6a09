"""The paper's trained models by name: download, verify, convert and cache the TF model zoo.

>>> import deeplab
>>> model = deeplab.from_pretrained("xception65_coco_voc_trainaug")        # doctest: +SKIP
>>> seg = deeplab.Segmenter.from_pretrained("mobilenetv2_coco_voc_trainaug")  # doctest: +SKIP

Every entry of :data:`ZOO` is a tarball the authors released (tensorflow/models
``research/deeplab/g3doc/model_zoo.md``), served from its official location
``http://download.tensorflow.org/models/`` (``DEEPLAB_ZOO_URL`` or ``mirror=`` replaces that
base URL, for mirrors and air-gapped sites). On first use the tarball is streamed into
``$TORCH_HOME/hub/checkpoints/deeplab/`` by the package's one downloader, :mod:`deeplab.download`
(a ``.part`` file resumed with HTTP Range after a dropped connection, renamed into place when complete), its sha256 is printed, it is converted by
:mod:`deeplab.tf` from the ``model.ckpt`` it holds and saved next to it as a deeplab checkpoint
``NAME.pt`` (ImageNet backbones: a backbone state dict ``NAME.pth``) whose metadata records the
URL and the sha256. A later call finds ``NAME.pt`` and makes no request. A tarball put into that
folder by hand is used as it is, with no network.

The tarballs' sha256 are not published by the zoo, so none is pinned here: the sha256 of what was
downloaded is recorded (``converted_from.sha256``) and the content is checked by the converter
instead (every variable's name, shape and dtype accounted for, values finite). Sizes are those the
zoo page states.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import download as _download
from ._utils import DeeplabError, save_atomically, sha256_of
from .config import InferenceConfig

PathLike = Union[str, "os.PathLike[str]"]

ZOO_BASE_URL = "http://download.tensorflow.org/models/"
ZOO_URL_ENV = "DEEPLAB_ZOO_URL"
DOWNLOAD_TIMEOUT_S = _download.DOWNLOAD_TIMEOUT_S
MAX_STALLED_ATTEMPTS = _download.MAX_STALLED_ATTEMPTS

# The reference's eval crop (images padded to it): VOC and ADE20K 513x513, Cityscapes 1025x2049.
EVAL_PAD_TO = {"voc": (513, 513), "cityscapes": (1025, 2049), "ade20k": (513, 513)}
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CITYSCAPES_SCALES = (0.75, 1.0, 1.25)


class ZooError(DeeplabError, ValueError):
    """A zoo model cannot be had: unknown name, no network, refused, corrupt download."""


@dataclass(frozen=True)
class ZooEntry:
    """One released model of the TF model zoo.

    Attributes:
        name: the zoo's name (``xception65_coco_voc_trainaug``).
        tarball: file name under the base URL.
        dataset: ``voc``, ``cityscapes``, ``ade20k``, or ``None`` for an ImageNet backbone.
        backbone: our backbone name.
        arch: ``deeplabv3plus``, ``deeplabv3`` or ``backbone`` (an ImageNet checkpoint).
        classes: number of classes of the converted model (ADE20K: 150; the reference's 151st,
            "other", is left out).
        trained_on: what it was trained on, as the zoo says.
        eval_output_stride, eval_scales, eval_flip: the setting of the zoo's reported number.
        miou: the zoo's reported mIoU (percent) in that setting; ``None`` for backbones.
        miou_split: the split of that number (``val`` or ``test``: the trainval models are
            scored on the test server, so a val run is not comparable).
        size_mb: the tarball's size as the zoo page states it (``None`` when it does not).
        note: anything a user should know.
        reference_config: the preset of :data:`deeplab.tf.settings.REFERENCE_CONFIGS` that says how
            the reference ran it (output stride, atrous rates, multi-grid, decoder stride), which
            its weights cannot reveal; ``None`` for backbones.
    """

    name: str
    tarball: str
    dataset: Optional[str]
    backbone: str
    arch: str
    classes: int
    trained_on: str
    eval_output_stride: int = 16
    eval_scales: Tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    miou: Optional[float] = None
    miou_split: str = "val"
    size_mb: Optional[int] = None
    note: str = ""
    reference_config: Optional[str] = None

    @property
    def is_backbone(self) -> bool:
        return self.arch == "backbone"

    @property
    def filename(self) -> str:
        """File name of the converted model in the cache."""
        return f"{self.name}.pth" if self.is_backbone else f"{self.name}.pt"

    @property
    def pad_to(self) -> Optional[Tuple[int, int]]:
        return None if self.dataset is None else EVAL_PAD_TO[self.dataset]

    def url(self, mirror: Optional[str] = None) -> str:
        return base_url(mirror) + self.tarball

    def eval_inference(self) -> InferenceConfig:
        """The :class:`InferenceConfig` of the zoo's reported number (whole image, padded)."""
        return InferenceConfig(scales=self.eval_scales, flip=self.eval_flip, output_stride=self.eval_output_stride,
                               pad_to=self.pad_to)

    def eval_setting(self) -> str:
        scales = "1.0" if self.eval_scales == (1.0,) else f"{self.eval_scales[0]}:0.25:{self.eval_scales[-1]}"
        return f"OS {self.eval_output_stride}, scales {scales}{' + flip' if self.eval_flip else ''}"

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["eval_scales"] = list(self.eval_scales)
        return out


def _seg(name: str, tarball: str, dataset: str, backbone: str, arch: str, trained_on: str, **kw: Any) -> ZooEntry:
    classes = {"voc": 21, "cityscapes": 19, "ade20k": 150}[dataset]
    # The reference config of each released model: its family's preset for that dataset.
    preset = f"{backbone.replace('mobilenet_v2', 'mobilenetv2')}_{dataset}"
    return ZooEntry(name, tarball, dataset, backbone, arch, classes, trained_on, reference_config=preset, **kw)


def _backbone(name: str, tarball: str, backbone: str, size_mb: int, note: str = "") -> ZooEntry:
    return ZooEntry(name, tarball, None, backbone, "backbone", 0, "ImageNet", size_mb=size_mb, note=note)


# The covered entries of model_zoo.md, with the setting of each reported figure.
ZOO: Dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _seg("mobilenetv2_coco_voc_trainaug", "deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz", "voc",
             "mobilenet_v2", "deeplabv3", "COCO + VOC train_aug", miou=75.32, size_mb=23,
             note="no ASPP 3x3 branches, no decoder (image pooling + 1x1); OS 8 MS + flip: 77.33"),
        _seg("mobilenetv2_coco_voc_trainval", "deeplabv3_mnv2_pascal_trainval_2018_01_29.tar.gz", "voc",
             "mobilenet_v2", "deeplabv3", "COCO + VOC train_aug + trainval", eval_output_stride=8,
             eval_scales=PAPER_SCALES, eval_flip=True, miou=80.25, miou_split="test",
             note="scored on VOC test (evaluation server); its val number is not comparable"),
        _seg("xception65_coco_voc_trainaug", "deeplabv3_pascal_train_aug_2018_01_04.tar.gz", "voc",
             "xception65", "deeplabv3plus", "COCO + VOC train_aug", miou=82.20, size_mb=439,
             note="ASPP rates 6, 12, 18 at OS 16, decoder at OS 4; OS 8 MS + flip: 83.58"),
        _seg("xception65_coco_voc_trainval", "deeplabv3_pascal_trainval_2018_01_04.tar.gz", "voc",
             "xception65", "deeplabv3plus", "COCO + VOC train_aug + trainval", eval_output_stride=8,
             eval_scales=PAPER_SCALES, eval_flip=True, miou=87.80, miou_split="test",
             note="scored on VOC test (evaluation server); its val number is not comparable"),
        _seg("mobilenetv2_coco_cityscapes_trainfine", "deeplabv3_mnv2_cityscapes_train_2018_02_05.tar.gz",
             "cityscapes", "mobilenet_v2", "deeplabv3", "COCO + Cityscapes train_fine", miou=70.71,
             note="OS 8, scales 0.75:0.25:1.25 + flip: 73.57"),
        _seg("xception65_cityscapes_trainfine", "deeplabv3_cityscapes_train_2018_02_06.tar.gz", "cityscapes",
             "xception65", "deeplabv3plus", "ImageNet + Cityscapes train_fine", miou=78.79,
             note="OS 8, scales 0.75:0.25:1.25 + flip: 80.42"),
        _seg("xception65_ade20k_train", "deeplabv3_xception_ade20k_train_2018_05_29.tar.gz", "ade20k",
             "xception65", "deeplabv3plus", "ImageNet + ADE20K train", eval_output_stride=8,
             eval_scales=PAPER_SCALES, eval_flip=True, miou=45.65,
             note="pixel accuracy 82.52; 151 logits in TF, the 'other' class left out"),
        _backbone("xception41_imagenet", "xception_41_2018_05_09.tar.gz", "xception41", 288),
        _backbone("xception65_imagenet", "deeplabv3_xception_2018_01_04.tar.gz", "xception65", 447),
        _backbone("xception71_imagenet", "xception_71_2018_05_09.tar.gz", "xception71", 474),
        _backbone("resnet_v1_50_beta_imagenet", "resnet_v1_50_2018_05_04.tar.gz", "resnet_v1_50_beta", 274,
                  note="three 3x3 root convs (resnet_v1_beta.py)"),
        _backbone("resnet_v1_101_beta_imagenet", "resnet_v1_101_2018_05_04.tar.gz", "resnet_v1_101_beta", 477,
                  note="the paper's ResNet-101 (three 3x3 root convs)"),
    )
}


# --------------------------------------------------------------------------- where things are


def zoo_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints/deeplab`` (default ``~/.cache/torch/hub/checkpoints/deeplab``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / "deeplab"


def base_url(mirror: Optional[str] = None) -> str:
    """The base URL tarballs are fetched from: ``mirror``, else ``$DEEPLAB_ZOO_URL``, else the official one.

    A local folder (``/srv/mirror`` or ``file:///srv/mirror``) works as a mirror too.
    """
    url = mirror or os.environ.get(ZOO_URL_ENV) or ZOO_BASE_URL
    if "://" not in url:
        url = Path(url).expanduser().resolve().as_uri()
    return url if url.endswith("/") else url + "/"


def get_entry(name: str) -> ZooEntry:
    """The entry called ``name``; an unknown name is an error that lists the choices."""
    if name not in ZOO:
        raise ZooError(f"unknown model-zoo name {name!r}; choose from {sorted(ZOO)} (deeplab weights list)")
    return ZOO[name]


def imagenet_entry(backbone: str) -> Optional[str]:
    """The zoo's ImageNet entry for a backbone that has no public PyTorch file, else ``None``.

    Only the TF-layout ResNets qualify: the Xceptions have timm's TF-ported files already.
    """
    if not backbone.startswith("resnet_v1_"):
        return None
    return next((e.name for e in ZOO.values() if e.is_backbone and e.backbone == backbone), None)


def cache_state(entry: ZooEntry, cache_dir: Optional[PathLike] = None) -> str:
    """``converted``, ``tarball`` (downloaded, not converted yet), ``partial`` (a ``.part`` file) or ``-``."""
    directory = Path(cache_dir) if cache_dir is not None else zoo_dir()
    if (directory / entry.filename).is_file():
        return "converted"
    if (directory / entry.tarball).is_file():
        return "tarball"
    if (directory / (entry.tarball + ".part")).is_file():
        return "partial"
    return "-"


# --------------------------------------------------------------------------- downloading


def download(url: str, dest: PathLike, *, progress: bool = True, timeout: float = DOWNLOAD_TIMEOUT_S) -> str:
    """Stream ``url`` to ``dest`` with :func:`deeplab.download.download` and return the file's sha256.

    Resumed with HTTP Range, renamed into place when complete (see :mod:`deeplab.download`).

    Raises:
        ZooError: the server cannot be reached or refuses (the message says where to put the
            file by hand), or the connection keeps dropping without progress.
    """
    try:
        return _download.download(url, dest, progress=progress, timeout=timeout,
                                   mirror_hint=f"{ZOO_URL_ENV}=URL or --mirror URL")
    except _download.DownloadError as exc:
        raise ZooError(str(exc)) from exc


# --------------------------------------------------------------------------- converting and caching


def _convert(entry: ZooEntry, tarball: Path, dest: Path, *, url: str, sha256: str, progress: bool) -> None:
    from .checkpoint import save_checkpoint
    from .tf.convert import ConversionError, ConversionWarning, convert_checkpoint

    if progress:
        print(f"converting {tarball.name} -> {dest}", file=sys.stderr)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConversionWarning)
            conv = convert_checkpoint(tarball, dataset=entry.dataset, backbone_only=entry.is_backbone,
                                      reference_config=entry.reference_config)
    except ConversionError as exc:
        # A tarball that does not convert is no cache entry: delete it so the next call fetches it again.
        tarball.unlink(missing_ok=True)
        raise ZooError(f"{tarball} (sha256 {sha256[:16]}...) is not the {entry.name} model: {exc}; it was deleted, "
                       f"run again to download it from {url}") from exc
    for warning in caught:
        if progress and issubclass(warning.category, ConversionWarning):
            head, *names = str(warning.message).splitlines()
            print(f"{entry.name}: {head.rstrip(':')}: {', '.join(n.strip() for n in names)}", file=sys.stderr)
    if conv.recognised.backbone != entry.backbone:
        tarball.unlink(missing_ok=True)
        raise ZooError(f"{tarball} holds a {conv.recognised.backbone} model, but {entry.name} is {entry.backbone}; it "
                       f"was deleted, run again to download it from {url}")
    info = {"zoo": entry.name, "url": url, "tarball": entry.tarball, "sha256": sha256}
    if entry.is_backbone:
        save_atomically(conv.state_dict(), dest)
        return
    payload = conv.checkpoint_payload(source=url)
    payload["converted_from"].update(info)
    payload["zoo"] = entry.to_dict()
    save_checkpoint(dest, payload)


def pretrained_path(name: str, *, mirror: Optional[str] = None, progress: bool = True,
                    cache_dir: Optional[PathLike] = None) -> Path:
    """The converted file of zoo model ``name``: downloaded and converted on first use, then cached.

    Args:
        name: a key of :data:`ZOO`.
        mirror: base URL to fetch from instead of the official one (or a local folder).
        progress: tqdm bar and one-line messages on stderr.
        cache_dir: default :func:`zoo_dir`.

    Returns:
        ``NAME.pt`` (a deeplab checkpoint) or, for an ImageNet backbone, ``NAME.pth`` (a state
        dict for ``pretrained_backbone``).

    Raises:
        ZooError: unknown name, no network (the message names the URL, the file and the folder
            to put it in), or a tarball that is not the model (deleted again).
    """
    entry = get_entry(name)
    directory = Path(cache_dir) if cache_dir is not None else zoo_dir()
    dest = directory / entry.filename
    if dest.is_file():
        return dest
    directory.mkdir(parents=True, exist_ok=True)
    tarball = directory / entry.tarball
    url = entry.url(mirror)
    if tarball.is_file():  # put there by hand (air-gapped), or downloaded by a run that stopped converting
        sha256 = sha256_of(tarball)
        source = tarball.as_uri()
    else:
        if progress:
            print(f"downloading {entry.name} from {url}", file=sys.stderr)
        sha256 = download(url, tarball, progress=progress)
        source = url
    if progress:
        print(f"{entry.tarball}: sha256 {sha256}", file=sys.stderr)
    _convert(entry, tarball, dest, url=source, sha256=sha256, progress=progress)
    return dest


def backbone_weights(backbone: str, spec: Optional[PathLike], *, fetch: bool = True) -> Optional[str]:
    """Resolve a ``pretrained_backbone`` value to what :func:`deeplab.models.build_model_from_config`
    loads: the one place training turns ``imagenet`` / ``zoo:NAME`` / a path / ``none`` into a file.

    Args:
        backbone: the ModelConfig's backbone name.
        spec: ``"imagenet"`` (the backbone's public file; the TF zoo's ImageNet checkpoint for the
            ``resnet_v1_*_beta`` backbones that have no public PyTorch file), ``"zoo:NAME"``, a
            ``.pth`` path, or ``"none"``/``None`` (random initialisation).
        fetch: download what is not cached yet (the main process of a distributed run fetches
            first; the others call again with ``fetch=False`` after a barrier and read the cache).

    Returns:
        ``None`` for no pretrained backbone, else a value for ``pretrained_backbone``.

    Raises:
        ZooError: an unknown zoo name or a failed download.
    """
    if spec is None or str(spec).strip().lower() in ("none", ""):
        return None
    text = str(spec)
    zoo_name = text[len("zoo:"):] if text.startswith("zoo:") else imagenet_entry(backbone) if text == "imagenet" else None
    if zoo_name is not None:
        return str(pretrained_path(zoo_name))  # cached after the first call: no request
    if fetch:
        from .weights import resolve_pretrained

        resolve_pretrained(backbone, text)
    return text


def from_pretrained(name: str, *, output_stride: Optional[int] = None, mirror: Optional[str] = None,
                    progress: bool = True) -> nn.Module:
    """The zoo model ``name`` with the paper's weights, in eval mode.

    Segmentation entries give a DeepLab model (``tf_compat``; its checkpoint's classes and palette
    via :func:`pretrained_path` + :func:`deeplab.checkpoint.load_model`); ImageNet entries give the
    backbone.

    A Hub id (``org/repo[@revision]`` or ``hf://...``) loads from the Hugging Face Hub instead
    (:func:`deeplab.hub.from_pretrained`).

    Args:
        name: a key of :data:`ZOO` (``deeplab weights list``), or a Hub id.
        output_stride: rebuild at this output stride (the weights do not depend on it).
        mirror: base URL instead of the official one.
        progress: show download progress.
    """
    if name not in ZOO and ("/" in name or name.startswith("hf://")):
        from .hub import from_pretrained as hub_from_pretrained

        return hub_from_pretrained(name, output_stride=output_stride)
    entry = get_entry(name)
    path = pretrained_path(name, mirror=mirror, progress=progress)
    if entry.is_backbone:
        from .models import build_backbone
        from .weights import load_backbone_weights

        backbone = build_backbone(entry.backbone, output_stride=output_stride or 16, tf_compat=True)
        load_backbone_weights(backbone, entry.backbone, path)
        return backbone.eval()
    from .checkpoint import load_model

    model, _ = load_model(path, map_location="cpu", output_stride=output_stride)
    return model.eval()


def describe(entry: ZooEntry, cache_dir: Optional[PathLike] = None) -> List[str]:
    """The columns ``deeplab weights list`` prints for an entry."""
    figure = "-" if entry.miou is None else f"{entry.miou:.2f} {entry.miou_split} ({entry.eval_setting()})"
    size = "?" if entry.size_mb is None else f"{entry.size_mb}MB"
    return [entry.name, entry.dataset or "imagenet", f"{entry.arch}/{entry.backbone}", figure, size,
            cache_state(entry, cache_dir)]


__all__ = [
    "ZOO",
    "ZOO_BASE_URL",
    "ZOO_URL_ENV",
    "ZooEntry",
    "ZooError",
    "base_url",
    "cache_state",
    "describe",
    "download",
    "from_pretrained",
    "get_entry",
    "imagenet_entry",
    "pretrained_path",
    "zoo_dir",
]
